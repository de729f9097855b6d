"""Every message that flows between the actors, the supervisor and the listeners, in one place.

A request that needs an answer carries its `ReplySlot`. `Reconfigure` is the one message every
actor gets on a config reload. Each actor's inbox type is the union named after it.
`SystemLoad`, the sampler's reading, lives with the sampler in jobwarden.system, and
`StoreState`, the store's health as it changes, with the engine in jobwarden.store.engine.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from jobwarden.config import Config
from jobwarden.mailbox import ReplySlot
from jobwarden.store.engine import StoreState
from jobwarden.system import SystemLoad
from jobwarden.wire.views import BulkOutcome, ErrorBody, JobFilter, JobView


class Reconfigure(msgspec.Struct):
    """The config was reloaded: every actor takes what concerns it."""

    config: Config


class RaiseAlert(msgspec.Struct):
    name: str
    message: str
    data: dict[str, Any] = msgspec.field(default_factory=dict)


class Submit(msgspec.Struct):
    kind: str
    payload: Any
    user: str
    reply: ReplySlot[tuple[JobView, bool]]
    priority: int | None = None
    idempotency_key: str | None = None
    submission_id: str | None = None
    # When to start (an RFC 3339 time, or a duration from now; at most one), its tags, and
    # the jobs it runs after (see docs/scheduling.md).
    run_at: str | None = None
    delay: str | None = None
    tags: list[str] | None = None
    after: list[int] | None = None
    after_any: bool = False
    webhook: str | None = None


class SubmitMany(msgspec.Struct):
    """A batch of submissions that goes to the store as one write, so it commits at once.
    Each item's own reply says what became of it; `atomic`: every item is accepted, or all
    fail with the first refusal, which names its item."""

    items: list[Submit]
    # Filled once the items are on their way (each then answered in its own reply), or
    # failed when the batch as a whole is refused: too many items, or an atomic refusal.
    reply: ReplySlot[None]
    atomic: bool = False


class Requeue(msgspec.Struct):
    """An operator's retry of a failed or canceled job."""

    job_id: int
    reply: ReplySlot[JobView]


class RequeueMatching(msgspec.Struct):
    """An operator's retry of every failed or canceled job `job_filter` matches, a bounded
    batch per store write; the reply says how many were queued again and which (the
    first `show`), and how many could not be, by code."""

    job_filter: JobFilter
    show: int
    reply: ReplySlot[BulkOutcome]


class StopAdmitting(msgspec.Struct):
    pass


class ScheduleAction(msgspec.Struct):
    """An operator's word on the recurring schedules: list them, or pause, resume or
    trigger the one named."""

    action: Literal["list", "pause", "resume", "trigger"]
    reply: ReplySlot[Any]
    name: str | None = None


class JobQueued(msgspec.Struct):
    kind: str


class QueueChanged(msgspec.Struct):
    """What queued jobs wait for changed outside dispatch (a hold or its release, a queued
    job's end that jobs ran after): some may start now, and others wait for a new reason."""


class JobsEnded(msgspec.Struct):
    """Jobs the pool has recorded as over: the (kind, user) of each slot that is free again."""

    slots: list[tuple[str, str]]


class Pause(msgspec.Struct):
    """Pause one kind, or everything when kind is None."""

    kind: str | None
    reply: ReplySlot[dict[str, Any]]


class Resume(msgspec.Struct):
    kind: str | None
    reply: ReplySlot[dict[str, Any]]


class StopDispatch(msgspec.Struct):
    pass


class SchedulerSnapshot(msgspec.Struct):
    reply: ReplySlot[dict[str, Any]]


class Explain(msgspec.Struct):
    """Where each of these queued jobs is and why it waits."""

    jobs: list[JobView]
    reply: ReplySlot[dict[int, WaitingInfo]]


class RunJobs(msgspec.Struct):
    jobs: list[JobView]


class PauseState(msgspec.Struct):
    kinds: list[str] = []
    all: bool = False


class WaitingInfo(msgspec.Struct, frozen=True):
    """A queued job's place: 1-based, overall and in its kind's queue, and one reason."""

    position: int
    queued: int
    kind_position: int
    kind_queued: int
    reason: str


class Token(msgspec.Struct, frozen=True):
    service: str
    id: int
    probe: bool


class Permit(msgspec.Struct):
    service: str
    reply: ReplySlot[Token]


class CallDone(msgspec.Struct):
    """A permitted call ended: ok, failed, or abandoned (canceled by us: no verdict)."""

    token: Token
    outcome: Literal["ok", "failed", "abandoned"]


class Withdraw(msgspec.Struct):
    """The caller stopped waiting for its permit (its job was stopped). Nobody will use it:
    it leaves the queue, or, if it was granted meanwhile, gives its slot back."""

    service: str
    reply: ReplySlot[Token]


class BreakerReset(msgspec.Struct):
    service: str
    reply: ReplySlot[dict[str, Any]]


class BreakerTrip(msgspec.Struct):
    service: str
    reply: ReplySlot[dict[str, Any]]


class BreakerSnapshot(msgspec.Struct):
    reply: ReplySlot[dict[str, Any]]


class ServiceState(msgspec.Struct):
    """Told to the scheduler whenever a circuit changes: open_until None means usable."""

    service: str
    open_until: float | None


class Reservation(msgspec.Struct, frozen=True):
    """A call's worst case, held against the budget until the call settles. The call is
    booked at the terms it was reserved at, whatever a reload changes meanwhile. `id`: its
    row in the store; None for a free call, which holds nothing."""

    id: int | None
    job: int | None
    user: str
    kind: str
    service: str
    units: float
    usd: float
    price_usd: float
    failures_billed: bool


class Reserve(msgspec.Struct):
    job: int | None
    user: str
    kind: str
    service: str
    units: float
    reply: ReplySlot[Reservation]


class Settle(msgspec.Struct):
    reservation: Reservation
    units: float
    ok: bool
    reply: ReplySlot[float]


class Release(msgspec.Struct):
    """A reserved call that was never made (its circuit was open)."""

    reservation: Reservation


class Charge(msgspec.Struct):
    """A cost reported after the fact (a command kind's `{"charge": ...}` line)."""

    job: int | None
    user: str
    kind: str
    service: str
    units: float
    reply: ReplySlot[float]


class BudgetQuery(msgspec.Struct):
    reply: ReplySlot[dict[str, Any]]


class SetBudget(msgspec.Struct):
    daily_usd: float | None
    monthly_usd: float | None
    reply: ReplySlot[dict[str, Any]]


class ResumeBudget(msgspec.Struct):
    reply: ReplySlot[dict[str, Any]]


class LedgerReport(msgspec.Struct):
    """Totals for a day ("2026-11-22") or a month ("2026-11"), grouped by service/user/kind."""

    period: str
    by: Literal["service", "user", "kind"]
    reply: ReplySlot[dict[str, Any]]


class BudgetState(msgspec.Struct):
    """Told to admission and the scheduler: stopped until `until` (None: not stopped)."""

    stopped: bool
    until: float | None = None
    reason: str = ""


class RunRules(msgspec.Struct):
    dry_run: bool
    reply: ReplySlot[list[dict[str, Any]]]


class JobsStarted(msgspec.Struct):
    """Pool -> monitor: these jobs started at wall time `at`, so a rule may fire for them
    before any deadline the monitor knows. Each job as (kind, created_at)."""

    at: float
    jobs: list[tuple[str, float]]


class ProgressStarted(msgspec.Struct):
    """Pool -> monitor: a running job reported its attempt's first progress at `at`; from
    now on the stall rule watches it."""

    at: float
    kind: str


class HealthQuery(msgspec.Struct):
    reply: ReplySlot[dict[str, Any]]
    # Also count jobs by (status, kind) for the metrics scrape.
    by_kind: bool = False
    # Also the configured kinds and the jobs finished in each span of the last hour, for the
    # dashboard's overview.
    last_hour: bool = False


class CancelJob(msgspec.Struct):
    job_id: int
    reply: ReplySlot[JobView]


class Drain(msgspec.Struct):
    """Let running jobs finish within `grace` seconds, then interrupt the rest."""

    grace: float
    reply: ReplySlot[int]


class Recover(msgspec.Struct):
    """The monitor's verdict on a running job: stop it and record `error`.

    retry=True follows the kind's retry policy (requeue with backoff while attempts remain,
    else fail with `error`); retry=False fails it now. The reply says what became of it.
    """

    job_id: int
    error: ErrorBody
    retry: bool
    reply: ReplySlot[JobView | None]


class PoolStatistics(msgspec.Struct):
    reply: ReplySlot[dict[str, Any]]


class RemoteCancel(msgspec.Struct):
    """Another daemon was asked to cancel a job that runs here (a `cancel` event in the log):
    stop it, as a cancel request would."""

    job_id: int


class RemoteEnd(msgspec.Struct):
    """A job left `running` on another daemon: cancels waiting here for it are answered."""

    job_id: int


class NodeLost(msgspec.Struct):
    """This daemon's node was declared dead while it ran (its lease ran out): every job it
    was running has been recovered by another daemon. The pool abandons them, writing nothing."""


class Leadership(msgspec.Struct):
    """Whether this daemon holds the maintenance role now (pruning, queued timeouts, the
    recovery of dead nodes): to the monitor, each time it changes."""

    leader: bool


AdmissionMessage = (
    Submit
    | SubmitMany
    | Requeue
    | RequeueMatching
    | StopAdmitting
    | Reconfigure
    | BudgetState
    | ScheduleAction
)


SchedulerMessage = (
    JobQueued
    | QueueChanged
    | JobsEnded
    | Pause
    | Resume
    | StopDispatch
    | SchedulerSnapshot
    | Explain
    | Reconfigure
    | ServiceState
    | BudgetState
    | SystemLoad
    | StoreState
)


BreakerMessage = (
    Permit | Withdraw | CallDone | BreakerReset | BreakerTrip | BreakerSnapshot | Reconfigure
)


LedgerMessage = (
    Reserve
    | Settle
    | Release
    | Charge
    | BudgetQuery
    | SetBudget
    | ResumeBudget
    | LedgerReport
    | Reconfigure
)


MonitorMessage = (
    RunRules
    | HealthQuery
    | Reconfigure
    | RaiseAlert
    | SystemLoad
    | StoreState
    | JobsStarted
    | ProgressStarted
    | Leadership
)


PoolMessage = (
    RunJobs
    | CancelJob
    | Recover
    | PoolStatistics
    | Drain
    | Reconfigure
    | NodeLost
    | RemoteCancel
    | RemoteEnd
)
