"""The OpenAPI 3.1 document of /v1, served at /v1/openapi.json.

The schemas are generated from the API's Structs (jobwarden.wire.http) with msgspec, so they
cannot drift from what the daemon decodes and sends. The operations are listed once below,
in the order docs/http-api.md describes them.
"""

from __future__ import annotations

from functools import cache
from typing import Any, NamedTuple

import msgspec

from jobwarden import __version__
from jobwarden.errors import HTTP_STATUS
from jobwarden.wire.http import SCHEMAS

REF = "#/components/schemas/{name}"


class Operation(NamedTuple):
    method: str
    path: str
    summary: str
    # The Struct the request body is (None: no body).
    body: str | None = None
    # Status of success, and the Struct its body is (None: an object the command returns).
    status: int = 200
    returns: str | None = None
    # Query parameters: name -> description.
    query: tuple[tuple[str, str], ...] = ()
    operator: bool = False
    # Another success status, with the same body (202: not final yet; 200: existing job).
    also: int | None = None
    stream: bool = False


OPERATIONS = (
    Operation(
        "post",
        "/v1/jobs",
        "Submit a job (202 Accepted; 200 with the existing job for a repeated idempotency key)",
        body="SubmitBody",
        status=202,
        returns="JobView",
        also=200,
    ),
    Operation(
        "post",
        "/v1/jobs:batch",
        "Submit many jobs in one commit: one result per item (its job or its refusal); "
        "`atomic`: all or none",
        body="BatchBody",
        returns="BatchResult",
    ),
    Operation(
        "post",
        "/v1/jobs:cancel",
        "Cancel every queued or running job a filter matches (a user's token: its own), or "
        "with `dry_run` count them",
        body="BulkArgs",
        returns="BulkOutcome",
    ),
    Operation(
        "post",
        "/v1/jobs:retry",
        "Queue again every failed or canceled job a filter matches, or with `dry_run` count them",
        body="BulkArgs",
        returns="BulkOutcome",
        operator=True,
    ),
    Operation(
        "get",
        "/v1/jobs",
        "List jobs, newest first, a page at a time",
        returns="JobPage",
        query=(
            ("status", "queued, running, done, failed or canceled; repeat or comma-separate"),
            ("kind", "only jobs of this kind"),
            ("tag", "only jobs with this tag"),
            ("user", "only this user's jobs (operator tokens)"),
            ("limit", "jobs per page (default 50)"),
            ("cursor", "the next_cursor of the page before"),
        ),
    ),
    Operation(
        "get", "/v1/jobs/{id}", "One job, its latest events, why it waits", returns="JobDetail"
    ),
    Operation("post", "/v1/jobs/{id}/cancel", "Cancel a queued or running job", returns="JobView"),
    Operation(
        "get",
        "/v1/jobs/{id}/result",
        "The job's result once final (200), or its status after `wait` (202)",
        returns="JobResult",
        query=(("wait", "how long to wait for the job to finish: 30s, 2m (default 0)"),),
        also=202,
    ),
    Operation(
        "get",
        "/v1/jobs/{id}/events",
        "The job's events as Server-Sent Events; resumes after Last-Event-ID",
        query=(("since", "resume after this seq (the Last-Event-ID header wins)"),),
        stream=True,
    ),
    Operation(
        "get",
        "/v1/jobs/{id}/logs",
        "The job's log lines after a line id, and how many older lines were dropped; with "
        "`follow`, its lines as Server-Sent Events until the job is final",
        returns="JobLog",
        query=(
            ("after", "lines after this line id (default 0; Last-Event-ID wins)"),
            ("limit", "lines at most (default and at most 1000)"),
            ("follow", "1: stream the lines as they are written, then `end` with the job"),
        ),
    ),
    Operation(
        "get",
        "/v1/events",
        "Every job's events the caller sees (an operator's: breakers' too) as Server-Sent "
        "Events, from now or after Last-Event-ID",
        query=(("since", "resume after this seq (the Last-Event-ID header wins)"),),
        stream=True,
    ),
    Operation("post", "/v1/jobs/{id}/retry", "Queue a finished job again", operator=True),
    Operation("post", "/v1/jobs/{id}/hold", "Hold a queued job until released", operator=True),
    Operation("post", "/v1/jobs/{id}/release", "Release a held job", operator=True),
    Operation("get", "/v1/status", "The daemon's health snapshot", operator=True),
    Operation(
        "post",
        "/v1/pause",
        "Hold a kind's queued jobs (no kind: every kind's)",
        query=(("kind", "the kind to pause"),),
        operator=True,
    ),
    Operation(
        "post",
        "/v1/resume",
        "Dispatch a paused kind (no kind: every kind) again",
        query=(("kind", "the kind to resume"),),
        operator=True,
    ),
    Operation("get", "/v1/stuck", "What the monitor's rules would do now", operator=True),
    Operation("post", "/v1/stuck", "Run the monitor's rules now", operator=True),
    Operation("get", "/v1/breakers", "Every service's circuit", operator=True),
    Operation("post", "/v1/breakers/{service}/trip", "Open a service's circuit", operator=True),
    Operation("post", "/v1/breakers/{service}/reset", "Close a service's circuit", operator=True),
    Operation("get", "/v1/budget", "The budget and today's and this month's spend", operator=True),
    Operation("put", "/v1/budget", "Set the budget", body="BudgetBody", operator=True),
    Operation("post", "/v1/budget/resume", "Resume spending after a stop", operator=True),
    Operation(
        "get",
        "/v1/ledger",
        "Spending of a day or a month, grouped",
        query=(
            ("day", "YYYY-MM-DD (default today)"),
            ("month", "YYYY-MM"),
            ("by", "service, user or kind"),
        ),
        operator=True,
    ),
    Operation("get", "/v1/users", "Every user", operator=True),
    Operation(
        "post",
        "/v1/users",
        "Add a user; its token is in the answer, this once",
        body="NewUserBody",
        status=201,
        operator=True,
    ),
    Operation("get", "/v1/users/{name}", "One user", operator=True),
    Operation(
        "patch",
        "/v1/users/{name}",
        "Change a user's limits, disable or enable them",
        body="UserChangeBody",
        operator=True,
    ),
    Operation(
        "post",
        "/v1/users/{name}/token",
        "A new token for the user, shown this once; the old one stops working",
        operator=True,
    ),
    Operation(
        "post",
        "/v1/users/{name}/credits",
        "Add (or take) credits",
        body="CreditsBody",
        operator=True,
    ),
    Operation("post", "/v1/users/{name}/hold", "Hold a user's queued jobs", operator=True),
    Operation("post", "/v1/users/{name}/release", "Release a user's jobs", operator=True),
    Operation(
        "get", "/v1/schedules", "Recurring schedules, their next and latest runs", operator=True
    ),
    Operation("post", "/v1/schedules/{name}/pause", "Pause a schedule", operator=True),
    Operation("post", "/v1/schedules/{name}/resume", "Resume a schedule", operator=True),
    Operation("post", "/v1/schedules/{name}/trigger", "Run a schedule once now", operator=True),
)


def _content(schema: dict[str, Any], media_type: str = "application/json") -> dict[str, Any]:
    return {"content": {media_type: {"schema": schema}}}


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": REF.format(name=name)}


def _error(description: str) -> dict[str, Any]:
    return {"description": description, **_content(_ref("ErrorBody"))}


def _operation(op: Operation) -> dict[str, Any]:
    success = (
        _content({"type": "string"}, "text/event-stream")
        if op.stream
        else _content(_ref(op.returns) if op.returns else {"type": "object"})
    )
    responses: dict[str, Any] = {str(op.status): {"description": "OK", **success}}
    if op.also is not None:
        responses[str(op.also)] = {"description": "OK", **success}
    codes = sorted({status for status in HTTP_STATUS.values() if status >= 400})
    for status in codes:
        responses.setdefault(str(status), _error("refused; see `code` in the body"))
    parameters = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
        for name in ("id", "service", "name")
        if "{" + name + "}" in op.path
    ]
    parameters += [
        {
            "name": name,
            "in": "query",
            "required": False,
            "schema": {"type": "string"},
            "description": description,
        }
        for name, description in op.query
    ]
    operation: dict[str, Any] = {
        "summary": op.summary,
        "operationId": f"{op.method}_{op.path}".replace("/", "_").replace("{", "").replace("}", ""),
        "responses": responses,
        "security": [{"operator": []}] if op.operator else [{"user": []}, {"operator": []}],
    }
    if parameters:
        operation["parameters"] = parameters
    if op.body is not None:
        operation["requestBody"] = {"required": True, **_content(_ref(op.body))}
    return operation


@cache
def document() -> dict[str, Any]:
    """The OpenAPI document (built once: it depends on nothing that changes)."""
    _, components = msgspec.json.schema_components(SCHEMAS, ref_template=REF)
    paths: dict[str, dict[str, Any]] = {}
    for op in OPERATIONS:
        paths.setdefault(op.path, {})[op.method] = _operation(op)
    paths["/v1/openapi.json"] = {
        "get": {
            "summary": "This document",
            "operationId": "get_openapi",
            "security": [],
            "responses": {"200": {"description": "OK", **_content({"type": "object"})}},
        }
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "jobwarden",
            "version": __version__,
            "description": "Submit and follow jobs; operate the daemon. See docs/http-api.md.",
        },
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "user": {"type": "http", "scheme": "bearer", "description": "a user's token"},
                "operator": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "an operator token (jobwarden tokens add --operator NAME)",
                },
            },
        },
    }
