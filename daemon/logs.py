"""structlog set-up: one event per line, JSON for journald and files, colours on a terminal."""

from __future__ import annotations

import contextlib
import logging
import sys
from datetime import UTC, datetime
from typing import Any

import structlog

from jobwarden.clock import WallClock

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}
_clock: WallClock | None = None


def use_clock(clock: WallClock | None) -> None:
    """Stamp log lines with the daemon's clock, so they agree with job times in tests too."""
    global _clock
    _clock = clock


def _timestamp(logger: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
    if _clock is not None:
        # Outside trio.run there is no clock to read; the line goes out unstamped.
        with contextlib.suppress(RuntimeError):
            event["ts"] = datetime.fromtimestamp(_clock.now(), UTC).isoformat(
                timespec="milliseconds"
            )
    return event


def configure_logging(format: str = "auto", level: str = "info", stream: Any = None) -> None:
    stream = stream or sys.stdout
    as_json = format == "json" or (format == "auto" and not stream.isatty())
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if as_json
        else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            _timestamp,
            structlog.processors.dict_tracebacks
            if as_json
            else structlog.processors.StackInfoRenderer(),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.ERROR)),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
