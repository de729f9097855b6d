"""The kind every benchmark runs: a handler that does nothing, so the figures are the daemon's."""

from __future__ import annotations

from daemon.handlers import JobContext


async def noop(ctx: JobContext, payload: dict) -> None:
    return None
