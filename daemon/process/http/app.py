"""The ASGI app the HTTP listener serves, built from route groups.

A route group is a function of the `Context` that returns Starlette routes: `probes.routes`
(/healthz, /readyz, /health, /metrics), `api.routes` (/v1), and any other group passed to
`build_app` (the dashboard mounts its own). Every group gets, from the layers around it:

- the common error shape for every refusal, with its HTTP status (errors.HTTP_STATUS),
  `Retry-After` when a client should wait, `WWW-Authenticate` on 401 and `Allow` on 405;
  a route raises `RequestError` and need do nothing else;
- `X-Response-Time` on every response, the request counted and timed in metrics by its route
  template, and slow requests logged as on the other listeners;
- a cap on requests served at once (more get 503 QUEUE_FULL), and on the body: a
  `Content-Length` over `http.max_body_bytes` is refused 413 before the body is read, and a
  body without one is cut off once it grows past the limit;
- a failure in one request is that request's INTERNAL error, logged once with its error_id;
  the listener goes on.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import trio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from jobwarden.config import HttpSection
from jobwarden.errors import HTTP_STATUS, RequestError, StoreError, error_body
from jobwarden.metrics import Metrics
from jobwarden.process.commands import Commands, ConnectionCap, Refusals, error_reply, log_failure
from jobwarden.store.engine import Store
from jobwarden.wire.views import ErrorBody

JSON = "application/json"
encoder = msgspec.json.Encoder()
# Codes a client should come back from later, and after how long when the refusal itself
# does not say: a queue that is full or a daemon that drains is worth a retry in a second.
RETRY_LATER = {429, 503, 507}
# Set in a request's scope by a route that waits on purpose (long-poll, event stream).
LONG_BY_DESIGN = "jobwarden.long_by_design"
DEFAULT_RETRY_AFTER = 1


@dataclass
class Context:
    """What routes may use: the daemon's parts, the listener's settings, and `stopping`, set
    when the daemon shuts the listener down (long-lived streams end on it)."""

    store: Store
    commands: Commands
    metrics: Metrics
    settings: HttpSection
    daemon_status: Callable[[], dict[str, Any]]
    slow: tuple[float, float]
    refusals: Refusals
    stopping: trio.Event = field(default_factory=trio.Event)


RouteGroup = Callable[[Context], Iterable[BaseRoute]]


class Exchange:
    """One request, as the refusals know it: its first refusal is logged, the rest counted."""


def exchange_of(scope: Scope) -> Exchange:
    exchange: Exchange = scope.setdefault("jobwarden.exchange", Exchange())
    return exchange


Handler = Callable[[Request], Awaitable[Response]]


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(encoder.encode(data) + b"\n", status, headers, media_type=JSON)


def error_response(body: ErrorBody, headers: dict[str, str] | None = None) -> Response:
    """The common error shape with the status its code means and the headers it calls for."""
    status = HTTP_STATUS.get(body.code, 500)
    extra = dict(headers or {})
    if status in RETRY_LATER:
        wait = body.retry_after if body.retry_after is not None else DEFAULT_RETRY_AFTER
        extra["Retry-After"] = str(max(0, math.ceil(wait)))
    if status == 401:
        extra["WWW-Authenticate"] = "Bearer"
    return json_response(body, status, extra)


def route(path: str, **handlers: Handler) -> Route:
    """One path with a handler per method (`route("/v1/jobs", GET=..., POST=...)`), so a 405
    names in `Allow` every method the path has."""

    async def dispatch(request: Request) -> Response:
        return await handlers[request.method if request.method != "HEAD" else "GET"](request)

    return Route(path, dispatch, methods=list(handlers))


def build_app(context: Context, groups: Iterable[RouteGroup]) -> ASGIApp:
    routes = [each for group in groups for each in group(context)]

    async def refused(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestError | StoreError)
        body = error_reply(exc, listener="http")
        context.refusals.refused(body, connection=exchange_of(request.scope), path=request.url.path)
        return error_response(body)

    async def http_exception(request: Request, exc: Exception) -> Response:
        # The router's own refusals: no route (404), or a method the path has not (405).
        assert isinstance(exc, HTTPException)
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            allowed = ", ".join(sorted(headers.get("Allow", "").split(", ")))
            headers["Allow"] = allowed
            body = error_body(
                "METHOD_NOT_ALLOWED",
                f"{request.method} is not allowed on {request.url.path} (allowed: {allowed})",
            )
        elif exc.status_code == 404:
            body = error_body("NOT_FOUND", f"no such path: {request.url.path}")
        else:
            body = error_body("INVALID_REQUEST", exc.detail)
        context.refusals.refused(body, connection=exchange_of(request.scope), path=request.url.path)
        response = error_response(body, headers)
        response.status_code = exc.status_code
        return response

    async def failed(request: Request, exc: Exception) -> Response:
        body = error_reply(exc, listener="http")
        context.refusals.refused(body, connection=exchange_of(request.scope))
        request.scope["jobwarden.logged"] = True
        return error_response(body)

    app = Starlette(
        routes=routes,
        exception_handlers={
            RequestError: refused,
            StoreError: refused,
            HTTPException: http_exception,
            Exception: failed,
        },
    )
    return Guard(app, context)


class Guard:
    """The layer around every request: the cap on requests at once, the body limit, timing,
    `X-Response-Time`, and the last word on any failure (see the module's docstring)."""

    def __init__(self, app: ASGIApp, context: Context) -> None:
        self._app = app
        self._context = context
        self._cap = ConnectionCap(context.settings.max_requests, "HTTP requests at once")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                await self._app(scope, receive, send)
            return
        started = trio.current_time()
        response_started = False
        body = _Body(receive, self._context.settings.max_body_bytes)

        client_gone = False
        observed = False

        def observe() -> None:
            """Time the request once: as its last message goes out (the client may hear the
            connection close before anything after that runs), or when it ends without one."""
            nonlocal observed
            if observed:
                return
            observed = True
            route = scope.get("route")
            name = route.path if isinstance(route, Route) else "other"
            seconds = trio.current_time() - started
            # A long-poll or an event stream is slow by design: timed, but not logged as slow.
            slow = (math.inf, math.inf) if scope.get(LONG_BY_DESIGN) else self._context.slow
            self._context.metrics.request_done("http", seconds, slow, path=name)

        async def timed_send(message: Message) -> None:
            nonlocal response_started, client_gone
            if client_gone:
                return
            if message["type"] == "http.response.start":
                response_started = True
                seconds = trio.current_time() - started
                headers = list(message.get("headers", []))
                headers.append((b"x-response-time", f"{seconds * 1000:.1f}ms".encode()))
                if not body.complete:
                    # A body left unread cannot be skipped on a kept-alive connection.
                    headers.append((b"connection", b"close"))
                message = {**message, "headers": headers}
            try:
                if message["type"] == "http.response.body" and not message.get("more_body"):
                    observe()
                    await body.discard_while(send(message))
                else:
                    await send(message)
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
                # The client went away: the rest of the answer has no one to go to.
                client_gone = True
            except trio.BusyResourceError:
                # Hypercorn closes a connection the client ended (send_eof) without its send
                # lock, so it can meet our send: the connection is over just the same.
                client_gone = True

        try:
            try:
                slot = self._cap.admit()
            except RequestError as refusal:
                await self._refuse(scope, refusal.body, timed_send)
                return
            with slot:
                limit = self._context.settings.max_body_bytes
                length = _content_length(scope)
                if length is not None and length > limit:
                    error = error_body(
                        "PAYLOAD_TOO_LARGE",
                        f"the body is {length} bytes; at most {limit} are accepted",
                    )
                    await self._refuse(scope, error, timed_send)
                    return
                await self._app(scope, body.receive, timed_send)
        except Exception as exc:
            if scope.get("jobwarden.logged"):
                return
            if response_started:
                log_failure("http response failed", exc, path=scope.get("path", ""))
                return
            await self._refuse(scope, error_reply(exc, listener="http"), timed_send)
        finally:
            observe()

    async def _refuse(self, scope: Scope, error: ErrorBody, send: Send) -> None:
        path = scope.get("path", "")
        self._context.refusals.refused(error, connection=exchange_of(scope), path=path)
        await error_response(error)(scope, _no_body, send)


async def _no_body() -> Message:
    return {"type": "http.disconnect"}


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


class _Body:
    """A request's body as the app receives it: cut off with PAYLOAD_TOO_LARGE once it grows
    past `limit` bytes (a body sent in chunks, without a Content-Length, is read only that
    far), and whether it has all arrived."""

    def __init__(self, receive: Receive, limit: int) -> None:
        self._receive = receive
        self._limit = limit
        self._received = 0
        self.complete = False

    async def receive(self) -> Message:
        message = await self._receive()
        if message["type"] == "http.request":
            self._received += len(message.get("body", b""))
            if self._received > self._limit:
                raise RequestError(
                    "PAYLOAD_TOO_LARGE",
                    f"the body grew past {self._limit} bytes; at most that many are accepted",
                )
            self.complete = not message.get("more_body", False)
        else:
            self.complete = True
        return message

    async def discard_while(self, sending: Awaitable[None]) -> None:
        """Await `sending` (a response's last message) while the body not read is thrown
        away: Hypercorn ends a response by queueing a disconnect behind the body, and a body
        the app left unread would fill that queue, so the last message would never go."""
        if self.complete:
            await sending
            return
        async with trio.open_nursery() as nursery:

            async def discard() -> None:
                while (await self._receive())["type"] == "http.request":
                    pass

            nursery.start_soon(discard)
            await sending
            nursery.cancel_scope.cancel()
