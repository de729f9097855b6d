"""The WebSocket: JSON text frames.

A client sends ops `{"op", "id"?, ...}`; each is answered by one frame with the same id
(`accepted`, `submitted`, `watching`, `unwatched`, `canceled`, `jobs` or `error`). A watch
pushes its events as frames of their own type (`status`, `progress`, `position`, ...), each
with `watch`, `seq` and `job`, and a watch that fell behind ends with `resync`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, get_args

import msgspec

from jobwarden.wire.views import (
    BatchResult,
    BulkOutcome,
    ErrorBody,
    ItemResult,
    JobFilter,
    JobStatus,
    JobView,
    LogLine,
    RequestId,
    StoredInt,
    Submission,
)

WatchKey = int | Literal["all"]


class WsOp(msgspec.Struct, tag_field="op", forbid_unknown_fields=True, kw_only=True):
    id: RequestId = None


class WsSubmit(Submission, tag_field="op", tag="submit"):
    """A submission as the token's user. Not a WsOp subclass (a Struct takes its fields from
    one base), so it carries the op's `id` itself."""

    id: RequestId = None


class WsSubmitMany(WsOp, tag="submit_many"):
    """Jobs in one commit, each item with its own options; `atomic`: all or none."""

    items: list[Submission]
    atomic: bool = False


class WsWatch(WsOp, tag="watch"):
    """One job, or `all` the user's jobs; events after `since` (omitted: the job's whole
    history, or, watching all, from now)."""

    job: StoredInt | None = None
    all: bool = False
    since: StoredInt | None = None


class WsUnwatch(WsOp, tag="unwatch"):
    job: StoredInt | None = None
    all: bool = False


class WsCancel(WsOp, tag="cancel"):
    job: StoredInt


class WsCancelMany(WsOp, tag="cancel_many"):
    """Cancel every queued or running job of the user's that the filter matches (or, dry
    run, count them): the filter's user is always the user's own."""

    filter: JobFilter
    dry_run: bool = False
    show: Annotated[int, msgspec.Meta(ge=0)] = 20


class WsLogs(WsOp, tag="logs"):
    """A job's log lines after line id `after`; `follow`: `log` frames as they come, then
    `log_end` once the job is final (the op is in flight until then)."""

    job: StoredInt
    after: Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)] = 0
    follow: bool = False


class WsJobs(WsOp, tag="jobs"):
    status: list[JobStatus] | None = None
    kind: str | None = None
    tag: str | None = None
    limit: StoredInt = 50


WsOps = WsSubmit | WsSubmitMany | WsWatch | WsUnwatch | WsCancel | WsCancelMany | WsLogs | WsJobs
WS_OPS = tuple(sorted(op.__struct_config__.tag for op in get_args(WsOps)))
ws_op_decoder = msgspec.json.Decoder(WsOps)


class WsReply(msgspec.Struct, tag_field="type", omit_defaults=True, kw_only=True):
    id: str | int | None = None


class WsAccepted(WsReply, tag="accepted"):
    job: JobView
    existing: bool


class WsSubmitted(WsReply, tag="submitted"):
    """A batch's answer, as BatchResult has it: one result per item, and their counts."""

    accepted: int
    existing: int
    refused: int
    results: list[ItemResult]

    @classmethod
    def of(cls, request_id: RequestId, batch: BatchResult) -> WsSubmitted:
        return cls(id=request_id, **msgspec.structs.asdict(batch))


class WsWatching(WsReply, tag="watching"):
    watch: WatchKey
    # Events after this seq follow; the job as it is now, for a watch of one job.
    since: int
    job: JobView | None = None
    # The seq of the job's newest event when `job` was read: a final status before it was
    # followed by a retry, unless the job is still final.
    newest: int | None = None


class WsUnwatched(WsReply, tag="unwatched"):
    watch: WatchKey


class WsCanceled(WsReply, tag="canceled"):
    job: JobView


class WsCanceledMany(WsReply, tag="canceled_many"):
    outcome: BulkOutcome


class WsLogPage(WsReply, tag="logs"):
    job: int
    # Older lines dropped to keep the log within its size.
    dropped: int
    lines: list[LogLine]


class WsLogLine(WsReply, tag="log"):
    job: int
    line: LogLine


class WsLogEnd(WsReply, tag="log_end"):
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
