"""Probes and scrapers: no token, GET only.

/healthz  200 while the event loop answers (liveness)
/readyz   200 once recovery is done, the store takes writes, and the daemon is not draining;
          else 503 with the problems (a store fault: what fails and since when)
/health   the detailed JSON snapshot (the command layer's, as `jobwarden status` shows it),
          with the store's health under "store"
/metrics  Prometheus text

Each answer closes its connection, as probes and scrapers expect of a one-shot request.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import msgspec
import trio
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute

from jobwarden.process.http.app import JSON, Context, route

PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"
# How long /readyz waits for a write to go through before it calls the store not writable.
READY_WRITE_TIMEOUT = 2.0


def _answer(status: int, content_type: str, body: bytes) -> Response:
    return Response(body, status, {"Connection": "close"}, media_type=content_type)


def routes(context: Context) -> list[BaseRoute]:
    store, commands, metrics = context.store, context.commands, context.metrics

    async def healthz(request: Request) -> Response:
        return _answer(200, JSON, b'{"ok":true}\n')

    async def readyz(request: Request) -> Response:
        status = context.daemon_status()
        problems = []
        if not status["ready"]:
            problems.append("recovering")
        if status["draining"]:
            problems.append("draining")
        fault = store.health.fault
        if fault is not None:
            since = datetime.fromtimestamp(fault.since, UTC).isoformat(timespec="seconds")
            problems.append(f"store takes no writes since {since} ({fault.code}): {fault.message}")
        if not problems:
            with trio.move_on_after(READY_WRITE_TIMEOUT) as slow:
                try:
                    await store.write(lambda conn, events: None)
                except Exception as exc:
                    problems.append(f"store not writable: {exc}")
            if slow.cancelled_caught:
                problems.append(f"store not writable within {READY_WRITE_TIMEOUT:g}s")
        body = msgspec.json.encode({"ready": not problems, "problems": problems}) + b"\n"
        return _answer(503 if problems else 200, JSON, body)

    async def health(request: Request) -> Response:
        return _answer(200, JSON, msgspec.json.encode(await commands.health()) + b"\n")

    async def metrics_text(request: Request) -> Response:
        health = await commands.health(by_kind=True)
        metrics.set_state(health, health.pop("by_status_kind"), trio.current_time())
        return _answer(200, PROMETHEUS_TEXT, metrics.render())

    probes: dict[str, Callable[[Request], Awaitable[Response]]] = {
        "/healthz": healthz,
        "/readyz": readyz,
        "/health": health,
        "/metrics": metrics_text,
    }
    return [route(path, GET=handler) for path, handler in probes.items()]
