"""What a job and its events look like to every client, and the one error shape."""

from __future__ import annotations

import re
from array import array
from itertools import accumulate
from typing import Annotated, Any, Literal, get_args

import msgspec

# Every status, in lifecycle order: the one list the CLI, reports and metrics use.
JobStatus = Literal["queued", "running", "done", "failed", "canceled"]
STATUSES: tuple[JobStatus, ...] = get_args(JobStatus)
TERMINAL_STATUSES: frozenset[JobStatus] = frozenset({"done", "failed", "canceled"})

# An integer a store column holds (a signed 64-bit INTEGER): a request's larger one is refused
# where it is decoded, named by its path, not deep in a query as an INTERNAL error.
StoredInt = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]
# The id a client gives a request, echoed in its reply.
RequestId = Annotated[str, msgspec.Meta(max_length=128)] | StoredInt | None

# Arrays and objects a request may nest, payload included. A decoder recurses once a level,
# and a deep enough document exhausts the stack (RecursionError) before its type is checked.
MAX_DEPTH = 64
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
# Each opening bracket counts +1, each closing one -1 (255 as a signed byte); the rest goes.
_DEPTH_STEPS = bytes.maketrans(b"[{]}", bytes([1, 1, 255, 255]))
_NOT_BRACKETS = bytes(set(range(256)) - set(b"[{]}"))


def nesting_depth_exceeds(data: bytes | str, limit: int = MAX_DEPTH) -> bool:
    """Whether the JSON text `data` nests arrays and objects deeper than `limit`, found without
    decoding it (brackets inside strings do not count)."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return False
    steps = array("b", _STRING.sub(b"", raw).translate(_DEPTH_STEPS, _NOT_BRACKETS))
    return max(accumulate(steps), default=0) > limit


class Submission(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A job to run, as every door takes it: the admin socket's `submit` args, the
    WebSocket's `submit` op and the HTTP API's POST /v1/jobs body each add only who asks."""

    kind: str
    payload: Any = msgspec.field(default_factory=dict)
    priority: StoredInt | None = None
    # A user's active job with this key is returned instead of a new one.
    idempotency_key: str | None = None
    # The client's own id for this submission, the same each time it sends it again: a resend
    # whose job has finished meanwhile gets that job, not a second one.
    submission_id: str | None = None
    # When to start: an RFC 3339 time, or a duration from now like "10m" (at most one).
    run_at: str | None = None
    delay: str | None = None
    tags: list[str] | None = None
    # Jobs of the same user this one runs after; after_any: whether they fail or not.
    after: list[StoredInt] | None = None
    after_any: bool = False
    # An http(s) URL on a host the config allows: told of the job's final status.
    webhook: str | None = None


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
    # The recurring schedule that made the job, if one did.
    schedule: str | None = None
    result: Any = None
    error: ErrorBody | None = None
    payload: Any = None
    checkpoint: Any = None
    # What it waits for besides its turn (docs/scheduling.md): the time it was submitted to
    # start at, the jobs it runs after (and whether whatever their outcome), an operator's hold.
    run_at: float | None = None
    after: list[int] = []
    after_any: bool = False
    held: bool = False
    tags: list[str] = []


class Event(msgspec.Struct, omit_defaults=True):
    """One row of the events table. type "status" carries a transition, "progress" a report,
    "breaker" a circuit's change (job 0 and user "": it belongs to no job), "position" a
    queued job's place in the queue and why it waits (coalesced; see actors/scheduler.py).

    status data: {"status", "reason"?, "attempt", "available_at"?, "result"?, "error"?}
    progress data: {"fraction", "message"?}
    breaker data: {"service", "state", "open_until"}
    position data: {"position", "queued", "kind_position", "kind_queued", "reason"}
    cost data: {"service", "units", "usd", "ok", "job_usd", "overrun_usd"} (one per external
    call; job_usd is the job's total so far; overrun_usd what it cost beyond its reservation)
    """

    seq: int
    job: int
    user: str
    kind: str
    type: Literal["status", "progress", "breaker", "position", "cost"]
    at: float
    data: dict[str, Any]


class ItemResult(msgspec.Struct, omit_defaults=True):
    """What became of one item of a batch: its job (existing: an earlier job its key
    holds), or its refusal in the common error shape."""

    job: JobView | None = None
    existing: bool = False
    error: ErrorBody | None = None


class BatchResult(msgspec.Struct):
    """A batch's answer: one result per item, in the items' order, and their counts."""

    accepted: int
    existing: int
    refused: int
    results: list[ItemResult]

    @classmethod
    def of(cls, results: list[ItemResult]) -> BatchResult:
        existing = sum(1 for result in results if result.existing)
        refused = sum(1 for result in results if result.error is not None)
        return cls(len(results) - existing - refused, existing, refused, results)


class JobFilter(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, omit_defaults=True):
    """Which jobs a bulk action (cancel_many, retry_many) takes: every field given must
    match. `tag`: one of the job's tags; `code` is the reason a job's status carries (a
    failed job's error code); `since` keeps jobs whose status changed within that many
    seconds, `older_than` jobs created longer ago than that."""

    status: list[JobStatus] | None = None
    kind: str | None = None
    user: str | None = None
    tag: str | None = None
    code: str | None = None
    since: Annotated[float, msgspec.Meta(gt=0)] | None = None
    older_than: Annotated[float, msgspec.Meta(gt=0)] | None = None

    def is_empty(self) -> bool:
        return self == JobFilter()


class BulkOutcome(msgspec.Struct, kw_only=True):
    """What a bulk action did, or with `dry_run` would do: how many jobs it matched and
    changed, the first of their ids, and how many matched but could not be changed, by
    code (CHANGED: the job moved on meanwhile)."""

    action: Literal["cancel", "retry"]
    dry_run: bool
    matched: int
    changed: int = 0
    ids: list[int] = msgspec.field(default_factory=list)
    refused: dict[str, int] = msgspec.field(default_factory=dict)


class LogLine(msgspec.Struct):
    """One line of a job's log: `stream` is "stdout" or "stderr" (a command's), or "log" (a
    python handler's ctx.log or logging); the text is clipped and has no control characters."""

    id: int
    attempt: int
    at: float
    stream: str
    line: str


class JobLog(msgspec.Struct):
    """A page of a job's lines after a line id, oldest first, and how many older lines were
    dropped to keep the job's log within its size."""

    dropped: int
    lines: list[LogLine]
