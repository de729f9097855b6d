"""The wire: what flows over the admin socket and the WebSocket, in one place.

Admin socket: newline-delimited JSON. A request is `{"id", "cmd", "args"}`; the reply carries
the same id: `{"id", "ok": true, "data": ...}` or `{"id", "ok": false, "error": {...}}`.
`watch` answers with `{"id", "ok": true, "data": {"watching": ...}}` and then streams
`{"id", "event": {...}}` lines until the client closes the connection.

WebSocket: JSON text frames, at the end of this module.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

JobStatus = Literal["queued", "running", "done", "failed", "canceled"]
TERMINAL_STATUSES = frozenset({"done", "failed", "canceled"})


class ErrorBody(msgspec.Struct, omit_defaults=True):
    """The one error shape: message for a person, technical_message for the log."""

    code: str
    message: str
    # No default, so it is never omitted: a client must always be told whether to retry.
    retryable: bool
    error_id: str = ""
    retry_after: float | None = None
    technical_message: str | None = None
    request_id: str | None = None


class Request(msgspec.Struct, forbid_unknown_fields=True):
    cmd: str
    id: str | int | None = None
    args: dict[str, Any] = msgspec.field(default_factory=dict)


class Reply(msgspec.Struct, omit_defaults=True):
    id: str | int | None
    ok: bool
    data: Any = None
    error: ErrorBody | None = None


class EventLine(msgspec.Struct):
    id: str | int | None
    event: Any


class JobView(msgspec.Struct, omit_defaults=True):
    """A job as clients see it; times are Unix epoch seconds on the daemon's clock."""

    id: int
    kind: str
    user: str
    status: JobStatus
    priority: int
    attempt: int
    max_attempts: int
    created_at: float
    updated_at: float
    available_at: float
    started_at: float | None = None
    finished_at: float | None = None
    progress: float | None = None
    message: str | None = None
    reason: str | None = None
    idempotency_key: str | None = None
    result: Any = None
    error: ErrorBody | None = None
    payload: Any = None
    checkpoint: Any = None


class Event(msgspec.Struct, omit_defaults=True):
    """One row of the events table. type "status" carries a transition, "progress" a report,
    "breaker" a circuit's change (job 0 and user "": it belongs to no job), "position" a
    queued job's place in the queue and why it waits (coalesced; see actors/scheduler.py).

    status data: {"status", "reason"?, "attempt", "available_at"?, "result"?, "error"?}
    progress data: {"fraction", "message"?}
    breaker data: {"service", "state", "open_until"}
    position data: {"position", "queued", "kind_position", "kind_queued", "reason"}
    cost data: {"service", "units", "usd", "ok", "job_usd"} (one per external call; job_usd is
    the job's total so far)
    """

    seq: int
    job: int
    user: str
    kind: str
    type: Literal["status", "progress", "breaker", "position", "cost"]
    at: float
    data: dict[str, Any]


# Arguments per command, decoded with forbid_unknown_fields so a typo is an error.


class Args(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class NoArgs(Args):
    pass


class SubmitArgs(Args):
    kind: str
    payload: Any = msgspec.field(default_factory=dict)
    priority: int | None = None
    idempotency_key: str | None = None
    user: str = "local"


class JobsArgs(Args):
    status: list[JobStatus] | None = None
    kind: str | None = None
    user: str | None = None
    limit: int = 50


class JobArgs(Args):
    job: int


class KindArgs(Args):
    kind: str | None = None


class WatchArgs(Args):
    job: int | None = None
    user: str | None = None
    # Events after this seq. Omitted: a job's whole history, or, watching all jobs, from now.
    since: int | None = None


class StuckArgs(Args):
    dry_run: bool = False


class BreakerArgs(Args):
    service: str
    action: Literal["reset", "trip"]


class LedgerArgs(Args):
    # A day "2026-11-22" or a month "2026-11"; neither: today.
    day: str | None = None
    month: str | None = None
    by: Literal["service", "user", "kind"] = "service"


class BudgetArgs(Args):
    action: Literal["show", "set", "resume"] = "show"
    daily_usd: Annotated[float, msgspec.Meta(ge=0)] | None = None
    monthly_usd: Annotated[float, msgspec.Meta(ge=0)] | None = None


NonNegative = Annotated[int, msgspec.Meta(ge=0)]


class UsersArgs(Args):
    """`list`, `show`, `add`, `set`, `credits` (change by a signed amount), `disable`,
    `enable`, `token` (a new token; the old one stops working)."""

    action: Literal["list", "show", "add", "set", "credits", "disable", "enable", "token"] = "list"
    name: str | None = None
    # add/set: the balance; "unlimited" turns the credit check off for this user.
    credits: NonNegative | Literal["unlimited"] | None = None
    # credits: the change, e.g. 50 or -10.
    change: int | None = None
    # Own limits over the [limits] defaults; daily_limit/max_running 0 and rate "off": none.
    daily_limit: NonNegative | None = None
    rate: str | None = None
    max_running: NonNegative | None = None


COMMAND_ARGS: dict[str, type[Args]] = {
    "ping": NoArgs,
    "submit": SubmitArgs,
    "jobs": JobsArgs,
    "show": JobArgs,
    "cancel": JobArgs,
    "retry": JobArgs,
    "pause": KindArgs,
    "resume": KindArgs,
    "drain": NoArgs,
    "shutdown": NoArgs,
    "status": NoArgs,
    "watch": WatchArgs,
    "stuck": StuckArgs,
    "breakers": NoArgs,
    "breaker": BreakerArgs,
    "ledger": LedgerArgs,
    "budget": BudgetArgs,
    "users": UsersArgs,
}

request_decoder = msgspec.json.Decoder(Request)
encoder = msgspec.json.Encoder()


def encode_line(message: Any) -> bytes:
    return encoder.encode(message) + b"\n"


# -- WebSocket ------------------------------------------------------------------------------
# JSON text frames. A client sends ops `{"op", "id"?, ...}`; each is answered by one frame with
# the same id (`accepted`, `watching`, `unwatched`, `canceled`, `jobs` or `error`). A watch
# pushes its events as frames of their own type (`status`, `progress`, `position`, ...), each
# with `watch`, `seq` and `job`, and a watch that fell behind ends with `resync`.

WatchKey = int | Literal["all"]


class WsOp(msgspec.Struct, tag_field="op", forbid_unknown_fields=True, kw_only=True):
    id: str | int | None = None


class WsSubmit(WsOp, tag="submit"):
    kind: str
    payload: Any = msgspec.field(default_factory=dict)
    priority: int | None = None
    idempotency_key: str | None = None


class WsWatch(WsOp, tag="watch"):
    """One job, or `all` the user's jobs; events after `since` (omitted: the job's whole
    history, or, watching all, from now)."""

    job: int | None = None
    all: bool = False
    since: int | None = None


class WsUnwatch(WsOp, tag="unwatch"):
    job: int | None = None
    all: bool = False


class WsCancel(WsOp, tag="cancel"):
    job: int


class WsJobs(WsOp, tag="jobs"):
    status: list[JobStatus] | None = None
    kind: str | None = None
    limit: int = 50


WS_OPS = ("cancel", "jobs", "submit", "unwatch", "watch")
ws_op_decoder = msgspec.json.Decoder(WsSubmit | WsWatch | WsUnwatch | WsCancel | WsJobs)


class WsReply(msgspec.Struct, tag_field="type", omit_defaults=True, kw_only=True):
    id: str | int | None = None


class WsAccepted(WsReply, tag="accepted"):
    job: JobView
    existing: bool


class WsWatching(WsReply, tag="watching"):
    watch: WatchKey
    # Events after this seq follow; the job as it is now, for a watch of one job.
    since: int
    job: JobView | None = None


class WsUnwatched(WsReply, tag="unwatched"):
    watch: WatchKey


class WsCanceled(WsReply, tag="canceled"):
    job: JobView


class WsJobList(WsReply, tag="jobs"):
    jobs: list[JobView]


class WsError(WsReply, tag="error"):
    error: ErrorBody


class WsResync(WsReply, tag="resync"):
    """The client read too slowly: this watch ended; watch again with `since` to go on."""

    watch: WatchKey
    since: int


class WsEvent(msgspec.Struct):
    """An Event (see above) of one of the connection's watches; `type` is the event's."""

    type: str
    watch: WatchKey
    seq: int
    job: int
    user: str
    kind: str
    at: float
    data: dict[str, Any]
