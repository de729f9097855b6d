"""What a user may type: the options every command takes, how a command is declared, and the
checked types of argument values (a bad value is a usage error that says what was expected)."""

from __future__ import annotations

import argparse
import datetime
import json
import math
import re
from collections.abc import Callable
from typing import Any, NoReturn, TypeAlias

from jobwarden.config import check_listen, parse_rate
from jobwarden.wire.views import STATUSES

Run = Callable[[argparse.Namespace], int]
Subcommands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


class UsageError(Exception):
    """What was typed is wrong; `parser` is the (sub)command whose usage it breaks, if one."""

    def __init__(self, message: str, parser: argparse.ArgumentParser | None = None) -> None:
        super().__init__(message)
        self.parser = parser


class Parser(argparse.ArgumentParser):
    """An ArgumentParser that raises its usage errors, so that `main` words them: as
    argparse does, or under --json in the common error shape. Its subcommands are Parsers
    too (argparse makes them of their parent's class)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message, self)


def global_options(*, in_subcommand: bool) -> argparse.ArgumentParser:
    # Accepted before and after the subcommand; in the subcommand they default to SUPPRESS so
    # that leaving them out there keeps what was given before it.
    def default(value: Any) -> Any:
        return argparse.SUPPRESS if in_subcommand else value

    options = argparse.ArgumentParser(add_help=False)
    options.add_argument(
        "--config",
        metavar="PATH",
        default=default(None),
        help="config file, to find the admin socket "
        "(default: $JOBWARDEN_CONFIG, ./config.toml, /etc/jobwarden/config.toml)",
    )
    options.add_argument(
        "--socket", metavar="PATH", default=default(None), help="admin socket, instead of config"
    )
    options.add_argument(
        "--json",
        action="store_true",
        default=default(False),
        help="print replies as JSON, and errors as JSON on stderr",
    )
    return options


def subcommand(
    parent: Subcommands, name: str, run: Run, summary: str, **option_help: str
) -> argparse.ArgumentParser:
    """A (sub)command that takes the global options after its name too; `option_help` says
    what one of them means to this command (e.g. socket="..." for `--socket`)."""
    sub = parent.add_parser(
        name, help=summary, description=summary, parents=[global_options(in_subcommand=True)]
    )
    for action in sub._actions:
        action.help = option_help.get(action.dest, action.help)
    sub.set_defaults(run=run)
    return sub


def json_object(text: str) -> dict[str, Any]:
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


def positive_int(text: str) -> int:
    if not text.isdecimal() or int(text) == 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def positive_number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction from 0 to 1, got {text!r}")
    return value


def day(text: str) -> str:
    return _date(text, "%Y-%m-%d", r"\d{4}-\d{2}-\d{2}", "a day as YYYY-MM-DD")


def month(text: str) -> str:
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


def usd(text: str) -> float:
    try:
        value = float(text.removeprefix("$").replace(",", ""))
    except ValueError:
        value = -1.0
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(
            f"expected an amount of USD like 500 or 12.50, got {text!r}"
        )
    return value


def credits(text: str) -> int | str:
    if text == "unlimited":
        return text
    if not text.isdecimal():
        raise argparse.ArgumentTypeError(
            f'expected a number of credits or "unlimited", got {text!r}'
        )
    return int(text)


def whole_number(text: str) -> int:
    if not text.isdecimal():
        raise argparse.ArgumentTypeError(f"expected a whole number, 0 or more, got {text!r}")
    return int(text)


def change(text: str) -> int:
    if not re.fullmatch(r"[+-]?\d+", text):
        raise argparse.ArgumentTypeError(f"expected a change like +50 or -10, got {text!r}")
    return int(text)


def _checked_by(check: Callable[[str], object]) -> Callable[[str], str]:
    """An argument type from the config's own check: the text as typed, or its complaint."""

    def checked(text: str) -> str:
        try:
            check(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return text

    return checked


rate = _checked_by(parse_rate)
listen_address = _checked_by(check_listen)


def words(text: str) -> list[str]:
    """Comma separated words (the daemon checks each)."""
    return [word.strip() for word in text.split(",") if word.strip()]


def job_ids(text: str) -> list[int]:
    """Comma separated job ids."""
    return [positive_int(word) for word in words(text)] or [positive_int(text)]


def statuses(text: str) -> list[str]:
    chosen = [status.strip() for status in text.split(",") if status.strip()]
    if not chosen or any(status not in STATUSES for status in chosen):
        raise argparse.ArgumentTypeError(
            f"expected statuses from {', '.join(STATUSES)}, got {text!r}"
        )
    return chosen


def add_status_option(command: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """`--status`, repeatable or comma separated, as `jobs` and the bulk actions take it."""
    command.add_argument(
        "--status",
        action="extend",
        type=statuses,
        metavar="S",
        help=f"only these statuses, repeatable or comma separated ({', '.join(STATUSES)})",
    )
