"""A job's events as Server-Sent Events: `GET /v1/jobs/{id}/events`; every job's the caller
may see (a user's own, the operator's all, breaker changes too): `GET /v1/events`.

Each event is sent as

    id: <seq>
    event: <type>            (status, progress, position, cost)
    data: <the Event as JSON>

A client that reconnects sends the last `id` it got as `Last-Event-ID` (EventSource does so by
itself) and gets every event after it, each once, from the command layer's `follow`: the
stored events first, then live ones. Without one, the job's whole history comes first (every
job's stream: the events from now on).

A job's stream ends after a status event that leaves the job final (done, failed, canceled);
any stream ends when the daemon stops. A client that reads slower than its events come falls
behind the hub's buffer (`http.queue` events): it is sent `event: resync` with the seq to
resume after as its `id`, and the stream ends; reconnecting resumes there. With nothing to send for
`http.keepalive`, a comment line keeps proxies from closing the stream.

A job's log follows the same way (`GET /v1/jobs/{id}/logs?follow=1`): each line is sent as
`id: <line id>`, `event: log`, `data: <the LogLine as JSON>`, and once the job is final and
its every line sent, `event: end` with the job as it ended; Last-Event-ID resumes after a line.
"""

from __future__ import annotations

import contextlib

import msgspec
import structlog
import trio
from starlette.types import Receive, Scope, Send

from jobwarden.process.commands import Caller
from jobwarden.process.http.app import Context
from jobwarden.wire.views import TERMINAL_STATUSES, Event, LogLine

log = structlog.get_logger("http")

HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    # Proxies that buffer responses (nginx) would hold the events back.
    (b"x-accel-buffering", b"no"),
]
KEEPALIVE = b": keep-alive\n\n"


def frame(event: Event) -> bytes:
    return (
        f"id: {event.seq}\nevent: {event.type}\ndata: ".encode()
        + msgspec.json.encode(event)
        + b"\n\n"
    )


def resync_frame(since: int) -> bytes:
    return f'id: {since}\nevent: resync\ndata: {{"since": {since}}}\n\n'.encode()


class EventStream:
    """The ASGI response that streams one job's events (job None: every job's) to one client."""

    def __init__(self, context: Context, caller: Caller, job: int | None, since: int) -> None:
        self._context = context
        self._caller = caller
        self._job = job
        self._since = since
        self._lock = trio.Lock()
        self._last_write = trio.current_time()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
        self._send = send
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._stream, nursery.cancel_scope)
            nursery.start_soon(self._keep_alive)
            nursery.start_soon(self._until_disconnected, receive, nursery.cancel_scope)
            nursery.start_soon(self._until_stopping, nursery.cancel_scope)
        # The client may be gone already; then there is no one to tell the stream is over.
        with contextlib.suppress(OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _write(self, chunk: bytes) -> None:
        async with self._lock:
            await self._send({"type": "http.response.body", "body": chunk, "more_body": True})
            self._last_write = trio.current_time()

    async def _stream(self, done: trio.CancelScope) -> None:
        async def send_event(event: Event) -> None:
            await self._write(frame(event))
            final = event.type == "status" and event.data.get("status") in TERMINAL_STATUSES
            if final and self._job is not None:
                done.cancel()

        resume = await self._context.commands.follow(
            self._caller,
            send_event,
            since=self._since,
            job=self._job,
            buffer=self._context.settings.queue,
        )
        if resume is not None:
            log.info("event stream fell behind", job=self._job, since=resume)
            await self._write(resync_frame(resume))
        done.cancel()

    async def _keep_alive(self) -> None:
        interval = self._context.settings.keepalive
        while True:
            await trio.sleep_until(self._last_write + interval)
            if trio.current_time() >= self._last_write + interval:
                await self._write(KEEPALIVE)

    async def _until_disconnected(self, receive: Receive, done: trio.CancelScope) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        done.cancel()

    async def _until_stopping(self, done: trio.CancelScope) -> None:
        await self._context.stopping.wait()
        done.cancel()


async def event_stream(
    context: Context, caller: Caller, job: int | None, *, since: int | None
) -> EventStream:
    """The stream of `job`'s events (None: every job's the caller sees) after `since` (None:
    a job's from its start, every job's from now), once the caller is known to see the job
    (NOT_FOUND otherwise, before anything is streamed)."""
    start = await context.commands.start_watch(caller, job=job, since=since)
    return EventStream(context, caller, job, start.since)


class LogStream(EventStream):
    """The ASGI response that streams one job's log lines, then its end, to one client; `since`
    is the line id to go on after."""

    async def _stream(self, done: trio.CancelScope) -> None:
        async def send_line(line: LogLine) -> None:
            head = f"id: {line.id}\nevent: log\ndata: ".encode()
            await self._write(head + msgspec.json.encode(line) + b"\n\n")

        job = await self._context.commands.follow_logs(
            self._caller, send_line, self._job, after=self._since
        )
        await self._write(b"event: end\ndata: " + msgspec.json.encode(job) + b"\n\n")
        done.cancel()


async def log_stream(context: Context, caller: Caller, job: int, *, after: int) -> LogStream:
    """The stream of `job`'s log lines after line id `after`, once the caller is known to see
    the job (NOT_FOUND otherwise, before anything is streamed)."""
    await context.commands.logs(caller, job, after=after, limit=1)
    return LogStream(context, caller, job, after)
