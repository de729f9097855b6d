"""The admin socket: newline-delimited JSON.

A request is `{"id", "cmd", "args"}`, typed per command below (`args` may be left out when
the command needs none); the reply carries the same id: `{"id", "ok": true,
"data": ...}` or `{"id", "ok": false, "error": {...}}`. `watch` answers with `{"id", "ok":
true, "data": {"watching": ...}}` and then streams `{"id", "event": {...}}` lines until the
client closes the connection.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, get_args

import msgspec

from jobwarden.wire.views import (
    ErrorBody,
    JobFilter,
    JobStatus,
    JobView,
    LogLine,
    RequestId,
    StoredInt,
    Submission,
)


class Reply(msgspec.Struct, omit_defaults=True):
    id: str | int | None
    ok: bool
    data: Any = None
    error: ErrorBody | None = None


class EventLine(msgspec.Struct):
    id: str | int | None
    event: Any


class LogLineMessage(msgspec.Struct):
    """A followed job's new log line."""

    id: str | int | None
    log: LogLine


class LogEnd(msgspec.Struct):
    """A followed job is final and every line of its log was sent."""

    id: str | int | None
    ended: JobView


# Arguments per command, decoded with forbid_unknown_fields so a typo is an error.


class Args(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class NoArgs(Args):
    pass


class SubmitArgs(Submission):
    # Whose job it is: the operator submits on anyone's behalf.
    user: str = "local"


class SubmitManyArgs(Args):
    items: list[Submission]
    # All items or none: the first refusal refuses the batch, naming its item.
    atomic: bool = False
    # Whose jobs they are: the operator submits on anyone's behalf.
    user: str = "local"


class JobsArgs(Args):
    status: list[JobStatus] | None = None
    kind: str | None = None
    user: str | None = None
    tag: str | None = None
    limit: StoredInt = 50


class JobArgs(Args):
    job: StoredInt


class BulkArgs(Args):
    filter: JobFilter
    # Say how many and which jobs would be taken, change nothing.
    dry_run: bool = False
    # Ids listed in the answer, lowest first.
    show: Annotated[int, msgspec.Meta(ge=0)] = 20


class LogsArgs(Args):
    job: StoredInt
    # Lines after this line id (0: from the first kept).
    after: Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)] = 0
    # Then new lines as they come, until the job is final.
    follow: bool = False


class KindArgs(Args):
    kind: str | None = None


class WatchArgs(Args):
    job: StoredInt | None = None
    user: str | None = None
    # Events after this seq. Omitted: a job's whole history, or, watching all jobs, from now.
    since: StoredInt | None = None


class StuckArgs(Args):
    dry_run: bool = False


class WebhooksArgs(Args):
    job: StoredInt | None = None
    # Only deliveries not yet made (due, or given up).
    pending: bool = False
    limit: StoredInt = 50


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


class ScheduleArgs(Args):
    """`list` every schedule; `pause`, `resume` or `trigger` (one run now) the one named."""

    action: Literal["list", "pause", "resume", "trigger"] = "list"
    name: str | None = None


NonNegative = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]


class UsersArgs(Args):
    """`list`, `show`, `add`, `set`, `credits` (change by a signed amount), `disable`,
    `enable`, `token` (a new token; the old one stops working), `hold` (their queued jobs
    wait), `release`."""

    action: Literal[
        "list", "show", "add", "set", "credits", "disable", "enable", "token", "hold", "release"
    ] = "list"
    name: str | None = None
    # add/set: the balance; "unlimited" turns the credit check off for this user.
    credits: NonNegative | Literal["unlimited"] | None = None
    # credits: the change, e.g. 50 or -10.
    change: StoredInt | None = None
    # Own limits over the [limits] defaults; daily_limit/max_running 0 and rate "off": none.
    daily_limit: NonNegative | None = None
    rate: str | None = None
    max_running: NonNegative | None = None


class TokensArgs(Args):
    """`list`, `add` (a new operator token for the HTTP API, shown once), `revoke`."""

    action: Literal["list", "add", "revoke"] = "list"
    name: str | None = None


# One request type per command: `cmd` is the tag, `args` that command's own arguments, so one
# decode gives a typed request (and a typo in either is an error). A command whose arguments
# all have defaults may leave `args` out.


class Request(msgspec.Struct, tag_field="cmd", forbid_unknown_fields=True, kw_only=True):
    id: RequestId = None


class PingRequest(Request, tag="ping"):
    """The daemon's version and pid: is it there?"""

    args: NoArgs = msgspec.field(default_factory=NoArgs)


class SubmitRequest(Request, tag="submit"):
    """A job for `args.user`: `{job, existing}`."""

    args: SubmitArgs


class SubmitManyRequest(Request, tag="submit_many"):
    """Jobs for `args.user` in one commit: `{accepted, existing, refused, results}`."""

    args: SubmitManyArgs


class JobsRequest(Request, tag="jobs"):
    """Jobs, newest first, and why the queued ones wait."""

    args: JobsArgs = msgspec.field(default_factory=JobsArgs)


class ShowRequest(Request, tag="show"):
    """One job with its payload, checkpoint and latest events."""

    args: JobArgs


class CancelRequest(Request, tag="cancel"):
    """Cancel a queued or running job."""

    args: JobArgs


class RetryRequest(Request, tag="retry"):
    """Queue a finished job again."""

    args: JobArgs


class HoldRequest(Request, tag="hold"):
    """Hold a queued job until it is released."""

    args: JobArgs


class ReleaseRequest(Request, tag="release"):
    """Release a held job."""

    args: JobArgs


class CancelManyRequest(Request, tag="cancel_many"):
    """Cancel every queued or running job the filter matches (or, dry run, count them)."""

    args: BulkArgs


class RetryManyRequest(Request, tag="retry_many"):
    """Queue again every failed or canceled job the filter matches (or count them)."""

    args: BulkArgs


class LogsRequest(Request, tag="logs"):
    """A job's log: `{dropped, lines}`; with `follow`, `{following, dropped}`, then
    `{"id", "log": line}` lines as they come, and `{"id", "ended": job}` once it is final."""

    args: LogsArgs


class PauseRequest(Request, tag="pause"):
    """Hold a kind's queued jobs (no kind: every kind's)."""

    args: KindArgs = msgspec.field(default_factory=KindArgs)


class ResumeRequest(Request, tag="resume"):
    """Dispatch a paused kind again (no kind: every kind)."""

    args: KindArgs = msgspec.field(default_factory=KindArgs)


class DrainRequest(Request, tag="drain"):
    """Stop admitting, let running jobs finish within the grace, then exit."""

    args: NoArgs = msgspec.field(default_factory=NoArgs)


class ShutdownRequest(Request, tag="shutdown"):
    """Exit now: running jobs are interrupted and requeued."""

    args: NoArgs = msgspec.field(default_factory=NoArgs)


class StatusRequest(Request, tag="status"):
    """The health snapshot."""

    args: NoArgs = msgspec.field(default_factory=NoArgs)


class WatchRequest(Request, tag="watch"):
    """Stream events until the client stops sending."""

    args: WatchArgs = msgspec.field(default_factory=WatchArgs)


class StuckRequest(Request, tag="stuck"):
    """Run the monitor's rules now (or only say what they would do)."""

    args: StuckArgs = msgspec.field(default_factory=StuckArgs)


class WebhooksRequest(Request, tag="webhooks"):
    """Webhook deliveries, newest first: a job's, or those not yet made."""

    args: WebhooksArgs = msgspec.field(default_factory=WebhooksArgs)


class BreakersRequest(Request, tag="breakers"):
    """Every service's circuit."""

    args: NoArgs = msgspec.field(default_factory=NoArgs)


class BreakerRequest(Request, tag="breaker"):
    """Reset or trip one service's circuit."""

    args: BreakerArgs


class LedgerRequest(Request, tag="ledger"):
    """Spending of a day or a month, grouped."""

    args: LedgerArgs = msgspec.field(default_factory=LedgerArgs)


class BudgetRequest(Request, tag="budget"):
    """Show, set or resume the budget."""

    args: BudgetArgs = msgspec.field(default_factory=BudgetArgs)


class UsersRequest(Request, tag="users"):
    """List, show, add or change users."""

    args: UsersArgs = msgspec.field(default_factory=UsersArgs)


class SchedulesRequest(Request, tag="schedules"):
    """List the recurring schedules with their next and latest runs; pause, resume or
    trigger one."""

    args: ScheduleArgs = msgspec.field(default_factory=ScheduleArgs)


class TokensRequest(Request, tag="tokens"):
    """List, add or revoke operator tokens."""

    args: TokensArgs = msgspec.field(default_factory=TokensArgs)


AdminRequest = (
    PingRequest
    | SubmitRequest
    | SubmitManyRequest
    | JobsRequest
    | ShowRequest
    | CancelRequest
    | RetryRequest
    | CancelManyRequest
    | HoldRequest
    | LogsRequest
    | ReleaseRequest
    | RetryManyRequest
    | PauseRequest
    | ResumeRequest
    | DrainRequest
    | ShutdownRequest
    | StatusRequest
    | WatchRequest
    | StuckRequest
    | WebhooksRequest
    | BreakersRequest
    | BreakerRequest
    | LedgerRequest
    | BudgetRequest
    | UsersRequest
    | SchedulesRequest
    | TokensRequest
)
COMMANDS = tuple(sorted(request.__struct_config__.tag for request in get_args(AdminRequest)))
request_decoder = msgspec.json.Decoder(AdminRequest)
encoder = msgspec.json.Encoder()


def encode_line(message: Any) -> bytes:
    return encoder.encode(message) + b"\n"
