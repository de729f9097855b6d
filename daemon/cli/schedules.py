"""Schedules: the recurring jobs of [schedules.NAME], listed with their next and latest runs;
pause, resume or trigger one."""

from __future__ import annotations

import argparse
import time
from typing import Any

from jobwarden.cli.arguments import Subcommands, subcommand
from jobwarden.cli.connection import call
from jobwarden.cli.output import date_time, paint, print_fields, print_reply, print_table, when


def add_commands(commands: Subcommands) -> None:
    schedules = subcommand(
        commands, "schedules", _schedules, "list recurring schedules; pause, resume, trigger"
    )
    actions = schedules.add_subparsers(dest="action", metavar="ACTION")
    subcommand(actions, "list", _schedules, "list schedules with next and last run (default)")
    for name, summary in (
        ("pause", "fire none of NAME's slots until resumed (kept across restarts)"),
        ("resume", "fire NAME's slots again, from the next one (paused slots are not caught up)"),
        ("trigger", "run NAME once now, outside its slots"),
    ):
        subcommand(actions, name, _schedules, summary).add_argument("name", metavar="NAME")


def _schedules(args: argparse.Namespace) -> int:
    action = args.action or "list"
    data = call(args, "schedules", action=action, name=getattr(args, "name", None))
    shown = {"list": _print_schedules, "trigger": _print_triggered}.get(action, _print_schedule)
    return print_reply(args, data, shown)


def _print_schedules(data: dict[str, Any]) -> None:
    listed = data["schedules"]
    if not listed:
        print("no schedules configured")
        return
    now = time.time()
    rows = [
        [
            schedule["name"],
            f"{schedule['cron']} ({schedule['timezone']})",
            schedule["kind"],
            schedule["state"],
            date_time(schedule["next"]) if schedule.get("next") else "-",
            last_run_text(schedule.get("last"), now, short=True),
        ]
        for schedule in listed
    ]
    print_table(["SCHEDULE", "CRON", "KIND", "STATE", "NEXT", "LAST RUN"], rows)


def _print_schedule(data: dict[str, Any]) -> None:
    schedule = data["schedule"]
    now = time.time()
    print_fields(
        [
            ("schedule", schedule["name"]),
            ("cron", f"{schedule['cron']} ({schedule['timezone']})"),
            ("kind", schedule["kind"]),
            ("user", schedule["user"]),
            ("state", schedule["state"]),
            ("next", when(schedule["next"], now) if schedule.get("next") else None),
            ("last run", last_run_text(schedule.get("last"), now, short=False)),
        ]
    )


def _print_triggered(data: dict[str, Any]) -> None:
    job = data["job"]
    print(f"job {job['id']} {paint(job['status'])} (schedule {job['schedule']})")


def last_run_text(run: dict[str, Any] | None, now: float, *, short: bool) -> str:
    """A schedule's latest run: when, and its job and status, or why the slot made none."""
    if run is None:
        return "never"
    moment = date_time(run["at"]) if short else when(run["at"], now)
    how = "triggered" if run.get("slot") is None else "slot"
    if run.get("job") is not None:
        status = paint(run["status"]) if run.get("status") else "pruned"
        return f"{moment} {how}: job {run['job']} {status}"
    return f"{moment} {how} skipped: {run.get('skipped')}"
