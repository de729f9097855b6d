"""The HTTP listener: the app of app.py served by Hypercorn's trio worker in the daemon's
nursery.

The sockets are bound here (`open_listeners`, whose refusal names the config key to change)
and handed to Hypercorn by file descriptor. `close` ends the long-lived streams and lets
Hypercorn finish what is in flight within CLOSE_TIMEOUT: the supervisor calls it once the
drain is over, so /readyz answers "draining" while the daemon drains.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable, Iterable
from typing import Any

import structlog
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve

from jobwarden.config import HttpSection
from jobwarden.errors import ConfigError
from jobwarden.logs import clip
from jobwarden.metrics import Metrics
from jobwarden.process.commands import Commands, Refusals
from jobwarden.process.http import api, dashboard, probes
from jobwarden.process.http.app import Context, RouteGroup, build_app
from jobwarden.store.engine import Store

log = structlog.get_logger("http")

# In-flight requests get this long to finish once the listener closes.
CLOSE_TIMEOUT = 2.0
# A connection that sends no (further) request for this long is closed: idle clients do not
# hold sockets, and the cap on requests at once bounds the rest.
KEEP_ALIVE_TIMEOUT = 5.0


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


class _HypercornLog(logging.Handler):
    """Hypercorn's own warnings and errors (a broken connection, a protocol error), as one
    structlog event each; its start-up chatter stays below the level it is given."""

    def emit(self, record: logging.LogRecord) -> None:
        message = clip(record.getMessage())
        log.warning("http server", level=record.levelname.lower(), message=message)


def _hypercorn_logger() -> logging.Logger:
    logger = logging.getLogger("jobwarden.http.hypercorn")
    if not logger.handlers:
        logger.addHandler(_HypercornLog())
        logger.setLevel(logging.WARNING)
        logger.propagate = False
    return logger


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
        settings: HttpSection | None = None,
        groups: Iterable[RouteGroup] = (),
    ) -> None:
        self._listen = listen
        self._context = Context(
            store=store,
            commands=commands,
            metrics=metrics,
            settings=settings or HttpSection(),
            daemon_status=daemon_status,
            slow=(slow_request, very_slow_request),
            refusals=Refusals("http", metrics),
        )
        self._app = build_app(self._context, [probes.routes, api.routes, dashboard.routes, *groups])
        self._finished = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await open_listeners(self._listen, key="http.listen")
        host, port = listeners[0].socket.getsockname()[:2]
        config = HypercornConfig()
        # Hypercorn takes the sockets bound above by their descriptors, and owns them from now.
        config.bind = [f"fd://{listener.socket.detach()}" for listener in listeners]
        config.errorlog = _hypercorn_logger()
        config.accesslog = None
        config.include_server_header = False
        config.graceful_timeout = CLOSE_TIMEOUT
        config.keep_alive_timeout = KEEP_ALIVE_TIMEOUT
        try:
            async with trio.open_nursery() as nursery:

                async def serve_until_stopped(task_status: trio.TaskStatus[Any]) -> None:
                    await serve(
                        self._app,  # type: ignore[arg-type]
                        config,
                        shutdown_trigger=self._context.stopping.wait,
                        task_status=task_status,
                    )
                    # Served out: the refusals' summary has no more to sum up.
                    nursery.cancel_scope.cancel()

                nursery.start_soon(self._context.refusals.run)
                await nursery.start(serve_until_stopped)
                log.info("http listening", host=host, port=port)
                task_status.started(port)
        finally:
            self._finished.set()

    async def close(self) -> None:
        """Stop accepting, end the event streams, and wait a bounded time for the rest."""
        self._context.stopping.set()
        with trio.move_on_after(CLOSE_TIMEOUT + 1):
            await self._finished.wait()
