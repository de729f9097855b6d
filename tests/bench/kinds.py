"""The kinds the benchmarks run: a handler that does nothing, so the figures are the daemon's,
and one that only reports progress, for the fan-out."""

from __future__ import annotations

import trio

from jobwarden.actors.handlers import JobContext


async def noop(ctx: JobContext, payload: dict) -> None:
    return None


async def progress(ctx: JobContext, payload: dict) -> None:
    """Reports progress `events` times, `interval` seconds apart."""
    events = payload["events"]
    for step in range(1, events + 1):
        await trio.sleep(payload["interval"])
        await ctx.progress(step / events)
