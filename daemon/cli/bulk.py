"""Bulk actions: `cancel` and `retry` of every job a filter matches, instead of one JOB.

`jobwarden retry --status failed --code SERVICE_FAILED --since 1h` first asks the daemon how
many jobs match and which (a dry run); `--dry-run` stops there. On a terminal the command then
asks for confirmation; `--yes` skips the question, and without a terminal to ask on, `--yes`
is required. The daemon then acts a bounded batch per store write and says how many jobs it
changed, and how many matched but could not be changed (they moved on meanwhile, or a retry
was refused), by code.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import msgspec

from jobwarden.cli.arguments import UsageError, add_status_option, whole_number
from jobwarden.cli.connection import client
from jobwarden.cli.output import EXIT_FAILED, EXIT_OK, count, print_json
from jobwarden.config import parse_duration
from jobwarden.wire.views import BulkOutcome, JobFilter

VERBS = {"cancel": "canceled", "retry": "queued again"}
FILTER_OPTIONS = ("status", "kind", "user", "tag", "code", "since", "older_than")


def duration(text: str) -> float:
    try:
        seconds = float(parse_duration(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if not 0 < seconds < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a duration longer than 0, got {text!r}")
    return seconds


def add_filter_options(command: argparse.ArgumentParser, action: str) -> None:
    """The filter that takes the place of JOB, and how the bulk action is confirmed."""
    group = command.add_argument_group(f"{action} every job that matches (instead of JOB)")
    add_status_option(group)
    group.add_argument("--kind", metavar="K")
    group.add_argument("--user", metavar="U")
    group.add_argument("--tag", metavar="T", help="tagged so")
    group.add_argument("--code", metavar="CODE", help="the reason of its status: an error code")
    group.add_argument(
        "--since", type=duration, metavar="AGE", help="whose status changed within AGE, e.g. 1h"
    )
    group.add_argument(
        "--older-than", type=duration, metavar="AGE", help="created more than AGE ago"
    )
    group.add_argument(
        "--dry-run", action="store_true", help="say how many jobs match and which; change none"
    )
    group.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    group.add_argument(
        "--show", type=whole_number, default=20, metavar="N", help="list the first N ids (20)"
    )


def check_target(args: argparse.Namespace) -> None:
    """JOB, or a filter: one of the two."""
    filtered = any(getattr(args, option) is not None for option in FILTER_OPTIONS)
    if args.job is not None and (filtered or args.dry_run or args.yes):
        raise UsageError("give a JOB or a filter (--status, --kind, ...), not both")
    if args.job is None and not filtered:
        raise UsageError(
            "give a JOB, or a filter: --status, --kind, --user, --tag, --code, --since, ..."
        )


def run_bulk(args: argparse.Namespace, action: str) -> int:
    job_filter = JobFilter(**{option: getattr(args, option) for option in FILTER_OPTIONS})
    request = {"filter": msgspec.to_builtins(job_filter), "show": args.show}
    with client(args) as admin:
        preview = _outcome(admin.call(f"{action}_many", dry_run=True, **request))
        if args.dry_run:
            return _report(args, preview)
        if not args.yes:
            if not sys.stdin.isatty():
                raise UsageError(f"{action} by filter asks for confirmation: add --yes to run it")
            if preview.matched == 0:
                return _report(args, preview)
            _say_preview(preview)
            answer = input(f"{action} {count(preview.matched, 'job')}? [y/N] ")
            if answer.strip().lower() not in ("y", "yes"):
                print("nothing changed")
                return EXIT_FAILED
        return _report(args, _outcome(admin.call(f"{action}_many", **request)))


def _outcome(data: Any) -> BulkOutcome:
    return msgspec.convert(data, BulkOutcome)


def _ids(outcome: BulkOutcome, total: int) -> str:
    listed = ", ".join(str(job_id) for job_id in outcome.ids)
    more = total - len(outcome.ids)
    return listed + (f" and {more} more" if more > 0 and listed else "")


def _say_preview(outcome: BulkOutcome) -> None:
    print(f"{count(outcome.matched, 'job')} match" + (": " if outcome.ids else ""), end="")
    print(_ids(outcome, outcome.matched))


def _report(args: argparse.Namespace, outcome: BulkOutcome) -> int:
    if args.json:
        print_json(outcome)
        return EXIT_OK
    if outcome.dry_run:
        _say_preview(outcome)
        return EXIT_OK
    print(f"{count(outcome.changed, 'job')} {VERBS[outcome.action]}", end="")
    print(f": {_ids(outcome, outcome.changed)}" if outcome.ids else "")
    for code, refused in sorted(outcome.refused.items()):
        print(f"{count(refused, 'job')} not {VERBS[outcome.action]}: {code}")
    return EXIT_OK
