"""A small HTTP listener for probes and scrapers, on h11: GET only, one request per connection.

/healthz  200 while the event loop answers (liveness)
/readyz   200 once recovery is done, the store takes writes, and the daemon is not draining;
          else 503 with the problems (a store fault: what fails and since when)
/health   the detailed JSON snapshot (the command layer's, as `jobwarden status` shows it),
          with the store's health under "store"
/metrics  Prometheus text
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import h11
import msgspec
import structlog
import trio

from jobwarden.errors import ConfigError
from jobwarden.metrics import Metrics
from jobwarden.process.commands import Commands
from jobwarden.store.engine import Store

log = structlog.get_logger("http")

MAX_REQUEST_BYTES = 16 * 1024
# A client gets this long to send its request and read the answer.
CONNECTION_TIMEOUT = 10.0
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


def parse_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


async def open_listeners(listen: str, *, key: str) -> list[trio.SocketListener]:
    """The TCP listeners for a listen key's "host:port". One that cannot be had is a config
    error that names the key to change, and the `serve` flag that overrides it."""
    host, port = parse_listen(listen)
    try:
        return await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        why = exc.strerror or str(exc)
        if exc.errno == errno.EADDRINUSE:
            why += " (another program, or another jobwarden, listens there)"
        flag = "--" + key.replace(".", "-").replace("_", "-")
        raise ConfigError(
            f"{key}: cannot listen on {listen}: {why}. Set another {key} in the config, "
            f'or run `jobwarden serve {flag} HOST:PORT` (port 0 takes any free port, "" none)'
        ) from None


class HttpServer:
    def __init__(
        self,
        *,
        listen: str,
        store: Store,
        commands: Commands,
        metrics: Metrics,
        daemon_status: Callable[[], dict[str, Any]],
        slow_request: float,
        very_slow_request: float,
    ) -> None:
        self._listen = listen
        self._slow = (slow_request, very_slow_request)
        self._store = store
        self._commands = commands
        self._metrics = metrics
        self._daemon_status = daemon_status
        self._routes: dict[str, Callable[[], Awaitable[tuple[int, str, bytes]]]] = {
            "/healthz": self._healthz,
            "/readyz": self._readyz,
            "/health": self._health,
            "/metrics": self._metrics_text,
        }

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await open_listeners(self._listen, key="http.listen")
        host, port = listeners[0].socket.getsockname()[:2]
        log.info("http listening", host=host, port=port)
        await trio.serve_listeners(self._serve, listeners, task_status=_Started(task_status))

    async def _serve(self, stream: trio.SocketStream) -> None:
        async with stream:
            with trio.move_on_after(CONNECTION_TIMEOUT):
                # A client that hangs up or speaks broken HTTP only loses its own answer.
                with contextlib.suppress(
                    trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError
                ):
                    await self._exchange(stream)

    async def _exchange(self, stream: trio.SocketStream) -> None:
        connection = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_BYTES)
        while True:
            event = connection.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(MAX_REQUEST_BYTES)
                if not data:
                    return
                connection.receive_data(data)
                continue
            if isinstance(event, h11.Request):
                break
            return
        path = event.target.decode("ascii", "replace").split("?", 1)[0]
        started = trio.current_time()
        if event.method not in (b"GET", b"HEAD"):
            status, content_type, body = 405, "text/plain", b"only GET\n"
        elif path not in self._routes:
            status, content_type, body = 404, "text/plain", b"not found\n"
        else:
            status, content_type, body = await self._routes[path]()
        headers = [
            ("content-type", content_type),
            ("content-length", str(len(body))),
            ("connection", "close"),
        ]
        await stream.send_all(connection.send(h11.Response(status_code=status, headers=headers)))
        if event.method == b"GET":
            await stream.send_all(connection.send(h11.Data(data=body)))
        await stream.send_all(connection.send(h11.EndOfMessage()))
        route = path if path in self._routes else "other"
        seconds = trio.current_time() - started
        self._metrics.request_done("http", seconds, self._slow, path=route)

    async def _healthz(self) -> tuple[int, str, bytes]:
        return 200, "application/json", b'{"ok":true}\n'

    async def _readyz(self) -> tuple[int, str, bytes]:
        status = self._daemon_status()
        problems = []
        if not status["ready"]:
            problems.append("recovering")
        if status["draining"]:
            problems.append("draining")
        fault = self._store.health.fault
        if fault is not None:
            since = datetime.fromtimestamp(fault.since, UTC).isoformat(timespec="seconds")
            problems.append(f"store takes no writes since {since} ({fault.code}): {fault.message}")
        if not problems:
            with trio.move_on_after(2.0) as slow:
                try:
                    await self._store.write(lambda conn, events: None)
                except Exception as exc:
                    problems.append(f"store not writable: {exc}")
            if slow.cancelled_caught:
                problems.append("store not writable within 2s")
        body = msgspec.json.encode({"ready": not problems, "problems": problems}) + b"\n"
        return (503 if problems else 200), "application/json", body

    async def _health(self) -> tuple[int, str, bytes]:
        health = await self._commands.health()
        return 200, "application/json", msgspec.json.encode(health) + b"\n"

    async def _metrics_text(self) -> tuple[int, str, bytes]:
        health = await self._commands.health(by_kind=True)
        self._metrics.set_state(health, health.pop("by_status_kind"), trio.current_time())
        return 200, PROMETHEUS_TEXT, self._metrics.render()


class _Started:
    """Hands the caller the bound port (port 0 in tests) instead of the listener list."""

    def __init__(self, task_status: trio.TaskStatus[int]) -> None:
        self._task_status = task_status

    def started(self, listeners: Any = None) -> None:
        self._task_status.started(listeners[0].socket.getsockname()[1])
