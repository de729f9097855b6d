"""The WebSocket listener (trio-websocket): users submit, watch, cancel and list their own
jobs over JSON text frames, and follow progress live.

The handshake carries a user token, in `Authorization: Bearer <token>` or, for browsers that
cannot set headers, `?token=<token>`. A missing or wrong token is refused with HTTP 401, a page
from an Origin not allowed with 403, a full listener with 503; the body is the common error
shape. Frames are the ops in jobwarden.wire.websocket, each answered with the same id; what
they mean is the command layer's (jobwarden.process.commands), asked as the token's user, who
sees only their own jobs: anyone else's is NOT_FOUND, and the breaker's events (job 0, no
user) never reach a user.

A session lasts as long as its token admits it: `users token` (a new token) and `users
disable` end the user's open sessions, closed with 1008 and the reason ("token revoked",
"user disabled"). A text frame that is not valid UTF-8 closes the connection with 1007, and
any other frame the protocol forbids with 1002, each with a close frame that says so (see
`_close_frame_on_protocol_failure`).

Backpressure: a connection has one bounded outbox, drained into the socket by one writer. A
watch whose events stop fitting, because the client reads too slowly, falls behind the hub's
bounded buffer; it is then sent `resync` with the seq it got to and ends, and the client
watches again from there. A client never grows the daemon's memory.
"""

from __future__ import annotations

import contextlib
import math
from functools import partial
from typing import Any
from urllib.parse import parse_qs, urlsplit

import msgspec
import structlog
import trio
import trio_websocket
from trio_websocket import (
    CloseReason,
    ConnectionClosed,
    WebSocketConnection,
    WebSocketRequest,
)
from wsproto.connection import ConnectionState
from wsproto.events import CloseConnection

from jobwarden.actors.bucket import TokenBucket
from jobwarden.config import WebSocketSection
from jobwarden.errors import HTTP_STATUS, RequestError, error_body
from jobwarden.metrics import Metrics
from jobwarden.process.commands import (
    WEBSOCKET,
    Caller,
    Commands,
    ConnectionCap,
    Refusals,
    answer,
    log_failure,
)
from jobwarden.process.http import open_listeners
from jobwarden.store import users
from jobwarden.store.engine import Store
from jobwarden.wire.admin import encoder
from jobwarden.wire.views import ErrorBody, Event, JobView, LogLine
from jobwarden.wire.websocket import (
    WatchKey,
    WsAccepted,
    WsCancel,
    WsCanceled,
    WsCanceledMany,
    WsCancelMany,
    WsError,
    WsEvent,
    WsJobList,
    WsJobs,
    WsLogEnd,
    WsLogLine,
    WsLogPage,
    WsLogs,
    WsOp,
    WsReply,
    WsResync,
    WsSubmit,
    WsSubmitMany,
    WsSubmitted,
    WsUnwatch,
    WsUnwatched,
    WsWatch,
    WsWatching,
)

log = structlog.get_logger("websocket")

# A client gets this long to finish the opening handshake, and to answer the closing one.
HANDSHAKE_TIMEOUT = 10.0
CLOSE_TIMEOUT = 2.0
# Ops of one connection being answered at once; its reading waits beyond that.
MAX_IN_FLIGHT = 64


def _close_frame_on_protocol_failure() -> None:
    """Send a close frame when wsproto finds a frame it cannot accept.

    wsproto reports invalid UTF-8 in a text frame (1007), or a frame the protocol forbids
    (1002), as a CloseConnection event while the connection is still open. trio-websocket
    (0.12) answers a close frame only in the closing handshake the peer began, so it drops
    the TCP connection without a word, and the client cannot tell a refusal from a network
    fault. This sends the close frame first, then lets trio-websocket close as before.
    """
    handle_close = WebSocketConnection._handle_close_connection_event

    async def handle_close_after_saying_why(
        connection: WebSocketConnection, event: CloseConnection
    ) -> None:
        if connection._wsproto.state is ConnectionState.OPEN:
            # Set first, as trio-websocket does for a close the peer began: a frame sent
            # meanwhile then raises ConnectionClosed, not wsproto's LocalProtocolError.
            connection._close_reason = CloseReason(event.code, event.reason or None)
            with contextlib.suppress(ConnectionClosed):
                await connection._send(CloseConnection(code=event.code, reason=event.reason))
        await handle_close(connection, event)

    WebSocketConnection._handle_close_connection_event = handle_close_after_saying_why  # type: ignore[method-assign]


_close_frame_on_protocol_failure()


class WebSocketServer:
    def __init__(
        self,
        *,
        settings: WebSocketSection,
        store: Store,
        commands: Commands,
        metrics: Metrics,
        slow_request: float = math.inf,
        very_slow_request: float = math.inf,
    ) -> None:
        self.settings = settings
        self._slow = (slow_request, very_slow_request)
        self.store = store
        self.commands = commands
        self._metrics = metrics
        # Handshakes being authenticated count too: they hold a slot until refused.
        self._cap = ConnectionCap(settings.max_connections, "WebSocket clients")
        self.refusals = Refusals("websocket", metrics)
        self._sessions: set[_Session] = set()

    def statistics(self) -> dict[str, int]:
        return {
            "connections": len(self._sessions),
            "watches": sum(len(session.watches) for session in self._sessions),
            "buffered_frames": sum(session.buffered() for session in self._sessions),
        }

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await open_listeners(self.settings.listen, key="websocket.listen")
        server = trio_websocket.WebSocketServer(
            self._handshake,
            listeners,
            max_message_size=self.settings.max_frame_bytes,
            connect_timeout=HANDSHAKE_TIMEOUT,
            disconnect_timeout=CLOSE_TIMEOUT,
        )
        host, bound = listeners[0].socket.getsockname()[:2]
        log.info("websocket listening", host=host, port=bound)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.refusals.run)
            await nursery.start(server.run)
            task_status.started(bound)

    async def close_all(self, reason: str) -> None:
        """Tell every client the daemon is going away (1001), waiting a bounded time."""
        with trio.move_on_after(CLOSE_TIMEOUT):
            async with trio.open_nursery() as nursery:
                for session in self._sessions:
                    nursery.start_soon(session.ws.aclose, 1001, reason)

    async def _handshake(self, request: WebSocketRequest) -> None:
        try:
            slot = self._cap.admit()
        except RequestError as refusal:
            await self._refuse(request, refusal.body)
            return
        with slot:
            try:
                # Taken before the token is read: a revocation from then on ends the session.
                mark = self.commands.sessions.opening()
                user = await self._authorize(request)
                if user is not None:
                    session = _Session(self, await request.accept(), user)
                    await self._hold(session, mark)
            except* ConnectionClosed:
                pass
            except* Exception as failures:
                # One connection's trouble must never take the daemon down.
                for exc in failures.exceptions:
                    log_failure("websocket connection failed", exc)

    async def _hold(self, session: _Session, mark: int) -> None:
        """Run an accepted session, known as open for its user while it runs."""
        with self.commands.sessions.open(session.user, session, mark):
            self._sessions.add(session)
            try:
                await session.run()
            finally:
                self._sessions.discard(session)

    async def _authorize(self, request: WebSocketRequest) -> str | None:
        """The user the request's token names; None once the request has been refused."""
        headers = dict(request.headers)
        origin = headers.get(b"origin", b"").decode("latin-1")
        if origin and self.settings.origins and origin not in self.settings.origins:
            await self._refuse(
                request, error_body("FORBIDDEN", f"pages from {origin} may not connect")
            )
            return None
        token = _token(headers.get(b"authorization", b"").decode("latin-1"), request.path)
        user = None
        if token:
            user = await self.store.read(partial(users.authenticate, token=token))
        if user is None:
            message = (
                "the token is not valid: unknown, replaced, or its user is disabled"
                if token
                else "no token: send `Authorization: Bearer <token>`, or ?token=<token>"
            )
            await self._refuse(request, error_body("UNAUTHENTICATED", message))
            return None
        return user.name

    async def _refuse(self, request: WebSocketRequest, body: ErrorBody) -> None:
        """An HTTP answer in place of the upgrade, with the status the error code means."""
        self.refusals.refused(body, connection=request)
        status = HTTP_STATUS[body.code]
        headers = [(b"content-type", b"application/json")]
        if status == 401:
            headers.append((b"www-authenticate", b"Bearer"))
        await request.reject(status, extra_headers=headers, body=encoder.encode(body))

    def observe(self, op: str, seconds: float) -> None:
        self._metrics.request_done("websocket", seconds, self._slow, op=op)


def _token(authorization: str, path: str) -> str | None:
    scheme, _, credentials = authorization.partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    values = parse_qs(urlsplit(path).query).get("token")
    return values[0] if values else None


class _Session:
    """One accepted connection: a reader that starts ops, a writer, a keep-alive, the watches."""

    def __init__(self, server: WebSocketServer, ws: WebSocketConnection, user: str) -> None:
        self.server = server
        self.commands = server.commands
        self.ws = ws
        self.user = user
        # Whom the command layer answers: this user, who sees only their own jobs.
        self.caller = Caller(user=user)
        self.settings = server.settings
        self.outbox, self._outgoing = trio.open_memory_channel[str](self.settings.queue)
        # Each watch's scope, to end it on `unwatch`.
        self.watches: dict[WatchKey, trio.CancelScope] = {}
        rate = self.settings.max_messages_per_second
        self._bucket = TokenBucket(rate=rate, burst=rate, now=trio.current_time())
        # Everything the session runs; canceled to end it, with the close code and reason.
        self._scope = trio.CancelScope()
        self._closing: tuple[int, str] | None = None

    def buffered(self) -> int:
        return self._outgoing.statistics().current_buffer_used

    def end(self, code: int, reason: str) -> None:
        """Close the session, telling the client `code` and `reason`."""
        if self._closing is None:
            self._closing = (code, reason)
        self._scope.cancel()

    async def run(self) -> None:
        log.debug("websocket connected", user=self.user)
        with self._scope:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._write)
                nursery.start_soon(self._keep_alive)
                await self._read()
                nursery.cancel_scope.cancel()
        if self._closing is not None:
            with trio.move_on_after(CLOSE_TIMEOUT):
                await self.ws.aclose(*self._closing)
        log.debug("websocket closed", user=self.user, reason=str(self.ws.closed))

    async def send(self, message: Any) -> None:
        await self.outbox.send(encoder.encode(message).decode())

    async def _write(self) -> None:
        try:
            async for frame in self._outgoing:
                await self.ws.send_message(frame)
        except ConnectionClosed:
            self._nursery.cancel_scope.cancel()

    async def _keep_alive(self) -> None:
        while True:
            await trio.sleep(self.settings.ping_interval)
            with trio.move_on_after(self.settings.ping_timeout) as waiting:
                await self.ws.ping()
            if waiting.cancelled_caught:
                log.info("websocket client stopped answering pings", user=self.user)
                self.end(1011, "no answer to ping")
                return

    async def _read(self) -> None:
        in_flight = trio.Semaphore(MAX_IN_FLIGHT)
        while True:
            try:
                frame = await self.ws.get_message()
            except ConnectionClosed:
                return
            wait = self._bucket.take(trio.current_time())
            await in_flight.acquire()
            self._nursery.start_soon(self._answer, frame, wait, in_flight)

    async def _answer(self, frame: str | bytes, wait: float, in_flight: trio.Semaphore) -> None:
        try:
            request_id, outcome = await answer(
                WEBSOCKET,
                frame,
                partial(self._respond, wait),
                refusals=self.server.refusals,
                connection=self,
            )
            match outcome:
                case ErrorBody():
                    await self.send(WsError(id=request_id, error=outcome))
                case WsReply():
                    await self.send(outcome)
        finally:
            in_flight.release()

    async def _respond(self, wait: float, op: WsOp) -> WsReply | None:
        """The reply to `op` (None: a watch, whose task replies), unless the connection is
        over its rate: `wait` is how long it should have waited."""
        if wait:
            raise RequestError(
                "RATE_LIMITED",
                f"at most {self.settings.max_messages_per_second} ops a second",
                retry_after=round(wait, 3),
            )
        started = trio.current_time()
        reply = await self._perform(op)
        self.server.observe(op.__struct_config__.tag, trio.current_time() - started)
        return reply

    # -- ops --------------------------------------------------------------------------------

    async def _perform(self, op: WsOp) -> WsReply | None:
        commands = self.commands
        match op:
            case WsSubmit():
                job, existing = await commands.submit(self.user, op)
                return WsAccepted(id=op.id, job=job, existing=existing)
            case WsSubmitMany():
                batch = await commands.submit_many(self.user, op.items, atomic=op.atomic)
                return WsSubmitted.of(op.id, batch)
            case WsWatch():
                return await self._watch(op)
            case WsUnwatch():
                return self._unwatch(op)
            case WsCancel():
                return WsCanceled(id=op.id, job=await commands.cancel(self.caller, op.job))
            case WsCancelMany():
                outcome = await commands.cancel_many(
                    self.caller, op.filter, dry_run=op.dry_run, show=op.show
                )
                return WsCanceledMany(id=op.id, outcome=outcome)
            case WsLogs():
                return await self._logs(op)
            case WsJobs():
                found = await commands.jobs(
                    self.caller, status=op.status, kind=op.kind, tag=op.tag, limit=op.limit
                )
                return WsJobList(id=op.id, jobs=found)
        raise AssertionError(f"no answer for {type(op).__name__}")

    async def _logs(self, op: WsLogs) -> WsReply:
        page = await self.commands.logs(self.caller, op.job, after=op.after)
        if not op.follow:
            return WsLogPage(id=op.id, job=op.job, dropped=page.dropped, lines=page.lines)
        await self.send(WsLogPage(id=op.id, job=op.job, dropped=page.dropped, lines=[]))

        async def send(line: LogLine) -> None:
            await self.send(WsLogLine(id=op.id, job=op.job, line=line))

        job = await self.commands.follow_logs(self.caller, send, op.job, after=op.after)
        return WsLogEnd(id=op.id, job=job)

    async def _watch(self, op: WsWatch) -> None:
        """Answer `watching` and start the watch's task, which sends its events after it."""
        key = _watch_key(op.job, op.all)
        if key in self.watches:
            raise RequestError("INVALID_REQUEST", f"watch: already watching {_name(key)}")
        if len(self.watches) >= self.settings.max_watches:
            raise RequestError(
                "INVALID_REQUEST",
                f"watch: at most {self.settings.max_watches} watches per connection",
            )
        scope = trio.CancelScope()
        # Taken before the checks below wait, so that a second watch of the same key is refused.
        self.watches[key] = scope
        try:
            start = await self.commands.start_watch(self.caller, job=op.job, since=op.since)
        except BaseException:
            self._forget(key, scope)
            raise
        if self.watches.get(key) is not scope:
            raise RequestError("INVALID_REQUEST", f"watch: {_name(key)} was unwatched meanwhile")
        # Sent here, not by the watch's task: an `unwatch` that cancels the task before it
        # runs must not leave the watch unanswered. The outbox keeps this frame ahead of the
        # task's events and of the `unwatched` that may follow.
        await self.send(
            WsWatching(id=op.id, watch=key, since=start.since, job=start.job, newest=start.newest)
        )
        self._nursery.start_soon(self._stream, key, scope, start.since, start.job)
        return None

    async def _stream(
        self, key: WatchKey, scope: trio.CancelScope, since: int, job: JobView | None
    ) -> None:
        with scope:
            try:

                async def send_event(event: Event) -> None:
                    await self.send(WsEvent(watch=key, **msgspec.structs.asdict(event)))

                resume = await self.commands.follow(
                    self.caller,
                    send_event,
                    since=since,
                    job=job.id if job is not None else None,
                    buffer=self.settings.queue,
                )
                # Forgotten before the client hears of it, so it may watch again at once.
                self._forget(key, scope)
                if resume is not None:
                    log.info("websocket watcher fell behind", user=self.user, since=resume)
                    await self.send(WsResync(watch=key, since=resume))
            finally:
                self._forget(key, scope)

    def _unwatch(self, op: WsUnwatch) -> WsReply:
        key = _watch_key(op.job, op.all)
        scope = self.watches.pop(key, None)
        if scope is not None:
            scope.cancel()
        # After this reply no event of the watch follows: its task cannot send once canceled.
        return WsUnwatched(id=op.id, watch=key)

    def _forget(self, key: WatchKey, scope: trio.CancelScope) -> None:
        if self.watches.get(key) is scope:
            del self.watches[key]


def _watch_key(job: int | None, everything: bool) -> WatchKey:
    if (job is None) == (not everything):
        raise RequestError("INVALID_REQUEST", 'give either "job": ID or "all": true')
    return "all" if everything else job  # type: ignore[return-value]


def _name(key: WatchKey) -> str:
    return "all jobs" if key == "all" else f"job {key}"
