"""The `jobwarden` command: run the daemon, or talk to a running one over its admin socket.

Exit codes: 0 ok; 1 a watched job failed or was canceled, or the daemon refused a request;
2 a usage, argument or config error, or a reply saying the request was wrong
(INVALID_REQUEST, NOT_FOUND); 3 the daemon could not be reached.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple, NoReturn, get_args

import msgspec
from rich import box
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn
from rich.table import Table
from rich.text import Text

from daemon.client import AdminClient, AdminError, DaemonUnreachable
from daemon.config import ConfigError, check_handlers, find_config, load_config
from daemon.protocol import TERMINAL_STATUSES, ErrorBody, JobStatus, JobView

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_INTERRUPTED = 130
# Replies that blame the request rather than the daemon.
USAGE_ERROR_CODES = frozenset({"INVALID_REQUEST", "NOT_FOUND"})
JOB_STATUSES: tuple[str, ...] = get_args(JobStatus)
DRAIN_POLL_SECONDS = 0.2

ShowEvent = Callable[[dict[str, Any]], None]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        # argparse exits on --help and on usage errors; callers of main() get the code instead.
        return int(exc.code or 0)
    try:
        return args.run(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except DaemonUnreachable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except AdminError as exc:
        print(f"error {_error_text(exc.error)}{_error_hints(exc.error)}", file=sys.stderr)
        return EXIT_USAGE if exc.error.code in USAGE_ERROR_CODES else EXIT_FAILED
    except KeyboardInterrupt:
        # Ctrl-C is how a person stops watching; the job itself keeps running.
        return EXIT_INTERRUPTED


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jobwarden",
        description="Run the jobwarden daemon, or manage its jobs over the admin socket.",
        parents=[_global_options(in_subcommand=False)],
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(
        name: str, run: Callable[[argparse.Namespace], int], summary: str
    ) -> argparse.ArgumentParser:
        sub = commands.add_parser(
            name,
            help=summary,
            description=summary,
            parents=[_global_options(in_subcommand=True)],
        )
        sub.set_defaults(run=run)
        return sub

    command("serve", _serve, "run the daemon in the foreground")
    check = command("check-config", _check_config, "validate a config file and import handlers")
    check.add_argument(
        "path",
        nargs="?",
        metavar="PATH",
        help="the config file (default: --config, then $JOBWARDEN_CONFIG, then ./config.toml)",
    )

    submit = command("submit", _submit, "submit a job and print its id")
    submit.add_argument("kind", metavar="KIND")
    submit.add_argument(
        "payload",
        metavar="PAYLOAD_JSON",
        type=_json_object,
        help="a JSON object, e.g. '{\"n\": 1}'",
    )
    submit.add_argument("--priority", type=int, metavar="N", help="overrides the kind's priority")
    submit.add_argument(
        "--idempotency-key",
        metavar="K",
        help="submitting the same key again returns the existing job instead of a new one",
    )
    submit.add_argument("--user", metavar="U", help="submit on behalf of this user")
    submit.add_argument("--watch", action="store_true", help="then watch it until it finishes")

    jobs = command("jobs", _jobs, "list jobs, newest first")
    jobs.add_argument(
        "--status",
        action="extend",
        type=_statuses,
        metavar="S",
        help=f"only these statuses, repeatable or comma separated ({', '.join(JOB_STATUSES)})",
    )
    jobs.add_argument("--kind", metavar="K")
    jobs.add_argument("--user", metavar="U")
    jobs.add_argument("--limit", type=_positive_int, metavar="N", help="at most N jobs (50)")

    for name, run, summary in (
        ("show", _show, "show a job with its latest events"),
        ("cancel", _cancel, "cancel a job"),
        ("retry", _retry, "queue a failed or canceled job again"),
    ):
        command(name, run, summary).add_argument("job", type=_positive_int, metavar="JOB")
    for name, run, summary in (
        ("pause", _pause, "stop starting jobs of KIND, or of every kind"),
        ("resume", _resume, "start jobs of KIND, or of every kind, again"),
    ):
        command(name, run, summary).add_argument("kind", nargs="?", metavar="KIND")

    drain = command("drain", _drain, "stop admitting jobs, let running ones finish, then exit")
    drain.add_argument("--wait", action="store_true", help="return once the daemon has exited")
    command("status", _status, "show the daemon's state")
    stuck = command("stuck", _stuck, "run the stuck, stall, SLA and queue-time rules now")
    stuck.add_argument(
        "--dry-run", action="store_true", help="list what the rules would do, change nothing"
    )
    watch = command("watch", _watch, "follow a job's progress until it finishes")
    target = watch.add_mutually_exclusive_group(required=True)
    target.add_argument("job", nargs="?", type=_positive_int, metavar="JOB")
    target.add_argument("--all", action="store_true", help="follow every job, until Ctrl-C")
    command("shutdown", _shutdown, "stop the daemon now; running jobs are interrupted")
    return parser


def _global_options(*, in_subcommand: bool) -> argparse.ArgumentParser:
    # Accepted before and after the subcommand; in the subcommand they default to SUPPRESS so
    # that leaving them out there keeps what was given before it.
    def default(value: Any) -> Any:
        return argparse.SUPPRESS if in_subcommand else value

    options = argparse.ArgumentParser(add_help=False)
    options.add_argument(
        "--config",
        metavar="PATH",
        default=default(None),
        help="config file, to find the admin socket (default: $JOBWARDEN_CONFIG, ./config.toml)",
    )
    options.add_argument(
        "--socket", metavar="PATH", default=default(None), help="admin socket, instead of config"
    )
    options.add_argument(
        "--json", action="store_true", default=default(False), help="print replies as JSON"
    )
    return options


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(
            f"must be a JSON object like '{{\"n\": 1}}', got {_json_type_name(value)}"
        )
    return value


def _json_type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    return {list: "an array", str: "a string"}.get(type(value), "null")


def _positive_int(text: str) -> int:
    if not text.isdecimal() or int(text) == 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def _statuses(text: str) -> list[str]:
    statuses = [status.strip() for status in text.split(",") if status.strip()]
    if not statuses or any(status not in JOB_STATUSES for status in statuses):
        raise argparse.ArgumentTypeError(
            f"expected statuses from {', '.join(JOB_STATUSES)}, got {text!r}"
        )
    return statuses


# Commands.


def _serve(args: argparse.Namespace) -> int:
    # Imported here so that talking to a daemon never loads the daemon itself.
    from daemon.supervisor import serve_main

    return serve_main(find_config(args.config))


def _check_config(args: argparse.Namespace) -> int:
    path = Path(args.path) if args.path else find_config(args.config)
    config = load_config(path)
    try:
        check_handlers(config)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    kinds = list(config.kinds)
    names = f" ({', '.join(kinds)})" if kinds else ""
    print(f"ok: {len(kinds)} {'kind' if len(kinds) == 1 else 'kinds'}{names}")
    return EXIT_OK


def _submit(args: argparse.Namespace) -> int:
    with _client(args) as client:
        data = client.call(
            "submit",
            kind=args.kind,
            payload=args.payload,
            priority=args.priority,
            idempotency_key=args.idempotency_key,
            user=args.user,
        )
        job = _job(data["job"])
        if args.json and args.watch:
            _print_json_line(data)
        elif args.json:
            _print_json(data)
        elif data["existing"]:
            print(f"existing job {job.id} ({job.status})")
        else:
            print(f"submitted job {job.id}")
        if not args.watch:
            return EXIT_OK
        return _watch_job(client, job.id, as_json=args.json)


def _jobs(args: argparse.Namespace) -> int:
    data = _call(args, "jobs", status=args.status, kind=args.kind, user=args.user, limit=args.limit)
    if args.json:
        _print_json(data["jobs"])
        return EXIT_OK
    jobs = [_job(job) for job in data["jobs"]]
    if not jobs:
        print("no jobs")
        return EXIT_OK
    now = time.time()
    rows = [
        [
            str(job.id),
            job.kind,
            job.user,
            job.status,
            f"{job.attempt}/{job.max_attempts}",
            _percent(job.progress) if job.progress is not None else "-",
            _span(now - job.created_at),
            _job_detail(job),
        ]
        for job in jobs
    ]
    _print_table(["ID", "KIND", "USER", "STATUS", "ATTEMPT", "PROGRESS", "AGE", "DETAIL"], rows)
    return EXIT_OK


def _show(args: argparse.Namespace) -> int:
    data = _call(args, "show", job=args.job)
    if args.json:
        _print_json(data)
        return EXIT_OK
    job = _job(data["job"])
    now = time.time()
    progress = _percent(job.progress) if job.progress is not None else None
    _print_fields(
        [
            ("job", f"{job.id}"),
            ("kind", job.kind),
            ("user", job.user),
            ("status", f"{job.status} ({job.reason})" if job.reason else job.status),
            ("waiting", data.get("waiting")),
            ("attempt", f"{job.attempt}/{job.max_attempts}"),
            ("priority", str(job.priority)),
            ("progress", " ".join(filter(None, [progress, job.message])) or None),
            ("created", _when(job.created_at, now)),
            ("available", _when(job.available_at, now) if job.available_at > now else None),
            ("started", _when(job.started_at, now) if job.started_at else None),
            ("finished", _when(job.finished_at, now) if job.finished_at else None),
            ("idempotency key", job.idempotency_key),
            ("payload", _json_text(job.payload)),
            ("checkpoint", _json_text(job.checkpoint) if job.checkpoint is not None else None),
            ("result", _json_text(job.result) if job.result is not None else None),
            ("error", _error_text(job.error) if job.error else None),
        ]
    )
    events = data.get("events", [])
    if events:
        print("events:")
    for event in events:
        print(f"  {_clock(event['at'])}  {_describe_event(event)}")
    return EXIT_OK


def _cancel(args: argparse.Namespace) -> int:
    return _print_job_reply(args, _call(args, "cancel", job=args.job))


def _retry(args: argparse.Namespace) -> int:
    return _print_job_reply(args, _call(args, "retry", job=args.job))


def _pause(args: argparse.Namespace) -> int:
    return _print_paused(args, _call(args, "pause", kind=args.kind))


def _resume(args: argparse.Namespace) -> int:
    return _print_paused(args, _call(args, "resume", kind=args.kind))


def _drain(args: argparse.Namespace) -> int:
    with _client(args) as client:
        data = client.call("drain")
    if args.json:
        _print_json(data)
    else:
        running = data["running"]
        print(
            f"draining: admitting no jobs; {running} running {'job' if running == 1 else 'jobs'}"
            " may finish, then the daemon exits"
        )
    if args.wait:
        _wait_until_stopped(client.path)
        if not args.json:
            print("daemon stopped")
    return EXIT_OK


def _status(args: argparse.Namespace) -> int:
    data = _call(args, "status")
    if args.json:
        _print_json(data)
        return EXIT_OK
    counts = data["jobs"]
    queued = ", ".join(f"{kind} {count}" for kind, count in data["queue_depth"].items())
    if data.get("oldest_queued_seconds") is not None:
        queued += f" (oldest waiting {_span(data['oldest_queued_seconds'])})"
    system = data.get("system", {})
    recovered = data.get("stuck", {}).get("recovered", {})
    _print_fields(
        [
            (
                "daemon",
                f"jobwarden {data['version']}, pid {data['pid']}, up {_span(data['uptime'])}",
            ),
            ("state", "draining" if data["draining"] else "accepting jobs"),
            ("running", f"{data['running']} of {data['max_concurrent_jobs']} slots"),
            ("jobs", ", ".join(f"{status} {counts.get(status, 0)}" for status in JOB_STATUSES)),
            ("queued", queued.strip() or "none"),
            ("paused", _paused_text(data["paused"], data["paused_all"])),
            (
                "recovered",
                ", ".join(f"{rule} {n}" for rule, n in recovered.items()) or "none",
            ),
            (
                "system",
                f"memory {system.get('memory_percent', 0):.0f}% "
                f"({system.get('memory_available_gb', 0):.1f} GB free), "
                f"cpu {system.get('cpu_percent', 0):.0f}%",
            ),
        ]
    )
    return EXIT_OK


def _stuck(args: argparse.Namespace) -> int:
    data = _call(args, "stuck", dry_run=args.dry_run)
    if args.json:
        _print_json(data)
        return EXIT_OK
    findings = data["findings"]
    verb = "would" if data["dry_run"] else "did"
    if not findings:
        print("no job breaks a rule")
        return EXIT_OK
    for finding in findings:
        print(
            f"job {finding['job']} ({finding['kind']}, {finding['status']}): "
            f"{finding['rule']}, {finding['detail']}; {verb} {finding['action']}"
        )
    return EXIT_OK


def _watch(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.all:
            _watch_all(client, as_json=args.json)
        return _watch_job(client, args.job, as_json=args.json)


def _shutdown(args: argparse.Namespace) -> int:
    data = _call(args, "shutdown")
    if args.json:
        _print_json(data)
    else:
        print("daemon stopping")
    return EXIT_OK


# Talking to the daemon.


def _client(args: argparse.Namespace) -> AdminClient:
    if args.socket:
        return AdminClient(args.socket)
    config = load_config(find_config(args.config))
    return AdminClient(config.path(config.admin.socket))


def _call(args: argparse.Namespace, cmd: str, **cmd_args: Any) -> Any:
    with _client(args) as client:
        return client.call(cmd, **cmd_args)


def _wait_until_stopped(socket_path: str) -> None:
    while True:
        try:
            with AdminClient(socket_path) as client:
                client.call("ping")
        except DaemonUnreachable as exc:
            if exc.not_running:
                return
            # Otherwise the daemon cut the connection on its way out; it is not gone yet.
        time.sleep(DRAIN_POLL_SECONDS)


class Outcome(NamedTuple):
    status: str
    result: Any
    error: ErrorBody | None


def _watch_job(client: AdminClient, job_id: int, *, as_json: bool) -> int:
    """Follow one job until it finishes, and return the exit code its outcome deserves."""
    shown = client.call("show", job=job_id)
    job = _job(shown["job"])
    history = shown.get("events", [])
    if shown.get("waiting") and not as_json:
        print(f"job {job_id} waiting: {shown['waiting']}")
    outcome = (
        Outcome(job.status, job.result, job.error) if job.status in TERMINAL_STATUSES else None
    )
    with _event_printer(job, as_json=as_json) as show_event:
        for event in history:
            show_event(event)
        if outcome is None:
            last_seq = max((event["seq"] for event in history), default=0)
            for event in _unseen(client.watch(job=job_id, since=last_seq), last_seq):
                show_event(event)
                outcome = _outcome_of(event)
                if outcome is not None:
                    break
    return _report_outcome(job_id, outcome, as_json=as_json)


def _watch_all(client: AdminClient, *, as_json: bool) -> NoReturn:
    events = client.watch()
    with _event_printer(None, as_json=as_json) as show_event:
        while True:
            show_event(next(events))


def _unseen(events: Iterable[dict[str, Any]], last_seq: int) -> Iterator[dict[str, Any]]:
    """Skip events already shown: a watch replays stored events before the live ones."""
    for event in events:
        if event["seq"] > last_seq:
            last_seq = event["seq"]
            yield event


def _outcome_of(event: dict[str, Any]) -> Outcome | None:
    data = event["data"]
    if event["type"] != "status" or data["status"] not in TERMINAL_STATUSES:
        return None
    error = msgspec.convert(data["error"], ErrorBody) if data.get("error") else None
    return Outcome(data["status"], data.get("result"), error)


def _report_outcome(job_id: int, outcome: Outcome, *, as_json: bool) -> int:
    if outcome.status == "done":
        if not as_json and outcome.result is not None:
            print(_json_text(outcome.result, indent=2))
        return EXIT_OK
    if not as_json:
        why = f": {_error_text(outcome.error)}" if outcome.error else ""
        print(f"job {job_id} {outcome.status}{why}", file=sys.stderr)
    return EXIT_FAILED


@contextlib.contextmanager
def _event_printer(job: JobView | None, *, as_json: bool) -> Iterator[ShowEvent]:
    """JSON lines for programs, a live progress bar for a person watching one job, and one
    line per event for logs and for watching every job."""
    if as_json:
        yield _print_json_line
    elif job is None or not sys.stdout.isatty():
        yield lambda event: print(_event_line(event), flush=True)
    else:
        with _progress_bar(job) as show_event:
            yield show_event


@contextlib.contextmanager
def _progress_bar(job: JobView) -> Iterator[ShowEvent]:
    columns = (
        TextColumn("job {task.fields[job]} [bold]{task.fields[status]}"),
        BarColumn(),
        TaskProgressColumn(),
        # Progress messages come from job code; brackets in them are not rich markup.
        TextColumn("{task.description}", markup=False),
    )
    with Progress(*columns) as progress:
        task = progress.add_task(
            job.message or "",
            total=1.0,
            completed=job.progress or 0.0,
            job=job.id,
            status=job.status,
        )

        def show_event(event: dict[str, Any]) -> None:
            data = event["data"]
            if event["type"] == "progress":
                progress.update(
                    task, completed=data["fraction"], description=data.get("message") or ""
                )
            else:
                # A job may finish without reporting 100%; its bar should still end full.
                finished = data["status"] == "done"
                progress.update(task, status=data["status"], completed=1.0 if finished else None)
                progress.console.print(_event_line(event), markup=False, highlight=False)

        yield show_event


# Formatting.


def _job(data: Any) -> JobView:
    return msgspec.convert(data, JobView)


def _event_line(event: dict[str, Any]) -> str:
    return f"job {event['job']} {_describe_event(event)}"


def _describe_event(event: dict[str, Any]) -> str:
    data = event["data"]
    if event["type"] == "progress":
        return " ".join(filter(None, ["progress", _percent(data["fraction"]), data.get("message")]))
    words = ["status", data["status"], f"attempt {data['attempt']}"]
    if data.get("reason"):
        words.append(f"({data['reason']})")
    if data["status"] == "queued" and data.get("available_at", 0) > event["at"]:
        words.append(f"next try in {_span(data['available_at'] - event['at'])}")
    return " ".join(words)


def _job_detail(job: JobView) -> str:
    message = job.message or (job.error.message if job.error else None)
    return ": ".join(filter(None, [job.reason, message]))


def _print_job_reply(args: argparse.Namespace, data: Any) -> int:
    if args.json:
        _print_json(data)
        return EXIT_OK
    job = _job(data["job"])
    detail = _job_detail(job)
    print(f"job {job.id} {job.status}" + (f" ({detail})" if detail else ""))
    return EXIT_OK


def _print_paused(args: argparse.Namespace, data: Any) -> int:
    if args.json:
        _print_json(data)
    else:
        print(f"paused: {_paused_text(data['paused'], data['all'])}")
    return EXIT_OK


def _paused_text(kinds: list[str], everything: bool) -> str:
    if everything:
        return "every kind"
    return ", ".join(kinds) or "nothing"


def _print_fields(fields: list[tuple[str, str | None]]) -> None:
    shown = [(label, value) for label, value in fields if value is not None]
    width = max(len(label) for label, _ in shown)
    for label, value in shown:
        print(f"{label.ljust(width)}  {value}")


def _print_table(headers: list[str], rows: list[list[str]]) -> None:
    if sys.stdout.isatty():
        table = Table(*headers, box=box.SIMPLE)
        for row in rows:
            # Text, not str: kinds and messages are user data, not rich markup.
            table.add_row(*(Text(cell) for cell in row))
        Console().print(table)
        return
    widths = [max(len(line[column]) for line in [headers, *rows]) for column in range(len(headers))]
    for line in [headers, *rows]:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        )


def _print_json(data: Any) -> None:
    print(_json_text(data, indent=2))


def _print_json_line(data: Any) -> None:
    print(msgspec.json.encode(data).decode(), flush=True)


def _json_text(data: Any, indent: int = 0) -> str:
    return msgspec.json.format(msgspec.json.encode(data), indent=indent).decode()


def _error_text(error: ErrorBody) -> str:
    return f"{error.code}: {error.message}"


def _error_hints(error: ErrorBody) -> str:
    hints = []
    if error.retry_after is not None:
        hints.append(f"retry in {_span(error.retry_after)}")
    elif error.retryable:
        hints.append("retryable")
    if error.code == "INTERNAL" and error.error_id:
        # The id finds the full story in the daemon's log.
        hints.append(f"error id {error.error_id}")
    return f" ({'; '.join(hints)})" if hints else ""


def _percent(fraction: float) -> str:
    return f"{fraction * 100:.0f}%"


def _span(seconds: float) -> str:
    """A short human span: 45s, 12m, 3h, 2d."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{max(int(seconds), 0)}s"


def _when(timestamp: float, now: float) -> str:
    relative = (
        f"in {_span(timestamp - now)}" if timestamp > now else f"{_span(now - timestamp)} ago"
    )
    return f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(timestamp))} ({relative})"


def _clock(timestamp: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(timestamp))


if __name__ == "__main__":
    sys.exit(main())
