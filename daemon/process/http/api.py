"""The /v1 JSON API: applications submit and follow their jobs, operators do what the admin
socket does. docs/http-api.md describes every route; /v1/openapi.json is generated from the
same bodies (jobwarden.wire.http).

Each route authenticates (auth.py), decodes its input into a wire Struct, and asks the one
command layer, so a request means here what it means on the admin socket and the WebSocket.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec
import trio
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute

from jobwarden.config import name_path, parse_duration
from jobwarden.errors import RequestError
from jobwarden.process.commands import LOG_PAGE, Caller
from jobwarden.process.http import openapi
from jobwarden.process.http.app import LONG_BY_DESIGN, Context, Handler, json_response, route
from jobwarden.process.http.auth import caller_of, operator_of
from jobwarden.process.http.events import event_stream, log_stream
from jobwarden.wire.admin import BreakerArgs, BudgetArgs, BulkArgs, LedgerArgs, UsersArgs
from jobwarden.wire.http import (
    BatchBody,
    BudgetBody,
    CreditsBody,
    JobDetail,
    JobPage,
    JobResult,
    NewUserBody,
    SubmitBody,
    UserChangeBody,
)
from jobwarden.wire.views import (
    MAX_DEPTH,
    STATUSES,
    TERMINAL_STATUSES,
    JobStatus,
    nesting_depth_exceeds,
)

B = TypeVar("B", bound=msgspec.Struct)

# The largest id a job can have (a signed 64-bit INTEGER): a larger one names no job.
MAX_JOB_ID = 2**63 - 1
DEFAULT_LIMIT = 50
# Whom an operator's submission is for, when it names no user: as on the admin socket.
OPERATORS_USER = "local"


def routes(context: Context) -> list[BaseRoute]:
    store, commands, settings = context.store, context.commands, context.settings

    async def read_body(request: Request, body_type: type[B]) -> B:
        """The request's JSON body as `body_type`, or INVALID_REQUEST naming what is wrong."""
        with trio.move_on_after(settings.body_timeout):
            return decode_body(await request.body(), body_type)
        raise RequestError(
            "REQUEST_TIMEOUT", f"the body did not arrive within {settings.body_timeout:g}s"
        )

    # -- jobs: users and operators ------------------------------------------------------------

    async def submit(request: Request) -> Response:
        caller = await caller_of(request, store)
        new = await read_body(request, SubmitBody)
        job, existing = await commands.submit(_submitter(caller, new.user), new)
        return json_response(job, 200 if existing else 202, {"Location": f"/v1/jobs/{job.id}"})

    async def submit_many(request: Request) -> Response:
        caller = await caller_of(request, store)
        batch = await read_body(request, BatchBody)
        user = _submitter(caller, batch.user)
        return json_response(await commands.submit_many(user, batch.items, atomic=batch.atomic))

    async def cancel_many(request: Request) -> Response:
        caller = await caller_of(request, store)
        bulk = await read_body(request, BulkArgs)
        outcome = await commands.cancel_many(
            caller, bulk.filter, dry_run=bulk.dry_run, show=bulk.show
        )
        return json_response(outcome)

    async def logs(request: Request) -> Response:
        """A page of the job's log; `?follow=1`: its lines as Server-Sent Events until the
        job is final, resuming after Last-Event-ID (a line id)."""
        caller = await caller_of(request, store)
        job_id = _job_id(request)
        query = request.query_params
        after = request.headers.get("last-event-id") or query.get("after")
        after_id = _whole_number(after, "after", 0)
        if query.get("follow") in (None, "", "0", "false"):
            limit = _whole_number(query.get("limit"), "limit", LOG_PAGE)
            return json_response(await commands.logs(caller, job_id, after=after_id, limit=limit))
        request.scope[LONG_BY_DESIGN] = True
        return await log_stream(context, caller, job_id, after=after_id)

    async def list_jobs(request: Request) -> Response:
        caller = await caller_of(request, store)
        query = request.query_params
        user = query.get("user")
        if caller.user is not None and user not in (None, caller.user):
            raise RequestError("FORBIDDEN", "user: a user's token lists that user's jobs only")
        limit = _whole_number(query.get("limit"), "limit", DEFAULT_LIMIT)
        cursor = query.get("cursor")
        found = await commands.jobs(
            caller,
            status=_statuses(query.getlist("status")),
            kind=query.get("kind"),
            user=user,
            tag=query.get("tag"),
            limit=limit,
            before=None if cursor is None else _whole_number(cursor, "cursor", 0),
        )
        next_cursor = str(found[-1].id) if len(found) == limit else None
        return json_response(JobPage(jobs=found, next_cursor=next_cursor))

    async def show(request: Request) -> Response:
        shown = await commands.show(await caller_of(request, store), _job_id(request))
        return json_response(JobDetail(job=shown.job, events=shown.events, waiting=shown.waiting))

    async def cancel(request: Request) -> Response:
        caller = await caller_of(request, store)
        return json_response(await commands.cancel(caller, _job_id(request)))

    async def result(request: Request) -> Response:
        caller = await caller_of(request, store)
        job_id = _job_id(request)
        request.scope[LONG_BY_DESIGN] = True
        wait = min(_duration(request.query_params.get("wait"), "wait"), settings.max_wait)
        job = await commands.wait_final(caller, job_id, timeout=wait)
        final = job.status in TERMINAL_STATUSES
        body = JobResult(id=job.id, status=job.status, result=job.result, error=job.error)
        return json_response(body, 200 if final else 202)

    async def events(request: Request) -> Response:
        """One job's events, or (no id in the path) every job's the caller may see."""
        caller = await caller_of(request, store)
        since = request.headers.get("last-event-id") or request.query_params.get("since")
        request.scope[LONG_BY_DESIGN] = True
        return await event_stream(
            context,
            caller,
            _job_id(request) if "id" in request.path_params else None,
            since=None if since is None else _whole_number(since, "Last-Event-ID", 0),
        )

    # -- the operator's ----------------------------------------------------------------------

    def operator(answer: Callable[[Request], Awaitable[Any]], status: int = 200) -> Handler:
        """A route for operator tokens only, answering with what `answer` returns."""

        async def handle(request: Request) -> Response:
            await operator_of(request, store)
            return json_response(await answer(request), status)

        return handle

    async def retry(request: Request) -> Any:
        return await commands.retry(_job_id(request))

    async def retry_many(request: Request) -> Any:
        bulk = await read_body(request, BulkArgs)
        return await commands.retry_many(bulk.filter, dry_run=bulk.dry_run, show=bulk.show)

    def hold(held: bool) -> Handler:
        return operator(lambda request: commands.hold(_job_id(request), held=held))

    def schedule(action: str) -> Handler:
        return operator(
            lambda request: commands.schedule_action(action, request.path_params["name"])
        )

    def breaker(action: str) -> Handler:
        return operator(
            lambda request: commands.breaker(
                BreakerArgs(service=request.path_params["service"], action=action)  # type: ignore[arg-type]
            )
        )

    async def set_budget(request: Request) -> Any:
        body = await read_body(request, BudgetBody)
        return await commands.budget(BudgetArgs(action="set", **msgspec.structs.asdict(body)))

    async def ledger(request: Request) -> Any:
        return await commands.ledger(_from_query(request, LedgerArgs))

    async def add_user(request: Request) -> Any:
        body = await read_body(request, NewUserBody)
        return await commands.users(UsersArgs(action="add", **msgspec.structs.asdict(body)))

    def user_action(action: str) -> Callable[[Request], Awaitable[Any]]:
        """A `users` action on the user the path names (`list`: on none)."""

        async def act(request: Request) -> Any:
            name = request.path_params.get("name")
            return await commands.users(UsersArgs(action=action, name=name))  # type: ignore[arg-type]

        return act

    async def change_user(request: Request) -> Any:
        name = request.path_params["name"]
        changes = msgspec.structs.asdict(await read_body(request, UserChangeBody))
        disabled = changes.pop("disabled")
        reply = await commands.users(UsersArgs(action="set", name=name, **changes))
        if disabled is not None:
            action = "disable" if disabled else "enable"
            reply = await commands.users(UsersArgs(action=action, name=name))
        return reply

    async def credits(request: Request) -> Any:
        body = await read_body(request, CreditsBody)
        name = request.path_params["name"]
        return await commands.users(UsersArgs(action="credits", name=name, change=body.change))

    async def schedules(request: Request) -> Any:
        return {"schedules": await commands.schedules()}

    async def spec(request: Request) -> Response:
        return json_response(openapi.document())

    return [
        route("/v1/openapi.json", GET=spec),
        route("/v1/jobs", GET=list_jobs, POST=submit),
        route("/v1/jobs:batch", POST=submit_many),
        route("/v1/jobs:cancel", POST=cancel_many),
        route("/v1/jobs:retry", POST=operator(retry_many)),
        route("/v1/jobs/{id}", GET=show),
        route("/v1/jobs/{id}/cancel", POST=cancel),
        route("/v1/jobs/{id}/result", GET=result),
        route("/v1/jobs/{id}/events", GET=events),
        route("/v1/jobs/{id}/logs", GET=logs),
        route("/v1/events", GET=events),
        route("/v1/jobs/{id}/retry", POST=operator(retry)),
        route("/v1/jobs/{id}/hold", POST=hold(True)),
        route("/v1/jobs/{id}/release", POST=hold(False)),
        route("/v1/status", GET=operator(lambda request: commands.health())),
        route("/v1/pause", POST=operator(lambda r: commands.pause(r.query_params.get("kind")))),
        route("/v1/resume", POST=operator(lambda r: commands.resume(r.query_params.get("kind")))),
        route(
            "/v1/stuck",
            GET=operator(lambda request: commands.stuck(dry_run=True)),
            POST=operator(lambda request: commands.stuck(dry_run=False)),
        ),
        route("/v1/breakers", GET=operator(lambda request: commands.breakers())),
        route("/v1/breakers/{service}/trip", POST=breaker("trip")),
        route("/v1/breakers/{service}/reset", POST=breaker("reset")),
        route(
            "/v1/budget",
            GET=operator(lambda request: commands.budget(BudgetArgs())),
            PUT=operator(set_budget),
        ),
        route(
            "/v1/budget/resume",
            POST=operator(lambda request: commands.budget(BudgetArgs(action="resume"))),
        ),
        route("/v1/ledger", GET=operator(ledger)),
        route(
            "/v1/users",
            GET=operator(user_action("list")),
            POST=operator(add_user, status=201),
        ),
        route("/v1/users/{name}", GET=operator(user_action("show")), PATCH=operator(change_user)),
        route("/v1/users/{name}/token", POST=operator(user_action("token"))),
        route("/v1/users/{name}/credits", POST=operator(credits)),
        route("/v1/users/{name}/hold", POST=operator(user_action("hold"))),
        route("/v1/users/{name}/release", POST=operator(user_action("release"))),
        route("/v1/schedules", GET=operator(schedules)),
        route("/v1/schedules/{name}/pause", POST=schedule("pause")),
        route("/v1/schedules/{name}/resume", POST=schedule("resume")),
        route("/v1/schedules/{name}/trigger", POST=schedule("trigger")),
    ]


# -- reading a request --------------------------------------------------------------------------


def _submitter(caller: Caller, named: str | None) -> str:
    """Whose jobs a submission makes: an operator's for the user it names (default "local"),
    a user's token for its own user only."""
    if caller.user is None:
        return named or OPERATORS_USER
    if named in (None, caller.user):
        return caller.user
    raise RequestError("FORBIDDEN", "user: a user's token submits for that user only")


def decode_body(data: bytes, body_type: type[B]) -> B:
    """`data` as `body_type`, or INVALID_REQUEST with the path of the field that is wrong."""
    if not data.strip():
        raise RequestError("INVALID_REQUEST", "the body is empty: send a JSON object")
    if nesting_depth_exceeds(data):
        raise RequestError(
            "INVALID_REQUEST", f"arrays and objects nest deeper than {MAX_DEPTH} levels"
        )
    try:
        return msgspec.json.decode(data, type=body_type)
    except msgspec.ValidationError as exc:
        raise RequestError("INVALID_REQUEST", name_path(str(exc), "", body_type)) from None
    except msgspec.DecodeError as exc:
        raise RequestError("INVALID_REQUEST", f"not valid JSON: {exc}") from None


def _from_query(request: Request, args_type: type[B]) -> B:
    try:
        return msgspec.convert(dict(request.query_params), args_type, strict=False)
    except msgspec.ValidationError as exc:
        raise RequestError("INVALID_REQUEST", name_path(str(exc), "", args_type)) from None


def _job_id(request: Request) -> int:
    raw = request.path_params["id"]
    if not raw.isdigit() or not 0 < int(raw) <= MAX_JOB_ID:
        raise RequestError("NOT_FOUND", f"no job {raw[:32]!r}")
    return int(raw)


def _whole_number(raw: str | None, name: str, default: int) -> int:
    if raw is None:
        return default
    if not raw.isdigit() or int(raw) > MAX_JOB_ID:
        raise RequestError("INVALID_REQUEST", f"{name}: expected a whole number, got {raw[:32]!r}")
    return int(raw)


def _statuses(raw: list[str]) -> list[JobStatus] | None:
    """?status=queued&status=running, or ?status=queued,running."""
    named = [status for each in raw for status in each.split(",") if status]
    unknown = [status for status in named if status not in STATUSES]
    if unknown:
        raise RequestError(
            "INVALID_REQUEST",
            f"status: expected one of {', '.join(STATUSES)}; got {unknown[0][:32]!r}",
        )
    return named or None  # type: ignore[return-value]


def _duration(raw: str | None, name: str) -> float:
    """`30s`, `2m`, or a number of seconds; omitted: 0 (answer at once)."""
    if raw is None:
        return 0.0
    try:
        seconds = float(raw) if raw.replace(".", "", 1).isdigit() else parse_duration(raw)
    except ValueError:
        raise RequestError(
            "INVALID_REQUEST", f"{name}: expected a duration like 30s or 2m, got {raw[:32]!r}"
        ) from None
    if not math.isfinite(seconds):
        raise RequestError("INVALID_REQUEST", f"{name}: expected a finite duration")
    return seconds
