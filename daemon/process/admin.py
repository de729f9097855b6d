"""The admin socket: a local Unix socket speaking newline-delimited JSON.

Access is the socket file's mode (0600, or 0660 with a configured group) and, because a mode
can be loosened by accident, the peer's credentials (SO_PEERCRED): root, the daemon's own
user, or a member of the configured group. Requests on one connection run concurrently and
answer by id, so a client that pipelines many submissions gets them group-committed. Bad input
(not JSON, unknown command, wrong arguments, an oversized line) gets an error reply in the
common shape; only an oversized line, or one not ended within `admin.line_timeout`, closes
the connection.

Every request is answered, even after the client has shut down its sending side (a `watch`
then answers and ends at once); a request is a line, ended by its newline. A connection with
nothing in flight is closed after `admin.idle_timeout` without a request, and one whose
replies are not read for as long: the max_connections slots cannot be held by silent peers.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import math
import os
import pwd
import socket
import struct
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import msgspec
import structlog
import trio

from jobwarden import __version__
from jobwarden.actors.messages import (
    SchedulerSnapshot,
)
from jobwarden.config import Config, format_duration
from jobwarden.errors import ConfigError, RequestError, StartupError, error_body
from jobwarden.mailbox import ask
from jobwarden.metrics import Metrics
from jobwarden.process.commands import (
    ADMIN,
    OPERATOR,
    Commands,
    ConnectionCap,
    Refusals,
    answer,
    log_failure,
)
from jobwarden.wire.admin import (
    AdminRequest,
    BreakerRequest,
    BreakersRequest,
    BudgetRequest,
    CancelManyRequest,
    CancelRequest,
    DrainRequest,
    EventLine,
    HoldRequest,
    JobsRequest,
    LedgerRequest,
    LogEnd,
    LogLineMessage,
    LogsRequest,
    PauseRequest,
    PingRequest,
    ReleaseRequest,
    Reply,
    ResumeRequest,
    RetryManyRequest,
    RetryRequest,
    SchedulesRequest,
    ShowRequest,
    ShutdownRequest,
    StatusRequest,
    StuckRequest,
    SubmitManyRequest,
    SubmitRequest,
    TokensRequest,
    UsersRequest,
    WatchRequest,
    WebhooksRequest,
    encode_line,
)
from jobwarden.wire.views import ErrorBody, Event, LogLine

log = structlog.get_logger("admin")

MAX_IN_FLIGHT_PER_CONNECTION = 256


class Stop(msgspec.Struct):
    """Ask the supervisor to drain (grace None: the configured grace) and exit."""

    grace: float | None = None


def peer_allowed(uid: int, gid: int, *, daemon_uid: int, group_gid: int | None) -> bool:
    if uid in (0, daemon_uid):
        return True
    if group_gid is None:
        return False
    if gid == group_gid:
        return True
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        return False
    return group_gid in os.getgrouplist(name, gid)


def peer_credentials(sock: trio.socket.SocketType) -> tuple[int, int, int]:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


async def bind_admin_socket(path: Path, group: str) -> tuple[trio.socket.SocketType, int | None]:
    """Bind with the final mode from the start: the socket is never briefly world-reachable."""
    group_gid = None
    if group:
        try:
            group_gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise ConfigError(f"admin.group: no group named '{group}'") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() or path.is_symlink():
        await _remove_stale_socket(path)
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o117 if group_gid is not None else 0o177)
    try:
        # The stdlib bind, not trio's: trio binds Unix sockets on a worker thread, and on
        # MockClock that lets virtual time run on while the daemon starts.
        raw.bind(str(path))
    finally:
        os.umask(old_umask)
    sock = trio.socket.from_stdlib_socket(raw)
    if group_gid is not None:
        os.chown(path, -1, group_gid)
    sock.listen(128)
    return sock, group_gid


async def _remove_stale_socket(path: Path) -> None:
    probe = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await probe.connect(str(path))
    except OSError as exc:
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT, errno.ENOTSOCK):
            raise
    else:
        raise StartupError(f"another jobwarden is serving {path}")
    finally:
        probe.close()
    path.unlink(missing_ok=True)


class _Connection:
    """One client: its replies, what it has in flight, and how long it may stay silent."""

    def __init__(self, stream: trio.SocketStream, *, idle_timeout: float, line_timeout: float):
        self.stream = stream
        self._send_lock = trio.Lock()
        # Everything this connection runs; canceled when the peer goes away.
        self.scope = trio.CancelScope()
        # The watches it streams: they end when the client stops sending.
        self.watches: set[trio.CancelScope] = set()
        self.input_closed = False
        self._idle_timeout = idle_timeout
        self._line_timeout = line_timeout
        # Requests being answered (watches included): while there are any, it is not idle.
        self._busy = 0
        self._idle_since = trio.current_time()
        # When the first byte of a line not yet ended came; None between lines.
        self.line_started: float | None = None
        self._reading: trio.CancelScope | None = None

    async def send(self, message: Any) -> None:
        try:
            async with self._send_lock:
                with trio.move_on_after(self._idle_timeout) as writing:
                    await self.stream.send_all(encode_line(message))
            if writing.cancelled_caught:
                # A client that takes none of its replies for so long holds its slot for nothing.
                self.scope.cancel()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            # The client hung up: whatever else it had in flight has no one to answer to.
            self.scope.cancel()

    async def receive(self) -> bytes | None:
        """The next bytes from the client (b"" once it stopped sending), or None when it was
        silent too long: with a line begun, `line_timeout`; with nothing in flight,
        `idle_timeout`; else it may wait as long as it likes."""
        with trio.CancelScope(deadline=self._read_deadline()) as reading:
            self._reading = reading
            try:
                return await self.stream.receive_some()
            finally:
                self._reading = None
        return None

    @contextlib.contextmanager
    def streaming(self) -> Iterator[None]:
        """The context of a stream (a watch, a followed log), which ends when the client
        stops sending."""
        with trio.CancelScope() as stream:
            self.watches.add(stream)
            if self.input_closed:
                stream.cancel()
            try:
                yield
            finally:
                self.watches.discard(stream)

    def begin(self) -> None:
        self._busy += 1
        self._refresh_deadline()

    def done(self) -> None:
        self._busy -= 1
        if not self._busy:
            self._idle_since = trio.current_time()
            self._refresh_deadline()

    def _read_deadline(self) -> float:
        if self.line_started is not None:
            return self.line_started + self._line_timeout
        if self._busy:
            return math.inf
        return self._idle_since + self._idle_timeout

    def _refresh_deadline(self) -> None:
        if self._reading is not None:
            self._reading.deadline = self._read_deadline()


class AdminServer:
    def __init__(
        self,
        *,
        config: Config,
        commands: Commands,
        scheduler: trio.MemorySendChannel[Any],
        supervisor: trio.MemorySendChannel[Any],
        metrics: Metrics,
    ) -> None:
        self._config = config
        self._commands = commands
        self._scheduler = scheduler
        self._supervisor = supervisor
        self._metrics = metrics
        self._group_gid: int | None = None
        self._cap = ConnectionCap(config.admin.max_connections, "admin clients")
        self._refusals = Refusals("admin", metrics)

    def reconfigure(self, config: Config) -> None:
        """Kinds may come and go on reload; the socket itself stays as it was bound."""
        self._config = config

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        path = self._config.path(self._config.admin.socket)
        sock, self._group_gid = await bind_admin_socket(path, self._config.admin.group)
        listener = trio.SocketListener(sock)
        try:
            async with listener, trio.open_nursery() as nursery:
                nursery.start_soon(self._refusals.run)
                log.info("admin socket listening", path=str(path))
                await trio.serve_listeners(self._serve, [listener], task_status=task_status)
        finally:
            path.unlink(missing_ok=True)

    async def _serve(self, stream: trio.SocketStream) -> None:
        settings = self._config.admin
        connection = _Connection(
            stream, idle_timeout=settings.idle_timeout, line_timeout=settings.line_timeout
        )
        try:
            _, uid, gid = peer_credentials(stream.socket)
            if not peer_allowed(uid, gid, daemon_uid=os.getuid(), group_gid=self._group_gid):
                error = error_body("FORBIDDEN", f"uid {uid} may not use this socket")
                self._refusals.refused(
                    error, connection=connection, event="admin connection refused", uid=uid, gid=gid
                )
                await connection.send(Reply(id=None, ok=False, error=error))
                return
            try:
                slot = self._cap.admit()
            except RequestError as refusal:
                self._refusals.refused(refusal.body, connection=connection)
                await connection.send(Reply(id=None, ok=False, error=refusal.body))
                return
            with slot, connection.scope:
                await self._converse(connection)
        except* (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except* Exception as failures:
            # One connection's trouble must never take the daemon down.
            for exc in failures.exceptions:
                log_failure("admin connection failed", exc)
        finally:
            await stream.aclose()

    async def _converse(self, connection: _Connection) -> None:
        limit = self._config.admin.max_line_bytes
        in_flight = trio.Semaphore(MAX_IN_FLIGHT_PER_CONNECTION)
        async with trio.open_nursery() as nursery:
            buffer = bytearray()
            while (chunk := await connection.receive()) is not None:
                if not chunk:
                    # The client is done sending (it may have only half-closed and still be
                    # reading): every request it sent is answered, and the watches end. A
                    # last line without its newline was never finished: it is dropped.
                    connection.input_closed = True
                    for watch in connection.watches:
                        watch.cancel()
                    return
                buffer += chunk
                oversized = False
                ended = False
                while (end := buffer.find(b"\n")) >= 0:
                    if end > limit:
                        oversized = True
                        break
                    line = bytes(buffer[:end])
                    del buffer[: end + 1]
                    ended = True
                    if line.strip():
                        await in_flight.acquire()
                        connection.begin()
                        nursery.start_soon(self._handle_line, connection, line, in_flight)
                if oversized or len(buffer) > limit:
                    error = error_body(
                        "PAYLOAD_TOO_LARGE", f"a request line is limited to {limit} bytes; closing"
                    )
                    await self._close_with(connection, nursery, error)
                    return
                if not buffer:
                    connection.line_started = None
                elif ended or connection.line_started is None:
                    connection.line_started = trio.current_time()
            if connection.line_started is not None:
                timeout = format_duration(self._config.admin.line_timeout)
                error = error_body(
                    "INVALID_REQUEST",
                    f"a request line must end with a newline within {timeout}; closing",
                )
                await self._close_with(connection, nursery, error)
            else:
                # Idle too long: nothing is asked and nothing in flight, so nothing to say.
                nursery.cancel_scope.cancel()

    async def _close_with(
        self, connection: _Connection, nursery: trio.Nursery, error: ErrorBody
    ) -> None:
        """Tell the client why its connection closes, and close it."""
        self._refusals.refused(error, connection=connection)
        await connection.send(Reply(id=None, ok=False, error=error))
        nursery.cancel_scope.cancel()

    async def _handle_line(
        self, connection: _Connection, line: bytes, in_flight: trio.Semaphore
    ) -> None:
        try:
            request_id, outcome = await answer(
                ADMIN,
                line,
                partial(self._respond, connection),
                refusals=self._refusals,
                connection=connection,
            )
            match outcome:
                case ErrorBody():
                    await connection.send(Reply(id=request_id, ok=False, error=outcome))
                case Reply():
                    await connection.send(outcome)
        finally:
            in_flight.release()
            connection.done()

    async def _respond(self, connection: _Connection, request: AdminRequest) -> Reply | None:
        """The reply to `request`; None for a watch, which sends its own and then its events."""
        if isinstance(request, WatchRequest):
            await self._watch(connection, request)
            return None
        if isinstance(request, LogsRequest) and request.args.follow:
            await self._follow_logs(connection, request)
            return None
        started = trio.current_time()
        data = await self._answer(request)
        self._observe(request.__struct_config__.tag, trio.current_time() - started)
        return Reply(id=request.id, ok=True, data=data)

    def _observe(self, cmd: str, seconds: float) -> None:
        monitor = self._config.monitor
        thresholds = (monitor.slow_request, monitor.very_slow_request)
        self._metrics.request_done("admin", seconds, thresholds, cmd=cmd)

    # -- commands ---------------------------------------------------------------------------

    async def _answer(self, request: AdminRequest) -> Any:
        """The data of the reply to any request but `watch`."""
        commands = self._commands
        match request:
            case PingRequest():
                return {"version": __version__, "pid": os.getpid()}
            case SubmitRequest(args=args):
                job, existing = await commands.submit(args.user, args)
                return {"job": job, "existing": existing}
            case SubmitManyRequest(args=args):
                return await commands.submit_many(args.user, args.items, atomic=args.atomic)
            case JobsRequest(args=args):
                found = await commands.jobs(
                    OPERATOR,
                    status=args.status,
                    kind=args.kind,
                    user=args.user,
                    tag=args.tag,
                    limit=args.limit,
                )
                return {"jobs": found, "waiting": await commands.waiting(found)}
            case ShowRequest(args=args):
                shown = await commands.show(OPERATOR, args.job)
                return {"job": shown.job, "events": shown.events, "waiting": shown.waiting}
            case CancelRequest(args=args):
                return {"job": await commands.cancel(OPERATOR, args.job)}
            case RetryRequest(args=args):
                return {"job": await commands.retry(args.job)}
            case HoldRequest(args=args):
                return {"job": await commands.hold(args.job, held=True)}
            case ReleaseRequest(args=args):
                return {"job": await commands.hold(args.job, held=False)}
            case LogsRequest(args=args):
                page = await commands.logs(OPERATOR, args.job, after=args.after)
                return {"dropped": page.dropped, "lines": page.lines}
            case CancelManyRequest(args=args):
                return await commands.cancel_many(
                    OPERATOR, args.filter, dry_run=args.dry_run, show=args.show
                )
            case RetryManyRequest(args=args):
                return await commands.retry_many(args.filter, dry_run=args.dry_run, show=args.show)
            case PauseRequest(args=args):
                return await commands.pause(args.kind)
            case ResumeRequest(args=args):
                return await commands.resume(args.kind)
            case DrainRequest():
                status = await ask(self._scheduler, SchedulerSnapshot)
                await self._supervisor.send(Stop())
                return {"draining": True, "running": status["running"]}
            case ShutdownRequest():
                await self._supervisor.send(Stop(grace=0.0))
                return {"stopping": True}
            case StatusRequest():
                return await commands.health()
            case StuckRequest(args=args):
                return await commands.stuck(dry_run=args.dry_run)
            case WebhooksRequest(args=args):
                deliveries = await commands.webhook_deliveries(
                    OPERATOR, job_id=args.job, pending=args.pending, limit=args.limit
                )
                return {"deliveries": deliveries}
            case BreakersRequest():
                return await commands.breakers()
            case BreakerRequest(args=args):
                return await commands.breaker(args)
            case LedgerRequest(args=args):
                return await commands.ledger(args)
            case BudgetRequest(args=args):
                return await commands.budget(args)
            case UsersRequest(args=args):
                return await commands.users(args)
            case TokensRequest(args=args):
                return await commands.tokens(args)
            case SchedulesRequest(args=args) if args.action == "list":
                return {"schedules": await commands.schedules()}
            case SchedulesRequest(args=args):
                return await commands.schedule_action(args.action, args.name)
        raise AssertionError(f"{type(request).__name__} is streamed, not answered")

    async def _follow_logs(self, connection: _Connection, request: LogsRequest) -> None:
        """Answer `following`, then send the job's lines as they come and `ended` once it
        is final; a client that stops sending ends the follow, as it ends a watch."""
        args = request.args
        first = await self._commands.logs(OPERATOR, args.job, after=args.after, limit=1)
        await connection.send(
            Reply(id=request.id, ok=True, data={"following": args.job, "dropped": first.dropped})
        )

        async def send(line: LogLine) -> None:
            await connection.send(LogLineMessage(id=request.id, log=line))

        with connection.streaming():
            job = await self._commands.follow_logs(OPERATOR, send, args.job, after=args.after)
            await connection.send(LogEnd(id=request.id, ended=job))

    async def _watch(self, connection: _Connection, request: WatchRequest) -> None:
        """Replay from the store after `since`, then follow live; a watcher that falls behind
        the hub's buffer is caught up from the store again, so it never misses an event. The
        watch ends when the client stops sending, after it has been answered."""
        args = request.args
        since = (await self._commands.start_watch(OPERATOR, job=args.job, since=args.since)).since
        await connection.send(
            Reply(
                id=request.id,
                ok=True,
                data={"watching": args.job if args.job is not None else "all", "since": since},
            )
        )

        async def send(event: Event) -> None:
            await connection.send(EventLine(id=request.id, event=event))

        with connection.streaming():
            resume: int | None = since
            while resume is not None:
                resume = await self._commands.follow(
                    OPERATOR, send, since=resume, job=args.job, user=args.user
                )
