"""Following events as a watcher sees them: the stored ones after a seq, then live ones from
the hub, in seq order and each once. The admin socket's and the WebSocket's `watch` share it.

The subscription is taken before the store is read, so an event committed in between is in
both and is sent once; a live event at or below the last seq sent is such a twin.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial

from jobwarden.hub import EventHub
from jobwarden.store import jobs
from jobwarden.store.engine import Store
from jobwarden.wire.views import Event

# Stored events read per query while catching up.
PAGE = 1000


async def start_seq(store: Store, *, job: int | None, since: int | None) -> int:
    """Where a watch starts when the client named no seq: a job's whole history, or, for a
    watch of many jobs, now."""
    if since is not None:
        return since
    return 0 if job is not None else await store.read(jobs.last_seq)


async def follow(
    store: Store,
    hub: EventHub,
    send: Callable[[Event], Awaitable[None]],
    *,
    since: int,
    job: int | None = None,
    user: str | None = None,
    buffer: int = 256,
) -> int | None:
    """Send every event after `since` that matches `job` and `user`, until the watcher falls
    behind the hub's buffer of `buffer` events: then return the last seq sent, from which the
    caller catches up again or tells its client to. None: the hub ended the stream otherwise."""
    last = since
    with hub.subscribe(job=job, user=user, buffer=buffer) as sub:
        while True:
            backlog = await store.read(
                partial(jobs.events_since, since=last, job=job, user=user, limit=PAGE)
            )
            for event in backlog:
                await send(event)
                last = event.seq
            if len(backlog) < PAGE:
                break
        async for event in sub.events:
            if event.seq <= last:
                continue
            await send(event)
            last = event.seq
        return last if sub.overflowed else None
