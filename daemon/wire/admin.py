"""The admin socket: newline-delimited JSON.

A request is `{"id", "cmd", "args"}`; the reply carries the same id: `{"id", "ok": true,
"data": ...}` or `{"id", "ok": false, "error": {...}}`. `watch` answers with `{"id", "ok":
true, "data": {"watching": ...}}` and then streams `{"id", "event": {...}}` lines until the
client closes the connection.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from jobwarden.wire.views import ErrorBody, JobStatus


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
