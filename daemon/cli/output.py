"""What the CLI prints and the code it exits with: the one way a reply becomes JSON or text,
tables, fields, and the shared wording of money, spans, times and errors."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

import msgspec
from rich import box
from rich.color import ColorSystem
from rich.console import Console
from rich.style import Style
from rich.table import Table
from rich.text import Text

from jobwarden.wire.views import ErrorBody

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_INTERRUPTED = 130
# 128 + SIGPIPE: what a shell reports for a Unix tool whose reader went away.
EXIT_CLOSED_PIPE = 141

Reply = TypeVar("Reply")

# How each status looks on a terminal; in a pipe or a file a status is a plain word.
STATUS_STYLES = {
    "queued": "yellow",
    "running": "cyan",
    "done": "green",
    "failed": "bold red",
    "canceled": "magenta",
}


def paint(status: str) -> str:
    """`status` in its colour when stdout is a terminal that takes colour (NO_COLOR unset,
    TERM not dumb); otherwise as it is."""
    style = STATUS_STYLES.get(status)
    if style is None or not _colour_terminal():
        return status
    return Style.parse(style).render(status, color_system=ColorSystem.STANDARD)


def _colour_terminal() -> bool:
    return (
        sys.stdout.isatty()
        and not os.environ.get("NO_COLOR")
        and os.environ.get("TERM", "dumb") != "dumb"
    )


def print_reply(args: argparse.Namespace, reply: Reply, show: Callable[[Reply], None]) -> int:
    """`reply` as JSON under --json, for programs; otherwise as `show` words it for a person."""
    if args.json:
        print_json(reply)
    else:
        show(reply)
    return EXIT_OK


def print_json(data: Any) -> None:
    print(json_text(data, indent=2))


def print_json_line(data: Any) -> None:
    print(msgspec.json.encode(data).decode(), flush=True)


def json_text(data: Any, indent: int = 0) -> str:
    return msgspec.json.format(msgspec.json.encode(data), indent=indent).decode()


def print_fields(fields: list[tuple[str, str | None]]) -> None:
    """Label and value lines, values aligned; a value of None leaves its line out."""
    shown = [(label, value) for label, value in fields if value is not None]
    width = max(len(label) for label, _ in shown)
    for label, value in shown:
        print(f"{label.ljust(width)}  {value}")


def print_table(headers: list[str], rows: list[list[str]]) -> None:
    if sys.stdout.isatty():
        table = Table(*headers, box=box.SIMPLE)
        for row in rows:
            # Text, not markup: kinds and messages are user data; from_ansi keeps the
            # colours `paint` gave.
            table.add_row(*(Text.from_ansi(cell) for cell in row))
        Console().print(table)
        return
    widths = [max(len(line[column]) for line in [headers, *rows]) for column in range(len(headers))]
    for line in [headers, *rows]:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        )


def print_error(error: ErrorBody, text: str, *, as_json: bool) -> None:
    """An error on stderr: for programs (--json) the common error shape on one line, for a
    person `text`."""
    print(msgspec.json.encode(error).decode() if as_json else text, file=sys.stderr)


def error_text(error: ErrorBody) -> str:
    return f"{error.code}: {error.message}"


def error_hints(error: ErrorBody) -> str:
    hints = []
    if error.retry_after is not None:
        hints.append(f"retry in {span(error.retry_after)}")
    elif error.retryable:
        hints.append("retryable")
    if error.code == "INTERNAL" and error.error_id:
        # The id finds the full story in the daemon's log.
        hints.append(f"error id {error.error_id}")
    return f" ({'; '.join(hints)})" if hints else ""


def money(usd: float, places: int) -> str:
    sign = "-" if usd < 0 else ""
    return f"{sign}${abs(usd):,.{places}f}"


def limit(usd: float) -> str:
    """A limit as people write it: $500, $10,000, $12.50."""
    return f"${usd:,.0f}" if usd == int(usd) else f"${usd:,.2f}"


def units(amount: float | None) -> str:
    text = f"{amount or 0:,.4f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def count(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def percent(fraction: float) -> str:
    return f"{fraction * 100:.0f}%"


def span(seconds: float) -> str:
    """A short human span: 45s, 12m, 3h, 2d."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{max(int(seconds), 0)}s"


def when(timestamp: float, now: float) -> str:
    relative = f"in {span(timestamp - now)}" if timestamp > now else f"{span(now - timestamp)} ago"
    return f"{date_time(timestamp)} ({relative})"


def date_time(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))


def clock(timestamp: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(timestamp))
