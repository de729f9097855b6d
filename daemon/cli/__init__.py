"""The `jobwarden` command: run the daemon, or talk to a running one over its admin socket.

One module per command group (server, store, jobs, kinds, schedules, breakers, costs, users,
tokens, loadtest, completion), each adding its commands to the parser; `output` is how every
reply is printed, `arguments` what a user may type, `connection` how a command reaches the
daemon, `watching` how jobs are followed.

Exit codes: 0 ok; 1 a watched job failed or was canceled, or the daemon refused a request;
2 a usage, argument or config error, or a reply saying the request was wrong
(INVALID_REQUEST, NOT_FOUND); 3 the daemon could not be reached; 141 (128 + SIGPIPE) the
reader of the output went away, as `jobwarden jobs | head -1` does. Under --json every error
is one JSON line on stderr, in the common error shape.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from jobwarden import __version__
from jobwarden.cli import (
    breakers,
    completion,
    costs,
    jobs,
    kinds,
    loadtest,
    logs,
    schedules,
    server,
    store,
    tokens,
    users,
)
from jobwarden.cli.arguments import Parser, UsageError, global_options
from jobwarden.cli.output import (
    EXIT_CLOSED_PIPE,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    error_hints,
    error_text,
    print_error,
)
from jobwarden.client import DaemonError, DaemonUnreachable
from jobwarden.errors import ConfigError
from jobwarden.wire.views import ErrorBody

# Replies that blame the request rather than the daemon.
USAGE_ERROR_CODES = frozenset({"INVALID_REQUEST", "NOT_FOUND"})
# In the order `jobwarden --help` lists their commands.
COMMAND_GROUPS = (
    server,
    store,
    jobs,
    logs,
    kinds,
    schedules,
    breakers,
    costs,
    users,
    tokens,
    loadtest,
    completion,
)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        code = _run(list(sys.argv[1:] if argv is None else argv))
        # Output into a pipe is buffered: a reader that left shows here, not at exit.
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        # The reader has what it wanted (`jobwarden show 4 | head -3`): stop quietly, and
        # leave Python nothing to flush at exit into the closed pipe.
        _discard_stdout()
        return EXIT_CLOSED_PIPE


def _run(argv: list[str]) -> int:
    # Asked before parsing, so that a usage error is worded as the caller asked too.
    as_json = "--json" in argv[: argv.index("--")] if "--" in argv else "--json" in argv
    try:
        args = build_parser().parse_args(argv)
        # Checks across arguments that argparse cannot express; they fail like its own.
        if hasattr(args, "check"):
            args.check(args)
        return args.run(args)
    except SystemExit as exc:
        # --help and --version exit through argparse; callers of main() get the code.
        return int(exc.code or 0)
    except UsageError as exc:
        if exc.parser is not None and not as_json:
            exc.parser.print_usage(sys.stderr)
        print_error(
            ErrorBody("INVALID_REQUEST", str(exc), retryable=False),
            f"{exc.parser.prog if exc.parser else 'jobwarden'}: error: {exc}",
            as_json=as_json,
        )
        return EXIT_USAGE
    except ConfigError as exc:
        print_error(
            ErrorBody("INVALID_CONFIG", str(exc), retryable=False),
            f"error: {exc}",
            as_json=as_json,
        )
        return EXIT_USAGE
    except DaemonUnreachable as exc:
        # Retryable: a daemon that is starting, or restarting, answers soon.
        print_error(
            ErrorBody("UNREACHABLE", str(exc), retryable=True),
            f"error: {exc}",
            as_json=as_json,
        )
        return EXIT_UNREACHABLE
    except DaemonError as exc:
        print_error(
            exc.error, f"error {error_text(exc.error)}{error_hints(exc.error)}", as_json=as_json
        )
        return EXIT_USAGE if exc.error.code in USAGE_ERROR_CODES else EXIT_FAILED
    except KeyboardInterrupt:
        # Ctrl-C is how a person stops watching; the job itself keeps running.
        return EXIT_INTERRUPTED


def _discard_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        # Not a real file (a test's capture): it has nothing left to flush at exit.
        pass


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="jobwarden",
        description="Run the jobwarden daemon, or manage its jobs over the admin socket.",
        parents=[global_options(in_subcommand=False)],
    )
    parser.add_argument("--version", action="version", version=f"jobwarden {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in COMMAND_GROUPS:
        group.add_commands(commands)
    return parser
