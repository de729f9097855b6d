"""The `jobwarden` command: run the daemon, or talk to a running one over its admin socket.

Exit codes: 0 ok; 1 a watched job failed or was canceled, or the daemon refused a request;
2 a usage, argument or config error, or a reply saying the request was wrong
(INVALID_REQUEST, NOT_FOUND); 3 the daemon could not be reached.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import re
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple, NoReturn, get_args

import msgspec
import trio
from rich import box
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn
from rich.table import Table
from rich.text import Text

from jobwarden.client import AdminClient, DaemonError, DaemonUnreachable, WebSocketClient, connect
from jobwarden.config import check_handlers, find_config, load_config, parse_rate
from jobwarden.errors import ConfigError
from jobwarden.wire.views import TERMINAL_STATUSES, ErrorBody, JobStatus, JobView

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_INTERRUPTED = 130
# Replies that blame the request rather than the daemon.
USAGE_ERROR_CODES = frozenset({"INVALID_REQUEST", "NOT_FOUND"})
JOB_STATUSES: tuple[str, ...] = get_args(JobStatus)
DRAIN_POLL_SECONDS = 0.2
# Where --url looks for the token when --token is not given (a flag shows in `ps`).
ENV_TOKEN = "JOBWARDEN_TOKEN"

ShowEvent = Callable[[dict[str, Any]], None]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        # Checks across arguments that argparse cannot express; they exit like its own.
        if hasattr(args, "check"):
            args.check(args)
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
    except DaemonError as exc:
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
        return _subcommand(commands, name, run, summary)

    command("serve", _serve, "run the daemon in the foreground")
    check = command("check-config", _check_config, "validate a config file and import handlers")
    check.add_argument(
        "path",
        nargs="?",
        metavar="PATH",
        help="the config file (default: --config, then $JOBWARDEN_CONFIG, then ./config.toml)",
    )
    _add_loadtest_arguments(
        command("loadtest", _loadtest, "seed 001's load test on a daemon run in this process")
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
    _websocket_options(submit)

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
    _websocket_options(watch)
    command("shutdown", _shutdown, "stop the daemon now; running jobs are interrupted")

    command("breakers", _breakers, "show each external service's circuit breaker")
    breaker = command("breaker", _breaker, "reset (close) or trip (open) a service's breaker")
    breaker.add_argument("action", choices=["reset", "trip"], metavar="{reset,trip}")
    breaker.add_argument("service", metavar="SERVICE")

    ledger = command("ledger", _ledger, "show what external calls cost, today by default")
    period = ledger.add_mutually_exclusive_group()
    period.add_argument("--day", type=_day, metavar="YYYY-MM-DD", help="one day")
    period.add_argument("--month", type=_month, metavar="YYYY-MM", help="one month")
    ledger.add_argument(
        "--by", choices=["service", "user", "kind"], default="service", help="group by (service)"
    )

    budget = command("budget", _budget, "show the spending budget, or set or resume it")
    actions = budget.add_subparsers(dest="action", metavar="ACTION")

    def budget_action(name: str, summary: str) -> argparse.ArgumentParser:
        return _subcommand(actions, name, _budget, summary)

    budget_action("show", "show the budget (the default)")
    budget_set = budget_action(
        "set", "change the daily or monthly limit; kept across restarts, over the config"
    )
    budget_set.add_argument("--daily", type=_usd, metavar="USD", help="daily limit, 0 for none")
    budget_set.add_argument("--monthly", type=_usd, metavar="USD", help="monthly limit, 0 for none")

    def check_budget_set(args: argparse.Namespace) -> None:
        if args.daily is None and args.monthly is None:
            budget_set.error("give --daily USD, --monthly USD or both")

    budget_set.set_defaults(check=check_budget_set)
    budget_action("resume", "spend again after a budget stop, for the rest of today")
    _add_users_command(command("users", _users, "add users, show them, change their limits"))
    return parser


def _subcommand(
    parent: Any, name: str, run: Callable[[argparse.Namespace], int], summary: str
) -> argparse.ArgumentParser:
    """A (sub)command that takes the global options after its name too."""
    sub = parent.add_parser(
        name, help=summary, description=summary, parents=[_global_options(in_subcommand=True)]
    )
    sub.set_defaults(run=run)
    return sub


def _add_users_command(users: argparse.ArgumentParser) -> None:
    actions = users.add_subparsers(dest="action", metavar="ACTION")

    def action(name: str, summary: str, *, named: bool = True) -> argparse.ArgumentParser:
        sub = _subcommand(actions, name, _users, summary)
        if named:
            sub.add_argument("name", metavar="NAME")
        return sub

    def limit_options(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--credits", type=_credits, metavar="N", help='balance, or "unlimited"')
        sub.add_argument(
            "--daily-limit", type=_whole_number, metavar="N", help="jobs per day, 0 for no limit"
        )
        sub.add_argument(
            "--rate", type=_rate, metavar="N/min", help='submissions per minute, or "off"'
        )
        sub.add_argument(
            "--max-running",
            type=_whole_number,
            metavar="N",
            help="jobs running at once, 0 for no limit",
        )

    action("list", "list users (the default)", named=False)
    action("show", "show a user's credits, limits and today's count")
    limit_options(action("add", "add a user and print their token, once"))
    limit_options(action("set", "change a user's credits or limits"))
    credits = action("credits", "add or take credits: +N or -N")
    credits.add_argument("change", type=_change, metavar="+N|-N")
    action("disable", "refuse the user's submissions and token")
    action("enable", "accept the user again")
    action("token", "make a new token for the user; the old one stops working")


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


def _positive_number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction from 0 to 1, got {text!r}")
    return value


def _day(text: str) -> str:
    return _date(text, "%Y-%m-%d", r"\d{4}-\d{2}-\d{2}", "a day as YYYY-MM-DD")


def _month(text: str) -> str:
    return _date(text, "%Y-%m", r"\d{4}-\d{2}", "a month as YYYY-MM")


def _date(text: str, fmt: str, pattern: str, expected: str) -> str:
    # The pattern insists on zero padding, which strptime would let go.
    try:
        if not re.fullmatch(pattern, text):
            raise ValueError
        datetime.datetime.strptime(text, fmt)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    return text


def _usd(text: str) -> float:
    try:
        value = float(text.removeprefix("$").replace(",", ""))
    except ValueError:
        value = -1.0
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(
            f"expected an amount of USD like 500 or 12.50, got {text!r}"
        )
    return value


def _credits(text: str) -> int | str:
    if text == "unlimited":
        return text
    if not text.isdecimal():
        raise argparse.ArgumentTypeError(
            f'expected a number of credits or "unlimited", got {text!r}'
        )
    return int(text)


def _whole_number(text: str) -> int:
    if not text.isdecimal():
        raise argparse.ArgumentTypeError(f"expected a whole number, 0 or more, got {text!r}")
    return int(text)


def _change(text: str) -> int:
    if not re.fullmatch(r"[+-]?\d+", text):
        raise argparse.ArgumentTypeError(f"expected a change like +50 or -10, got {text!r}")
    return int(text)


def _rate(text: str) -> str:
    try:
        parse_rate(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


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
    from jobwarden.process.supervisor import serve_main

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


def _add_loadtest_arguments(loadtest: argparse.ArgumentParser) -> None:
    loadtest.add_argument(
        "--hours",
        type=_positive_number,
        metavar="H",
        help="simulated hours of arrivals (3, or 8 for scenario C)",
    )
    loadtest.add_argument(
        "--jobs-per-hour",
        type=_positive_int,
        metavar="N",
        help="books an hour (50, or the scenario's)",
    )
    loadtest.add_argument(
        "--users", type=_positive_int, metavar="N", help="simulated users (10, or the scenario's)"
    )
    loadtest.add_argument(
        "--scenario",
        choices=("A", "B", "C"),
        help="seed 000's traffic: A 10 users, B 100, C 1,000, each with its rate and bursts",
    )
    clock = loadtest.add_mutually_exclusive_group()
    clock.add_argument(
        "--fast", action="store_true", help="virtual time, as fast as this machine allows"
    )
    clock.add_argument(
        "--speed",
        type=_positive_number,
        metavar="X",
        help="X simulated seconds per real second, e.g. 100 (default: real time)",
    )
    loadtest.add_argument(
        "--image-failure-rate",
        type=_fraction,
        default=0.03,
        metavar="F",
        help="share of image calls that fail (0.03; seed 000's test 3 is 0.5)",
    )
    loadtest.add_argument(
        "--inject-stuck",
        type=_positive_int,
        default=0,
        metavar="N",
        help="N jobs hang at the end of hour 1, for the monitor to find",
    )
    loadtest.add_argument(
        "--inject-crash",
        action="store_true",
        help="halfway, stop the daemon without a drain and start it again on the same database",
    )
    loadtest.add_argument("--seed", type=int, default=1, metavar="N", help="for repeatable runs")
    loadtest.add_argument(
        "--daily-volume",
        type=_positive_int,
        default=1000,
        metavar="N",
        help="books a day for the monthly projection (1000)",
    )
    loadtest.add_argument(
        "--out", default="var/results", metavar="DIR", help="where the results go (var/results)"
    )


def _loadtest(args: argparse.Namespace) -> int:
    # Imported here, as for serve: only this command runs a daemon in this process.
    from jobwarden.tools.loadtest import loadtest_main

    return loadtest_main(args)


def _submit(args: argparse.Namespace) -> int:
    if args.url:
        return _over_websocket(args, _submit_over_websocket)
    with _client(args) as client:
        data = client.call(
            "submit",
            kind=args.kind,
            payload=args.payload,
            priority=args.priority,
            idempotency_key=args.idempotency_key,
            user=args.user,
        )
        _print_submitted(args, data)
        if not args.watch:
            return EXIT_OK
        return _watch_job(client, data["job"]["id"], as_json=args.json)


def _print_submitted(args: argparse.Namespace, data: dict[str, Any]) -> None:
    job = _job(data["job"])
    if args.json and args.watch:
        _print_json_line(data)
    elif args.json:
        _print_json(data)
    elif data["existing"]:
        print(f"existing job {job.id} ({job.status})")
    else:
        print(f"submitted job {job.id}")


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
    waiting = data.get("waiting") or {}
    rows = [
        [
            str(job.id),
            job.kind,
            job.user,
            job.status,
            f"{job.attempt}/{job.max_attempts}",
            _percent(job.progress) if job.progress is not None else "-",
            _span(now - job.created_at),
            _waiting_text(waiting[str(job.id)]) if str(job.id) in waiting else "-",
            _job_detail(job),
        ]
        for job in jobs
    ]
    headers = ["ID", "KIND", "USER", "STATUS", "ATTEMPT", "PROGRESS", "AGE", "WAITING", "DETAIL"]
    _print_table(headers, rows)
    return EXIT_OK


def _waiting_text(info: dict[str, Any]) -> str:
    """One reason, and the place in the queue unless the reason already is that place."""
    place = f"{info['kind_position']} of {info['kind_queued']} in its kind"
    if info["reason"].startswith("position"):
        return f"{info['reason']} ({place})"
    return f"{info['reason']}; position {info['position']} of {info['queued']}"


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
            ("waiting", _waiting_text(data["waiting"]) if data.get("waiting") else None),
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


def _cpu_text(value: float | None) -> str:
    return "n/a (first sample pending)" if value is None else f"{value:.0f}%"


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
            # Older daemons report neither breakers nor budget; their lines are left out.
            ("breakers", _breakers_text(data["breakers"]) if "breakers" in data else None),
            ("budget", _budget_summary(data["budget"]) if data.get("budget") else None),
            (
                "system",
                f"memory {system.get('memory_percent', 0):.0f}% "
                f"({system.get('memory_available_gb', 0):.1f} GB free), "
                f"cpu {_cpu_text(system.get('cpu_percent'))}",
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
    if args.url:
        return _over_websocket(args, _watch_over_websocket)
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


def _breakers(args: argparse.Namespace) -> int:
    data = _call(args, "breakers")
    if args.json:
        _print_json(data)
        return EXIT_OK
    if not data:
        print("no services configured")
        return EXIT_OK
    rows = [
        [
            service,
            _breaker_state(view["state"]),
            _clock(view["open_until"]) if _is_open(view) else "-",
            f"{view['calls']:,}",
            f"{view['failures']:,}",
            f"{view['opened']:,}",
            f"{view['in_flight']:,}",
        ]
        for service, view in data.items()
    ]
    _print_table(
        ["SERVICE", "STATE", "OPEN UNTIL", "CALLS", "FAILURES", "OPENED", "IN FLIGHT"], rows
    )
    return EXIT_OK


def _breaker(args: argparse.Namespace) -> int:
    data = _call(args, "breaker", service=args.service, action=args.action)
    if args.json:
        _print_json(data)
        return EXIT_OK
    for service, view in data.items():
        print(f"breaker {service}: {_breaker_text(view)}")
    return EXIT_OK


def _ledger(args: argparse.Namespace) -> int:
    data = _call(args, "ledger", day=args.day, month=args.month, by=args.by)
    if args.json:
        _print_json(data)
        return EXIT_OK
    if not data["groups"]:
        print(f"no calls in {data['period']}")
        return EXIT_OK
    by = data["by"]
    rows = [
        [
            str(group[by]),
            f"{group['calls']:,}",
            f"{group['failed']:,}",
            _units(group["units"]),
            _money(group["usd"], 4),
        ]
        for group in data["groups"]
    ]
    _print_table([by.upper(), "CALLS", "FAILED", "UNITS", "USD"], rows)
    print(
        f"total {_money(data['usd'], 4)} for {_count(data['calls'], 'call')} "
        f"({data['failed_calls']:,} failed) over {_count(data['jobs'], 'job')} "
        f"in {data['period']}"
    )
    if data.get("usd_per_job") is not None:
        print(f"cost per job {_money(data['usd_per_job'], 4)}")
    if data.get("month_projection_usd") is not None:
        print(f"month projection {_money(data['month_projection_usd'], 2)}")
    return EXIT_OK


def _budget(args: argparse.Namespace) -> int:
    if args.action == "set":
        data = _call(args, "budget", action="set", daily_usd=args.daily, monthly_usd=args.monthly)
    else:
        data = _call(args, "budget", action=args.action or "show")
    if args.json:
        _print_json(data)
        return EXIT_OK
    daily, monthly = data["daily_usd"], data["monthly_usd"]
    today = _money(data["spent_today"], 4)
    if daily:
        today += f" of {_limit(daily)} ({_percent(data['spent_today'] / daily)})"
        today += f", {_money(data['remaining_today'], 2)} left"
    else:
        today += ", no limit"
    month = _money(data["spent_month"], 2)
    if monthly:
        month += f" of {_limit(monthly)} ({_percent(data['spent_month'] / monthly)})"
        month += f", {_money(data['remaining_month'], 2)} left"
    else:
        month += ", no limit"
    month += f", projection {_money(data['month_projection_usd'], 2)}"
    if data["stopped"]:
        state = f"STOPPED: {data['stop_reason']}" if data.get("stop_reason") else "STOPPED"
        if data.get("stopped_until") is not None:
            state += f", until {_datetime(data['stopped_until'])}"
    else:
        state = "spending"
    if data.get("override_today"):
        state += " (override for today)"
    # Alerts fire on the share of the daily limit spent, so without one they never do.
    alerts = ", ".join(_percent(at) for at in data.get("alert_at") or []) if daily else ""
    _print_fields(
        [
            ("today", today),
            ("month", month),
            ("reserved", f"{_money(data['reserved'], 4)} held for calls in flight"),
            ("alerts", f"at {alerts} of the daily limit" if alerts else None),
            ("state", state),
        ]
    )
    return EXIT_OK


def _users(args: argparse.Namespace) -> int:
    action = args.action or "list"
    options = {
        key: getattr(args, key, None)
        for key in ("credits", "daily_limit", "rate", "max_running", "change")
    }
    data = _call(
        args,
        "users",
        action=action,
        name=getattr(args, "name", None),
        **{key: value for key, value in options.items() if value is not None},
    )
    if args.json:
        _print_json(data)
        return EXIT_OK
    if action == "list":
        rows = [_user_row(user) for user in data["users"]]
        if not rows:
            print("no users")
            return EXIT_OK
        headers = ["USER", "CREDITS", "SPENT", "TODAY", "DAILY", "RATE", "RUNNING", "STATE"]
        _print_table(headers, rows)
        return EXIT_OK
    user = data["user"]
    _print_fields(
        [
            ("user", user["name"]),
            ("credits", _credits_text(user)),
            ("spent", str(user["spent"])),
            ("jobs today", str(user.get("jobs_today", 0))),
            ("daily limit", _own_limit(user.get("daily_limit"))),
            ("rate", user.get("rate") or "default"),
            ("max running", _own_limit(user.get("max_running"))),
            ("state", "disabled" if user["disabled"] else "enabled"),
            ("token", data.get("token") or ("set" if user["has_token"] else "none")),
        ]
    )
    if data.get("token"):
        print("the token is shown only now; the daemon keeps only its hash")
    return EXIT_OK


def _credits_text(user: dict[str, Any]) -> str:
    text = "unlimited" if user["credits"] is None else str(user["credits"])
    if user.get("reserved"):
        text += f" ({user['reserved']} reserved by queued and running jobs)"
    return text


def _own_limit(value: int | None) -> str:
    return "default" if value is None else ("none" if value == 0 else str(value))


def _user_row(user: dict[str, Any]) -> list[str]:
    return [
        user["name"],
        "unlimited" if user["credits"] is None else str(user["credits"]),
        str(user["spent"]),
        str(user.get("jobs_today", 0)),
        _own_limit(user.get("daily_limit")),
        user.get("rate") or "default",
        _own_limit(user.get("max_running")),
        "disabled" if user["disabled"] else "enabled",
    ]


# Talking to the daemon.


def _websocket_options(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--url",
        metavar="URL",
        help="the daemon's WebSocket, e.g. ws://127.0.0.1:8765, instead of the admin socket",
    )
    command.add_argument(
        "--token", metavar="TOKEN", help=f"your user token, for --url (default: ${ENV_TOKEN})"
    )

    def check(args: argparse.Namespace) -> None:
        if args.url is None:
            if args.token is not None:
                command.error("--token goes with --url")
            return
        if not re.match(r"wss?://[^/]", args.url):
            command.error(f"--url: expected ws://HOST:PORT or wss://HOST, got {args.url!r}")
        if getattr(args, "user", None) is not None:
            command.error("--user is for the admin socket; over --url the token says who you are")
        args.token = args.token or os.environ.get(ENV_TOKEN)
        if not args.token:
            command.error(f"--url needs your token: --token TOKEN, or ${ENV_TOKEN}")

    command.set_defaults(check=check)


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
            # An older daemon may read the job and its events apart: trust the events too.
            outcome = outcome or _outcome_of(event)
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


def _over_websocket(
    args: argparse.Namespace,
    run: Callable[[WebSocketClient, argparse.Namespace], Awaitable[int]],
) -> int:
    async def session() -> int:
        async with connect(args.url, args.token) as client:
            return await run(client, args)

    return trio.run(session)


async def _submit_over_websocket(client: WebSocketClient, args: argparse.Namespace) -> int:
    accepted = await client.submit(
        args.kind, args.payload, priority=args.priority, idempotency_key=args.idempotency_key
    )
    job = msgspec.to_builtins(accepted)
    existing = job.pop("existing", False)
    _print_submitted(args, {"job": job, "existing": existing})
    if not args.watch:
        return EXIT_OK
    return await _follow_over_websocket(client, accepted.id, as_json=args.json)


async def _watch_over_websocket(client: WebSocketClient, args: argparse.Namespace) -> int:
    if not args.all:
        return await _follow_over_websocket(client, args.job, as_json=args.json)
    async with client.watch_all() as watch:
        with _event_printer(None, as_json=args.json) as show_event:
            async for event in watch:
                show_event(msgspec.to_builtins(event))
    return EXIT_OK


async def _follow_over_websocket(client: WebSocketClient, job_id: int, *, as_json: bool) -> int:
    """Follow one job from its first event; the watch ends with the job's final status."""
    outcome = None
    async with client.watch(job_id) as watch:
        with _event_printer(watch.job, as_json=as_json) as show_event:
            async for event in watch:
                shown = msgspec.to_builtins(event)
                show_event(shown)
                outcome = _outcome_of(shown)
    assert outcome is not None, "a watch of one job ends with its final status"
    return _report_outcome(job_id, outcome, as_json=as_json)


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
            elif event["type"] == "position":
                progress.update(task, description=_waiting_text(data))
            elif event["type"] == "status":
                # A job may finish without reporting 100%; its bar should still end full.
                finished = data["status"] == "done"
                progress.update(task, status=data["status"], completed=1.0 if finished else None)
                progress.console.print(_event_line(event), markup=False, highlight=False)

        yield show_event


# Formatting.


def _job(data: Any) -> JobView:
    return msgspec.convert(data, JobView)


def _event_line(event: dict[str, Any]) -> str:
    if event["type"] == "breaker":
        return _describe_event(event)
    return f"job {event['job']} {_describe_event(event)}"


def _describe_event(event: dict[str, Any]) -> str:
    data = event["data"]
    if event["type"] == "breaker":
        until = f" until {_clock(data['open_until'])}" if data.get("open_until") else ""
        return f"breaker {data['service']} {data['state'].replace('_', '-')}{until}"
    if event["type"] == "progress":
        return " ".join(filter(None, ["progress", _percent(data["fraction"]), data.get("message")]))
    if event["type"] == "position":
        return f"waiting {_waiting_text(data)}"
    if event["type"] == "cost":
        outcome = "" if data["ok"] else " (failed)"
        return (
            f"cost {data['service']} {_money(data['usd'], 4)}{outcome}, "
            f"job total {_money(data['job_usd'], 4)}"
        )
    if event["type"] != "status":
        return f"{event['type']} {_json_text(data)}"
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


def _is_open(view: dict[str, Any]) -> bool:
    return view["state"] == "open" and view.get("open_until") is not None


def _breaker_state(state: str) -> str:
    return state.replace("_", "-")


def _breaker_text(view: dict[str, Any]) -> str:
    if _is_open(view):
        return f"open until {_clock(view['open_until'])}"
    return _breaker_state(view["state"])


def _breakers_text(breakers: dict[str, dict[str, Any]]) -> str:
    return ", ".join(f"{name} {_breaker_text(view)}" for name, view in breakers.items()) or "none"


def _budget_summary(budget: dict[str, Any]) -> str:
    text = _money(budget["spent_today"], 2)
    text += f" of {_limit(budget['daily_usd'])} today" if budget["daily_usd"] else " today"
    return text + (" — STOPPED" if budget["stopped"] else "")


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


def _money(usd: float, places: int) -> str:
    sign = "-" if usd < 0 else ""
    return f"{sign}${abs(usd):,.{places}f}"


def _limit(usd: float) -> str:
    """A limit as people write it: $500, $10,000, $12.50."""
    return f"${usd:,.0f}" if usd == int(usd) else f"${usd:,.2f}"


def _units(units: float | None) -> str:
    text = f"{units or 0:,.4f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


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
    return f"{_datetime(timestamp)} ({relative})"


def _datetime(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))


def _clock(timestamp: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(timestamp))


if __name__ == "__main__":
    sys.exit(main())
