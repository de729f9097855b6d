"""The WebSocket client: `connect` opens a user's WebSocket session on trio:

    async with connect("ws://127.0.0.1:8765", token) as client:
        job = await client.submit("storybook", {"title": "The brave otter"})
        async for event in client.watch(job.id):
            ...

A dropped connection is made again; requests in flight are sent again (a submit carries an
idempotency key and a submission id, so it never makes a second job, even when the first
one has finished meanwhile) and each watch resumes after the last event it received, so a
watcher sees every event once and in order.
"""

from __future__ import annotations

import itertools
import math
import random
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, suppress
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import msgspec
import trio
import trio_websocket
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    ConnectionTimeout,
    HandshakeError,
    WebSocketConnection,
)

from jobwarden.errors import DaemonError, DaemonUnreachable
from jobwarden.wire.views import (
    TERMINAL_STATUSES,
    BatchResult,
    BulkOutcome,
    ErrorBody,
    Event,
    JobFilter,
    JobStatus,
    JobView,
    LogLine,
    Submission,
)
from jobwarden.wire.websocket import WatchKey

# Waits between reconnection attempts: the first at once, then doubling up to the last.
RECONNECT_FIRST = 0.1
RECONNECT_MAX = 5.0
CLOSE_TIMEOUT = 2.0
MESSAGE_TOO_BIG = 1009


class Accepted(JobView):
    """A submitted job as the daemon accepted it (committed); `existing`: an earlier submission
    with the same idempotency key made it."""

    existing: bool = False


@asynccontextmanager
async def connect(
    url: str, token: str, *, reconnect_for: float = 60.0, timeout: float = 10.0
) -> AsyncIterator[WebSocketClient]:
    """A session with the daemon's WebSocket as the user whose token this is.

    The first connection must succeed: a refused handshake raises DaemonError (UNAUTHENTICATED
    for a wrong token, QUEUE_FULL when the daemon is full), no daemon there DaemonUnreachable.
    After that a lost connection is made again, for up to `reconnect_for` seconds of failed
    attempts (math.inf: forever); past that, requests and watches raise DaemonUnreachable.
    `timeout` bounds each connection attempt, not requests.
    """
    client = WebSocketClient(url, token, reconnect_for=reconnect_for, timeout=timeout)
    try:
        async with trio.open_nursery() as nursery:
            client._nursery = nursery
            await nursery.start(client._run)
            try:
                yield client
            finally:
                await client._close()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The client's own tasks keep their failures to themselves, so what escaped is the
        # caller's exception or the first connection's: raise it as itself.
        raise _sole(group) from None


class WebSocketClient:
    """One user's session; made by `connect`."""

    def __init__(self, url: str, token: str, *, reconnect_for: float, timeout: float) -> None:
        self.url = url
        self._headers = [(b"authorization", f"Bearer {token}".encode())]
        self._reconnect_for = reconnect_for
        self._timeout = timeout
        self._nursery: trio.Nursery
        self._ws: WebSocketConnection | None = None
        # Held while frames go out, so a request is never sent twice across a reconnection.
        self._sending = trio.Lock()
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._watches: dict[WatchKey, Watch] = {}
        # Requests that resume a watch: the client's own, not a caller's.
        self._resuming: dict[int, Watch] = {}
        # Watches being ended on the daemon: watching the same again waits for that.
        self._leaving: dict[WatchKey, trio.Event] = {}
        self._failure: Exception | None = None
        self._closing = False

    async def submit(
        self,
        kind: str,
        payload: Any = None,
        *,
        priority: int | None = None,
        idempotency_key: str | None = None,
        run_at: datetime | str | None = None,
        delay: timedelta | str | None = None,
        tags: list[str] | None = None,
        after: list[int] | None = None,
        after_any: bool = False,
        webhook: str | None = None,
    ) -> Accepted:
        """Submit a job. Without an idempotency key one is made up. Each call also sends a
        new submission id, so that the submit sent again after a reconnection finds the job
        its first sending made: by the key while that job is queued or running, by the
        submission id once it has finished. It never makes a second job; a later call with
        the key of a finished job is new work and does.

        `run_at` (an aware datetime or an RFC 3339 string) or `delay` ("10m" or a timedelta)
        starts it later; `tags` to find it by; `after`: your jobs it waits for, which must
        all be done unless `after_any` (see docs/scheduling.md)."""
        if isinstance(run_at, datetime):
            run_at = run_at.isoformat()
        if isinstance(delay, timedelta):
            delay = f"{delay.total_seconds():g}s"
        reply = await self._request(
            op="submit",
            kind=kind,
            payload={} if payload is None else payload,
            priority=priority,
            idempotency_key=idempotency_key or f"client-{uuid.uuid4().hex}",
            submission_id=uuid.uuid4().hex,
            run_at=run_at,
            delay=delay,
            tags=tags,
            after=after,
            after_any=after_any or None,
            webhook=webhook,
        )
        return msgspec.convert({**reply["job"], "existing": reply["existing"]}, Accepted)

    async def submit_many(self, items: list[Submission], *, atomic: bool = False) -> BatchResult:
        """Submit many jobs in one request, committed at once: each item's result in order
        (its job, or its refusal); `atomic`: all or none (DaemonError names the item that
        refused the batch). As with `submit`, an item without a key gets one made up, and
        each a new submission id, so a batch sent again after a reconnection makes no job
        twice."""
        sent = [
            msgspec.structs.replace(
                item,
                idempotency_key=item.idempotency_key or f"client-{uuid.uuid4().hex}",
                submission_id=uuid.uuid4().hex,
            )
            for item in items
        ]
        reply = await self._request(
            op="submit_many", items=msgspec.to_builtins(sent), atomic=atomic
        )
        return msgspec.convert(reply, BatchResult)

    async def cancel(self, job_id: int) -> JobView:
        reply = await self._request(op="cancel", job=job_id)
        return msgspec.convert(reply["job"], JobView)

    async def cancel_many(
        self, job_filter: JobFilter, *, dry_run: bool = False, show: int = 20
    ) -> BulkOutcome:
        """Cancel every queued or running job of yours that `job_filter` matches (`dry_run`:
        only say how many and which, the first `show` ids)."""
        reply = await self._request(
            op="cancel_many",
            filter=msgspec.to_builtins(job_filter),
            dry_run=dry_run,
            show=show,
        )
        return msgspec.convert(reply["outcome"], BulkOutcome)

    async def logs(self, job_id: int, *, after: int = 0) -> tuple[int, list[LogLine]]:
        """Up to 1000 of the job's log lines after line id `after`, and how many older
        lines were dropped to keep its log in bounds."""
        reply = await self._request(op="logs", job=job_id, after=after)
        return reply["dropped"], msgspec.convert(reply["lines"], list[LogLine])

    async def jobs(
        self,
        *,
        status: list[JobStatus] | None = None,
        kind: str | None = None,
        tag: str | None = None,
        limit: int = 50,
    ) -> list[JobView]:
        """The user's jobs, newest first (with `tag`: only those tagged so)."""
        reply = await self._request(op="jobs", status=status, kind=kind, tag=tag, limit=limit)
        return msgspec.convert(reply["jobs"], list[JobView])

    def watch(self, job_id: int, *, since: int | None = None) -> Watch:
        """A job's events after seq `since` (None: its whole history), then live ones; the
        iteration ends after the job's final status (done, failed or canceled) as it stands,
        not at an earlier one that a retry superseded: see `Watch._ends_with`."""
        return Watch(self, job_id, since)

    def watch_all(self, *, since: int | None = None) -> Watch:
        """Events of all the user's jobs after seq `since` (None: from now), without end."""
        return Watch(self, "all", since)

    # -- plumbing ---------------------------------------------------------------------------

    async def _request(self, **fields: Any) -> dict[str, Any]:
        if self._failure is not None:
            raise self._failure
        request_id = next(self._ids)
        frame = {name: value for name, value in fields.items() if value is not None}
        pending = _Pending(msgspec.json.encode({**frame, "id": request_id}).decode())
        async with self._sending:
            self._pending[request_id] = pending
            await self._send(pending.frame)
        try:
            reply = await pending.wait()
        finally:
            self._pending.pop(request_id, None)
        if reply.get("type") == "error":
            raise DaemonError(msgspec.convert(reply["error"], ErrorBody))
        return reply

    async def _send(self, frame: str) -> None:
        """Send on the current connection; a frame lost with it is sent again on the next."""
        if self._ws is None:
            return
        with suppress(ConnectionClosed):
            await self._ws.send_message(frame)

    async def _resume(self, watch: Watch) -> None:
        request_id = next(self._ids)
        self._resuming[request_id] = watch
        await self._send(watch._frame(request_id))

    async def _run(self, *, task_status: trio.TaskStatus[None]) -> None:
        started = False
        failing_since: float | None = None
        delay = 0.0
        while not self._closing:
            failure: Exception | None = None
            try:
                async with _websocket(self.url, self._headers, self._timeout) as ws:
                    await self._adopt(ws)
                    if not started:
                        started = True
                        task_status.started()
                    failing_since = None
                    connected_at = trio.current_time()
                    await self._read(ws)
                    # Only a connection that lasted resets the backoff: a daemon that drops
                    # every connection at once is not called again at once, forever.
                    if trio.current_time() - connected_at > RECONNECT_MAX:
                        delay = 0.0
            except (BaseExceptionGroup, ConnectionRejected, HandshakeError, OSError) as exc:
                failure = _connection_failure(self.url, exc, self._timeout)
                if failure is None:
                    raise
            finally:
                self._ws = None
            if failure is not None:
                if not started:
                    raise failure
                now = trio.current_time()
                failing_since = now if failing_since is None else failing_since
                retryable = not isinstance(failure, DaemonError) or failure.error.retryable
                if not retryable or now - failing_since >= self._reconnect_for:
                    self._fail(failure)
                    return
            await trio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(max(delay * 2, RECONNECT_FIRST), RECONNECT_MAX)

    async def _adopt(self, ws: WebSocketConnection) -> None:
        async with self._sending:
            self._ws = ws
            self._resuming.clear()
            for watch in list(self._watches.values()):
                if watch._confirmed:
                    await self._resume(watch)
            for request_id in sorted(self._pending):
                await self._send(self._pending[request_id].frame)

    async def _read(self, ws: WebSocketConnection) -> None:
        while True:
            try:
                frame = await ws.get_message()
            except ConnectionClosed:
                break
            self._dispatch(msgspec.json.decode(frame))
        if ws.closed is not None and ws.closed.code == MESSAGE_TOO_BIG:
            # Sent again, the frame that was too big would only close the next connection.
            refusal = DaemonError(
                ErrorBody(
                    code="PAYLOAD_TOO_LARGE",
                    message=f"the daemon closed the connection: {ws.closed.reason}",
                    retryable=False,
                )
            )
            for pending in self._pending.values():
                pending.fail(refusal)
            self._pending.clear()

    def _dispatch(self, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        if "seq" in frame:
            watch = self._watches.get(frame["watch"])
            if watch is not None:
                watch._deliver(frame)
            return
        if kind == "resync":
            watch = self._watches.get(frame["watch"])
            if watch is not None:
                self._nursery.start_soon(self._resume_alone, watch, self._ws)
            return
        if kind == "watching":
            watch = self._watches.get(frame["watch"])
            if watch is not None:
                watch._confirm(frame)
        request_id = frame.get("id")
        resumed = self._resuming.pop(request_id, None) if isinstance(request_id, int) else None
        if resumed is not None and kind == "error":
            resumed._fail(DaemonError(msgspec.convert(frame["error"], ErrorBody)))
        pending = self._pending.get(request_id) if isinstance(request_id, int) else None
        if pending is not None:
            pending.set(frame)

    async def _unwatch(self, key: WatchKey, done: trio.Event) -> None:
        try:
            await self._request(op="unwatch", **_target(key))
        except (DaemonError, DaemonUnreachable):
            pass  # the daemon ends the watch with the connection anyway
        finally:
            done.set()
            if self._leaving.get(key) is done:
                del self._leaving[key]

    async def _resume_alone(self, watch: Watch, ws: WebSocketConnection | None) -> None:
        async with self._sending:
            # A new connection has resumed every watch already.
            if self._ws is ws:
                await self._resume(watch)

    def _fail(self, failure: Exception) -> None:
        self._failure = failure
        for pending in self._pending.values():
            pending.fail(failure)
        self._pending.clear()
        for watch in list(self._watches.values()):
            watch._fail(failure)

    async def _close(self) -> None:
        self._closing = True
        if self._ws is not None:
            with trio.move_on_after(CLOSE_TIMEOUT):
                await self._ws.aclose()


class Watch:
    """Events of one job, or of all the user's jobs, as `async for event in watch`.

    `async with client.watch(job_id) as watch:` starts it at once (then `watch.job` is the job
    as it was) and ends it on exit; a plain `async for` starts it at its first step.
    """

    def __init__(self, client: WebSocketClient, key: WatchKey, since: int | None) -> None:
        self._client = client
        self._key = key
        self._since = since
        self.job: JobView | None = None
        # The seq of the job's newest event when `job` was read (None: no events, or a
        # daemon that does not say).
        self._newest: int | None = None
        self._last: int | None = since
        self._confirmed = False
        self._started = False
        self._finished = False
        # Unbounded: the reader must never wait on a slow consumer, or replies would wait too.
        self._events_in, self._events = trio.open_memory_channel[Event | Exception](math.inf)

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        client = self._client
        if self._key in client._watches:
            raise DaemonError(
                ErrorBody(
                    code="INVALID_REQUEST",
                    message=f"already watching {self} on this connection",
                    retryable=False,
                )
            )
        leaving = client._leaving.get(self._key)
        if leaving is not None:
            await leaving.wait()
        # Registered before asking: the first events follow the reply at once.
        client._watches[self._key] = self
        try:
            await client._request(op="watch", since=self._since, **_target(self._key))
        except BaseException:
            self._finish()
            raise

    async def aclose(self) -> None:
        self._finish()

    def __str__(self) -> str:
        return "all jobs" if self._key == "all" else f"job {self._key}"

    async def __aenter__(self) -> Watch:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __aiter__(self) -> Watch:
        return self

    async def __anext__(self) -> Event:
        await self.start()
        if self._finished:
            raise StopAsyncIteration
        item = await self._events.receive()
        if isinstance(item, Exception):
            self._finish()
            raise item
        if self._key != "all" and self._ends_with(item):
            self._finish()
        return item

    def _ends_with(self, event: Event) -> bool:
        """Whether `event` is the last of the job's: the `watching` reply read the job with
        the seq of its newest event in one snapshot. A final status before that seq was
        followed by a retry; at that seq, a job that was final then has reached its end; from
        it on, a final status is the end, as it is live."""
        final_status = event.type == "status" and event.data.get("status") in TERMINAL_STATUSES
        if self._newest is None or event.seq > self._newest:
            return final_status
        if event.seq < self._newest:
            return False
        return final_status or (self.job is not None and self.job.status in TERMINAL_STATUSES)

    def _frame(self, request_id: int) -> str:
        frame = {"op": "watch", **_target(self._key), "since": self._last, "id": request_id}
        return msgspec.json.encode(frame).decode()

    def _confirm(self, frame: dict[str, Any]) -> None:
        if not self._confirmed:
            self._confirmed = True
            self._last = frame["since"] if self._last is None else self._last
            self._newest = frame.get("newest")
            if frame.get("job") is not None:
                self.job = msgspec.convert(frame["job"], JobView)

    def _deliver(self, frame: dict[str, Any]) -> None:
        # A resumed watch replays from the last event received: anything older is a repeat.
        if self._last is not None and frame["seq"] <= self._last:
            return
        self._last = frame["seq"]
        try:
            event = msgspec.convert(frame, Event)
        except msgspec.ValidationError:
            return  # a type of event newer than this client: passed over, not a failure
        self._events_in.send_nowait(event)

    def _fail(self, failure: Exception) -> None:
        self._events_in.send_nowait(failure)

    def _finish(self) -> None:
        if self._finished:
            return
        self._finished = True
        client = self._client
        if client._watches.get(self._key) is self:
            del client._watches[self._key]
            if self._confirmed and not client._closing:
                done = client._leaving[self._key] = trio.Event()
                client._nursery.start_soon(client._unwatch, self._key, done)


class _Pending:
    """A request waiting for its reply, with the frame to send again after a reconnection."""

    def __init__(self, frame: str) -> None:
        self.frame = frame
        self._done = trio.Event()
        self._reply: dict[str, Any] = {}
        self._error: Exception | None = None

    def set(self, reply: dict[str, Any]) -> None:
        self._reply = reply
        self._done.set()

    def fail(self, error: Exception) -> None:
        self._error = error
        self._done.set()

    async def wait(self) -> dict[str, Any]:
        await self._done.wait()
        if self._error is not None:
            raise self._error
        return self._reply


def _target(key: WatchKey) -> dict[str, Any]:
    return {"all": True} if key == "all" else {"job": key}


@asynccontextmanager
async def _websocket(
    url: str, headers: list[tuple[bytes, bytes]], timeout: float
) -> AsyncIterator[WebSocketConnection]:
    """trio-websocket's open_websocket_url, except that a peer hanging up during the handshake
    fails it at once. The library would wait out the whole timeout for an answer that can no
    longer come, as it does on every attempt through a proxy whose daemon is down."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "wss" else 80)
    host = parts.hostname or ""
    resource = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    async with trio.open_nursery() as nursery:
        with trio.move_on_after(timeout) as handshake:
            if parts.scheme == "wss":
                tcp: trio.abc.Stream = await trio.open_ssl_over_tcp_stream(
                    host, port, https_compatible=True
                )
            else:
                tcp = await trio.open_tcp_stream(host, port)
            stream = _HangupAware(tcp, handshake)
            ws = await trio_websocket.wrap_client_stream(
                nursery,
                stream,
                host if port in (80, 443) else f"{host}:{port}",
                resource,
                extra_headers=headers,
            )
        if handshake.cancelled_caught:
            await tcp.aclose()
            if stream.hung_up:
                raise HandshakeError("the daemon closed the connection during the handshake")
            raise ConnectionTimeout
        try:
            yield ws
        finally:
            # The reader stays on, for a bounded time, to finish the closing handshake.
            nursery.cancel_scope.deadline = trio.current_time() + CLOSE_TIMEOUT
            await ws.aclose()


class _HangupAware(trio.abc.Stream):
    """A stream that cancels `handshake` when the peer hangs up."""

    def __init__(self, stream: trio.abc.Stream, handshake: trio.CancelScope) -> None:
        self._stream = stream
        self._handshake = handshake
        self.hung_up = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        try:
            await self._stream.send_all(data)
        except trio.BrokenResourceError:
            self._hang_up()
            raise

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        try:
            data = await self._stream.receive_some(max_bytes)
        except trio.BrokenResourceError:
            self._hang_up()
            raise
        if not data:
            self._hang_up()
        return data

    async def aclose(self) -> None:
        await self._stream.aclose()

    def _hang_up(self) -> None:
        self.hung_up = True
        self._handshake.cancel()


def _connection_failure(url: str, exc: BaseException, timeout: float) -> Exception | None:
    """Why a connection could not be made, as the caller should hear it; None when `exc` is
    not about making the connection."""
    leaves = list(_leaves(exc))
    for leaf in leaves:
        if isinstance(leaf, ConnectionRejected):
            return _refusal(leaf)
    for leaf in leaves:
        if isinstance(leaf, ConnectionTimeout):
            return DaemonUnreachable(url, f"no handshake within {timeout:g}s")
        if isinstance(leaf, HandshakeError):
            return DaemonUnreachable(url, str(leaf))
        if isinstance(leaf, OSError):
            # trio tries each address and says "all attempts failed", with why in a group.
            tries = leaf.__cause__
            refused = (
                isinstance(tries, BaseExceptionGroup) and not tries.split(ConnectionRefusedError)[1]
            )
            if isinstance(leaf, ConnectionRefusedError) or refused:
                return DaemonUnreachable(url, "connection refused", not_running=True)
            return DaemonUnreachable(url, leaf.strerror or str(leaf))
    return None


def _leaves(exc: BaseException) -> Iterator[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from _leaves(inner)
    else:
        yield exc


def _refusal(exc: ConnectionRejected) -> DaemonError:
    try:
        body = msgspec.json.decode(exc.body or b"", type=ErrorBody)
    except msgspec.DecodeError:
        # Not the daemon's answer: a proxy's, say, whose 502 or 503 passes.
        body = ErrorBody(
            code="UNAUTHENTICATED" if exc.status_code == 401 else "INTERNAL",
            message=f"the connection was refused with HTTP {exc.status_code}",
            retryable=exc.status_code >= 500,
        )
    return DaemonError(body)


def _sole(group: BaseExceptionGroup) -> BaseException:
    if len(group.exceptions) != 1:
        return group
    only = group.exceptions[0]
    return _sole(only) if isinstance(only, BaseExceptionGroup) else only
