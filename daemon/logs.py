"""structlog set-up: one event per line, JSON for journald and files, colours on a terminal.

A log call never takes the daemon down and a client never sizes its lines:

- no traceback is rendered with its frames' locals (they hold tokens and payloads), and none
  through rich: exceptions are plain text, as `traceback` formats them;
- a processor or renderer that fails still leaves one minimal line (event, level, ts and what
  went wrong), and a stream that cannot be written drops the line rather than raise;
- text a client sent is cut to `CLIENT_TEXT` characters with `clip` where it is logged, and
  every field, whoever wrote it, to `FIELD_TEXT`; a line is at most `LINE_BYTES`.

Under systemd, when stdout is the journal's stream (JOURNAL_STREAM names it), each line starts
with its syslog priority, `<N>` (sd-daemon(3)), so `journalctl -p warning` filters by level.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import time
from datetime import UTC, datetime
from typing import Any, TextIO

import structlog

from jobwarden.clock import WallClock

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
# The syslog priority of each structlog level (sd-daemon(3), SYSLOG_PRIORITY).
PRIORITIES = {
    "debug": 7,
    "info": 6,
    "warning": 4,
    "warn": 4,
    "error": 3,
    "exception": 3,
    "critical": 2,
    "fatal": 2,
}
# What a log line keeps of text a client sent: a kind name, a message quoting a request.
CLIENT_TEXT = 200
# What it keeps of any one field; a traceback keeps its end, where the exception was raised.
FIELD_TEXT = 4000
LINE_BYTES = 16 * 1024

_clock: WallClock | None = None


def use_clock(clock: WallClock | None) -> None:
    """Stamp log lines with the daemon's clock, so they agree with job times in tests too."""
    global _clock
    _clock = clock


def clip(text: object, limit: int = CLIENT_TEXT) -> str:
    """`text` as a string of at most about `limit` characters, saying how much was cut."""
    text = text if isinstance(text, str) else str(text)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}…[{len(text) - limit} more chars]"


# C0 and C1 control characters and DEL, tab aside: what could move a terminal's cursor,
# change its colours or its title.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """`text` with every control character but tab written out as an escape (ESC as \\x1b),
    so that text from a job or a client cannot drive the terminal it is shown on."""
    return _CONTROL.sub(lambda match: f"\\x{ord(match[0]):02x}", text)


def _clip_tail(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return f"[{len(text) - limit} chars before]…{text[-limit:]}"


def _now() -> float:
    if _clock is not None:
        # Inside the daemon's trio.run, its clock; outside (before it starts, after it ended,
        # as when it could not start) there is no trio clock, and the system's is the truth.
        with contextlib.suppress(RuntimeError):
            return _clock.now()
    return time.time()


def _timestamp(logger: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
    event["ts"] = datetime.fromtimestamp(_now(), UTC).isoformat(timespec="milliseconds")
    return event


def _bound_fields(logger: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
    for key, value in event.items():
        if isinstance(value, str) and len(value) > FIELD_TEXT:
            event[key] = (
                _clip_tail(value, FIELD_TEXT) if key == "exception" else clip(value, FIELD_TEXT)
            )
        elif key == "traceback" and isinstance(value, str):
            event[key] = _clip_tail(value, FIELD_TEXT)
    return event


def _fallback_line(method: str, event: dict[str, Any], failure: BaseException) -> dict[str, Any]:
    """The line a log call leaves when its processing failed: nothing a renderer can trip on."""
    return {
        "event": clip(event.get("event", ""), CLIENT_TEXT),
        "level": method,
        "ts": datetime.fromtimestamp(_now(), UTC).isoformat(timespec="milliseconds"),
        "log_error": f"{type(failure).__name__}: {clip(failure, CLIENT_TEXT)}",
    }


class _NeverRaising:
    """The processor chain as one processor that never raises: a failure of any step (a
    renderer, a field that cannot be shown) turns into a minimal line rendered as JSON."""

    def __init__(self, processors: list[Any], *, prefix_priority: bool) -> None:
        self._processors = processors
        self._prefix_priority = prefix_priority
        self._json = structlog.processors.JSONRenderer()

    def __call__(self, logger: Any, method: str, event: dict[str, Any]) -> str:
        original = dict(event)
        try:
            rendered: Any = event
            for processor in self._processors:
                rendered = processor(logger, method, rendered)
            line = str(rendered)
            if len(line) > LINE_BYTES:
                raise ValueError(f"a line of {len(line)} characters")
        except structlog.DropEvent:
            raise
        except Exception as failure:
            line = self._json(logger, method, _fallback_line(method, original, failure))
        if self._prefix_priority:
            line = f"<{PRIORITIES.get(method, 6)}>{line}"
        return line


class LineWriter:
    """A structlog logger that writes each line to a stream and never raises: a line the
    stream will not take (a closed pipe, a full disk) is lost, and the daemon goes on."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def msg(self, message: str) -> None:
        try:
            try:
                self._stream.write(message + "\n")
            except UnicodeEncodeError:
                encoding = getattr(self._stream, "encoding", None) or "utf-8"
                safe = message.encode(encoding, "backslashreplace").decode(encoding)
                self._stream.write(safe + "\n")
            self._stream.flush()
        except (OSError, ValueError):
            # Nowhere left to say so: the log itself is what failed.
            return

    debug = info = warning = warn = error = critical = exception = fatal = failure = msg
    log = msg


def on_journal(stream: Any, environ: dict[str, str] | os._Environ[str] = os.environ) -> bool:
    """Whether `stream` is the journal's: JOURNAL_STREAM holds the "device:inode" of the
    stream systemd connected, to be compared with the descriptor's own (systemd.exec(5))."""
    named = environ.get("JOURNAL_STREAM", "")
    device, _, inode = named.partition(":")
    try:
        status = os.fstat(stream.fileno())
        return (status.st_dev, status.st_ino) == (int(device), int(inode))
    except (AttributeError, OSError, ValueError):
        return False


def configure_logging(format: str = "auto", level: str = "info", stream: Any = None) -> None:
    stream = stream or sys.stdout
    as_json = format == "json" or (format == "auto" and not stream.isatty())
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if as_json
        else structlog.dev.ConsoleRenderer(
            colors=stream.isatty(), exception_formatter=structlog.dev.plain_traceback
        )
    )
    steps: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        _timestamp,
        structlog.processors.StackInfoRenderer(),
        # A traceback as plain text, never a dict of frames with their locals.
        structlog.processors.format_exc_info,
        _bound_fields,
        renderer,
    ]
    writer = LineWriter(stream)
    structlog.configure(
        processors=[_NeverRaising(steps, prefix_priority=on_journal(stream))],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.ERROR)),
        logger_factory=lambda *args: writer,
        cache_logger_on_first_use=False,
    )
