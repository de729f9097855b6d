"""Jobs: submit, jobs, show, watch, cancel, retry, hold, release, and stuck (the monitor's
rules, run now)."""

from __future__ import annotations

import argparse
import time
from typing import Any

import msgspec

from jobwarden.cli.arguments import (
    Subcommands,
    add_status_option,
    job_ids,
    positive_int,
    subcommand,
    words,
)
from jobwarden.cli.batches import (
    add_file_options,
    check_file_options,
    payload_argument,
    submit_file,
)
from jobwarden.cli.bulk import add_filter_options, check_target, run_bulk
from jobwarden.cli.connection import (
    call,
    client,
    http_client,
    over_http,
    over_websocket,
    websocket_options,
)
from jobwarden.cli.output import (
    EXIT_OK,
    clock,
    date_time,
    error_text,
    json_text,
    paint,
    percent,
    print_fields,
    print_json_line,
    print_reply,
    print_table,
    span,
    when,
)
from jobwarden.cli.watching import (
    describe_event,
    follow_over_http,
    follow_over_websocket,
    job_view,
    waiting_text,
    watch_all,
    watch_all_over_websocket,
    watch_job,
)
from jobwarden.client import WebSocketClient
from jobwarden.wire.views import JobView


def add_commands(commands: Subcommands) -> None:
    submit = subcommand(
        commands, "submit", _submit, "submit a job and print its id, or many from a file"
    )
    submit.add_argument("kind", metavar="KIND")
    submit.add_argument(
        "payload",
        metavar="PAYLOAD_JSON",
        nargs="?",
        type=payload_argument,
        help="a JSON object, e.g. '{\"n\": 1}'; @PATH reads it from a file, - from stdin",
    )
    add_file_options(submit)
    submit.add_argument("--priority", type=int, metavar="N", help="overrides the kind's priority")
    submit.add_argument(
        "--idempotency-key",
        metavar="K",
        help="while this key's job is queued or running, the same key returns it (other work "
        "with it: CONFLICT)",
    )
    submit.add_argument("--user", metavar="U", help="submit on behalf of this user")
    start = submit.add_mutually_exclusive_group()
    start.add_argument(
        "--run-at", metavar="TIME", help="start it then: an RFC 3339 time, e.g. 2026-12-01T12:00Z"
    )
    start.add_argument("--delay", metavar="DURATION", help='start it this much later, e.g. "10m"')
    submit.add_argument(
        "--tag",
        dest="tags",
        action="extend",
        type=words,
        metavar="T",
        help="tag it, to find it with jobs --tag; repeatable or comma separated",
    )
    submit.add_argument(
        "--after",
        action="extend",
        type=job_ids,
        metavar="JOB",
        help="run it once these jobs are done; repeatable or comma separated",
    )
    submit.add_argument(
        "--after-any",
        action="store_true",
        help="with --after: run it however they end (failed or canceled too)",
    )
    submit.add_argument(
        "--webhook",
        metavar="URL",
        help="POST the job to this URL when it is final (a host the config's "
        "webhooks.allowed_hosts lists)",
    )
    submit.add_argument("--watch", action="store_true", help="then watch it until it finishes")
    websocket_options(submit)
    check_connection = submit.get_default("check")

    def check_submit(args: argparse.Namespace) -> None:
        check_file_options(args)
        check_connection(args)

    submit.set_defaults(check=check_submit)

    jobs = subcommand(commands, "jobs", _jobs, "list jobs, newest first")
    add_status_option(jobs)
    jobs.add_argument("--kind", metavar="K")
    jobs.add_argument("--user", metavar="U")
    jobs.add_argument("--tag", metavar="T", help="only jobs tagged so")
    jobs.add_argument("--limit", type=positive_int, metavar="N", help="at most N jobs (50)")

    subcommand(commands, "show", _show, "show a job with its latest events").add_argument(
        "job", type=positive_int, metavar="JOB"
    )
    for name, run, summary in (
        ("cancel", _cancel, "cancel a job, or every job a filter matches"),
        ("retry", _retry, "queue a failed or canceled job again, or every one a filter matches"),
    ):
        command = subcommand(commands, name, run, summary)
        command.add_argument("job", nargs="?", type=positive_int, metavar="JOB")
        add_filter_options(command, name)
        command.set_defaults(check=check_target)
    for name, run, summary in (
        ("hold", _hold, "hold a queued job: it waits until released"),
        ("release", _release, "release a held job"),
    ):
        subcommand(commands, name, run, summary).add_argument(
            "job", type=positive_int, metavar="JOB"
        )

    watch = subcommand(commands, "watch", _watch, "follow a job's progress until it finishes")
    target = watch.add_mutually_exclusive_group(required=True)
    target.add_argument("job", nargs="?", type=positive_int, metavar="JOB")
    target.add_argument("--all", action="store_true", help="follow every job, until Ctrl-C")
    websocket_options(watch)

    deliveries = subcommand(
        commands, "webhooks", _webhooks, "list webhook deliveries, newest first"
    )
    deliveries.add_argument("--job", type=positive_int, metavar="JOB", help="only this job's")
    deliveries.add_argument(
        "--pending", action="store_true", help="only those not delivered (due or given up)"
    )
    deliveries.add_argument("--limit", type=positive_int, metavar="N", help="at most N (50)")

    stuck = subcommand(
        commands, "stuck", _stuck, "run the stuck, stall, SLA and queue-time rules now"
    )
    stuck.add_argument(
        "--dry-run", action="store_true", help="list what the rules would do, change nothing"
    )


def _submit(args: argparse.Namespace) -> int:
    if args.file is not None:
        return submit_file(args)
    if over_http(args):
        return _submit_over_http(args)
    if args.url:
        return over_websocket(args, _submit_over_websocket)
    with client(args) as admin:
        data = admin.call(
            "submit",
            kind=args.kind,
            payload=args.payload,
            priority=args.priority,
            idempotency_key=args.idempotency_key,
            user=args.user,
            run_at=args.run_at,
            delay=args.delay,
            tags=args.tags,
            after=args.after,
            after_any=args.after_any or None,
            webhook=args.webhook,
        )
        _print_submitted(args, data)
        if not args.watch:
            return EXIT_OK
        return watch_job(admin, data["job"]["id"], as_json=args.json)


def _submit_over_http(args: argparse.Namespace) -> int:
    with http_client(args) as api:
        job = api.submit(
            args.kind,
            args.payload,
            priority=args.priority,
            idempotency_key=args.idempotency_key,
        )
        _print_submitted(args, {"job": msgspec.to_builtins(job.view), "existing": job.existing})
        if not args.watch:
            return EXIT_OK
        return follow_over_http(job, as_json=args.json)


async def _submit_over_websocket(websocket: WebSocketClient, args: argparse.Namespace) -> int:
    accepted = await websocket.submit(
        args.kind,
        args.payload,
        priority=args.priority,
        idempotency_key=args.idempotency_key,
        run_at=args.run_at,
        delay=args.delay,
        tags=args.tags,
        after=args.after,
        after_any=args.after_any,
        webhook=args.webhook,
    )
    job = msgspec.to_builtins(accepted)
    existing = job.pop("existing", False)
    _print_submitted(args, {"job": job, "existing": existing})
    if not args.watch:
        return EXIT_OK
    return await follow_over_websocket(websocket, accepted.id, as_json=args.json)


def _print_submitted(args: argparse.Namespace, data: dict[str, Any]) -> None:
    if args.json and args.watch:
        # One JSON value a line, as the events that follow it.
        print_json_line(data)
    else:
        print_reply(args, data, _say_submitted)


def _say_submitted(data: dict[str, Any]) -> None:
    job = job_view(data["job"])
    if data["existing"]:
        print(f"existing job {job.id} ({paint(job.status)})")
    elif job.run_at is not None:
        print(f"submitted job {job.id}, to start {when(job.run_at, time.time())}")
    else:
        print(f"submitted job {job.id}")


def _jobs(args: argparse.Namespace) -> int:
    data = call(
        args,
        "jobs",
        status=args.status,
        kind=args.kind,
        user=args.user,
        tag=args.tag,
        limit=args.limit,
    )
    waiting = data.get("waiting") or {}
    return print_reply(args, data["jobs"], lambda jobs: _print_jobs(jobs, waiting))


def _print_jobs(listed: list[dict[str, Any]], waiting: dict[str, Any]) -> None:
    jobs = [job_view(job) for job in listed]
    if not jobs:
        print("no jobs")
        return
    now = time.time()
    rows = [
        [
            str(job.id),
            job.kind,
            job.user,
            paint(job.status),
            f"{job.attempt}/{job.max_attempts}",
            percent(job.progress) if job.progress is not None else "-",
            span(now - job.created_at),
            waiting_text(waiting[str(job.id)]) if str(job.id) in waiting else "-",
            _job_detail(job),
        ]
        for job in jobs
    ]
    headers = ["ID", "KIND", "USER", "STATUS", "ATTEMPT", "PROGRESS", "AGE", "WAITING", "DETAIL"]
    print_table(headers, rows)


def _show(args: argparse.Namespace) -> int:
    return print_reply(args, call(args, "show", job=args.job), _print_job_in_full)


def _print_job_in_full(data: dict[str, Any]) -> None:
    job = job_view(data["job"])
    now = time.time()
    progress = percent(job.progress) if job.progress is not None else None
    print_fields(
        [
            ("job", f"{job.id}"),
            ("kind", job.kind),
            ("user", job.user),
            ("status", f"{paint(job.status)} ({job.reason})" if job.reason else paint(job.status)),
            ("waiting", waiting_text(data["waiting"]) if data.get("waiting") else None),
            ("held", "by an operator (jobwarden release)" if job.held else None),
            ("starts", when(job.run_at, now) if _not_started(job) else None),
            ("after", _after_text(job) if job.after else None),
            ("tags", ", ".join(job.tags) if job.tags else None),
            ("attempt", f"{job.attempt}/{job.max_attempts}"),
            ("priority", str(job.priority)),
            ("progress", " ".join(filter(None, [progress, job.message])) or None),
            ("created", when(job.created_at, now)),
            ("available", when(job.available_at, now) if job.available_at > now else None),
            ("started", when(job.started_at, now) if job.started_at else None),
            ("finished", when(job.finished_at, now) if job.finished_at else None),
            ("idempotency key", job.idempotency_key),
            ("schedule", job.schedule),
            ("payload", json_text(job.payload)),
            ("checkpoint", json_text(job.checkpoint) if job.checkpoint is not None else None),
            ("result", json_text(job.result) if job.result is not None else None),
            ("error", error_text(job.error) if job.error else None),
        ]
    )
    events = data.get("events", [])
    if events:
        print("events:")
    for event in events:
        print(f"  {clock(event['at'])}  {describe_event(event)}")


def _watch(args: argparse.Namespace) -> int:
    if over_http(args):
        with http_client(args) as api:
            return follow_over_http(api.get(args.job), as_json=args.json)
    if args.url:
        return over_websocket(args, _watch_over_websocket)
    with client(args) as admin:
        if args.all:
            watch_all(admin, as_json=args.json)
        return watch_job(admin, args.job, as_json=args.json)


async def _watch_over_websocket(websocket: WebSocketClient, args: argparse.Namespace) -> int:
    if args.all:
        return await watch_all_over_websocket(websocket, as_json=args.json)
    return await follow_over_websocket(websocket, args.job, as_json=args.json)


def _cancel(args: argparse.Namespace) -> int:
    if args.job is None:
        return run_bulk(args, "cancel")
    return print_reply(args, call(args, "cancel", job=args.job), _print_job_line)


def _retry(args: argparse.Namespace) -> int:
    if args.job is None:
        return run_bulk(args, "retry")
    return print_reply(args, call(args, "retry", job=args.job), _print_job_line)


def _hold(args: argparse.Namespace) -> int:
    return print_reply(args, call(args, "hold", job=args.job), _print_job_line)


def _release(args: argparse.Namespace) -> int:
    return print_reply(args, call(args, "release", job=args.job), _print_job_line)


def _not_started(job: JobView) -> bool:
    """Submitted to start later, and not started yet."""
    return job.run_at is not None and job.status == "queued" and job.attempt == 0


def _after_text(job: JobView) -> str:
    ids = ", ".join(f"job {job_id}" for job_id in job.after)
    return ids + (", whatever their outcome" if job.after_any else ", once done")


def _print_job_line(data: dict[str, Any]) -> None:
    job = job_view(data["job"])
    detail = _job_detail(job)
    held = ", held" if job.held else ""
    print(f"job {job.id} {paint(job.status)}{held}" + (f" ({detail})" if detail else ""))


def _job_detail(job: JobView) -> str:
    message = job.message or (job.error.message if job.error else None)
    return ": ".join(filter(None, [job.reason, message]))


def _webhooks(args: argparse.Namespace) -> int:
    found = call(args, "webhooks", job=args.job, pending=args.pending, limit=args.limit or 50)
    return print_reply(args, found, _print_deliveries)


def _print_deliveries(data: dict[str, Any]) -> None:
    rows = [
        [
            str(delivery["id"]),
            str(delivery["job_id"]),
            delivery["status"],
            _delivery_state(delivery),
            str(delivery["attempts"]),
            delivery.get("answer") or "",
            delivery["url"],
        ]
        for delivery in data["deliveries"]
    ]
    print_table(["ID", "JOB", "FINAL", "STATE", "TRIES", "LAST ANSWER", "URL"], rows)


def _delivery_state(delivery: dict[str, Any]) -> str:
    if delivery.get("delivered_at") is not None:
        return f"delivered {date_time(delivery['delivered_at'])}"
    if delivery.get("next_at") is not None:
        return f"due {date_time(delivery['next_at'])}"
    return "given up"


def _stuck(args: argparse.Namespace) -> int:
    return print_reply(args, call(args, "stuck", dry_run=args.dry_run), _print_findings)


def _print_findings(data: dict[str, Any]) -> None:
    findings = data["findings"]
    verb = "would" if data["dry_run"] else "did"
    if not findings:
        print("no job breaks a rule")
        return
    for finding in findings:
        print(
            f"job {finding['job']} ({finding['kind']}, {finding['status']}): "
            f"{finding['rule']}, {finding['detail']}; {verb} {finding['action']}"
        )
