"""`logs JOB [-f]`: what a job wrote besides its protocol, and, with -f, what it writes next,
until it is final. Over the admin socket, or a user's WebSocket (--url) for their own jobs."""

from __future__ import annotations

import argparse
from typing import Any

import msgspec

from jobwarden.cli.arguments import Subcommands, UsageError, positive_int, subcommand
from jobwarden.cli.connection import client, over_websocket, websocket_options
from jobwarden.cli.output import EXIT_OK, clock, print_json_line
from jobwarden.client import WebSocketClient
from jobwarden.logs import printable

# What one `logs` answer carries at most: a shorter page is the end of what is kept.
PAGE = 1000


def add_commands(commands: Subcommands) -> None:
    logs = subcommand(commands, "logs", _logs, "show a job's log: its output and what it logged")
    logs.add_argument("job", type=positive_int, metavar="JOB")
    logs.add_argument(
        "-f", "--follow", action="store_true", help="then follow it until the job is final"
    )
    websocket_options(logs)


def _logs(args: argparse.Namespace) -> int:
    if args.url:
        return over_websocket(args, _logs_over_websocket)
    with client(args) as admin:
        if args.follow:
            for item in admin.follow_logs(args.job):
                _show(args, item)
            return EXIT_OK
        after, first = 0, True
        while True:
            page = admin.call("logs", job=args.job, after=after)
            if first:
                _show(args, {"dropped": page["dropped"]})
                first = False
            for line in page["lines"]:
                _show(args, line)
                after = line["id"]
            if len(page["lines"]) < PAGE:
                return EXIT_OK


async def _logs_over_websocket(websocket: WebSocketClient, args: argparse.Namespace) -> int:
    if args.follow:
        raise UsageError("-f is for the admin socket; over --url, leave it out")
    after, first = 0, True
    while True:
        dropped, lines = await websocket.logs(args.job, after=after)
        if first:
            _show(args, {"dropped": dropped})
            first = False
        for line in lines:
            _show(args, msgspec.to_builtins(line))
            after = line.id
        if len(lines) < PAGE:
            return EXIT_OK


def _show(args: argparse.Namespace, item: dict[str, Any]) -> None:
    """One item of a log as it comes: a line, how many lines were dropped before, or the end."""
    if args.json:
        print_json_line(item)
    elif "dropped" in item:
        if item["dropped"]:
            print(f"[{item['dropped']} lines dropped]")
    elif "ended" in item:
        print(f"[job {args.job} {item['ended']['status']}]", flush=True)
    else:
        # The daemon made the line printable; a client of a daemon it does not trust makes
        # sure of it.
        print(f"{clock(item['at'])} {item['stream']:<6} {printable(item['line'])}", flush=True)
