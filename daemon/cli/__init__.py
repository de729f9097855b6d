"""The `jobwarden` command: run the daemon, or talk to a running one over its admin socket.

One module per command group (server, jobs, kinds, breakers, costs, users, loadtest), each
adding its commands to the parser; `output` is how every reply is printed, `arguments` what a
user may type, `connection` how a command reaches the daemon, `watching` how jobs are followed.

Exit codes: 0 ok; 1 a watched job failed or was canceled, or the daemon refused a request;
2 a usage, argument or config error, or a reply saying the request was wrong
(INVALID_REQUEST, NOT_FOUND); 3 the daemon could not be reached.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from jobwarden import __version__
from jobwarden.cli import breakers, costs, jobs, kinds, loadtest, server, users
from jobwarden.cli.arguments import global_options
from jobwarden.cli.output import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    error_hints,
    error_text,
)
from jobwarden.client import DaemonError, DaemonUnreachable
from jobwarden.errors import ConfigError

# Replies that blame the request rather than the daemon.
USAGE_ERROR_CODES = frozenset({"INVALID_REQUEST", "NOT_FOUND"})
# In the order `jobwarden --help` lists their commands.
COMMAND_GROUPS = (server, jobs, kinds, breakers, costs, users, loadtest)


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
        print(f"error {error_text(exc.error)}{error_hints(exc.error)}", file=sys.stderr)
        return EXIT_USAGE if exc.error.code in USAGE_ERROR_CODES else EXIT_FAILED
    except KeyboardInterrupt:
        # Ctrl-C is how a person stops watching; the job itself keeps running.
        return EXIT_INTERRUPTED


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jobwarden",
        description="Run the jobwarden daemon, or manage its jobs over the admin socket.",
        parents=[global_options(in_subcommand=False)],
    )
    parser.add_argument("--version", action="version", version=f"jobwarden {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in COMMAND_GROUPS:
        group.add_commands(commands)
    return parser
