"""Pool: runs handlers and turns their outcomes into store transitions.

Consumes `RunJobs` (scheduler), `CancelJob` (admin), `Recover` (monitor), `PoolStatistics`,
`Drain`/`Reconfigure` (supervisor), `NodeLost` (the node's lease keeper). Produces `JobsEnded`
for the scheduler when slots free, `JobsStarted` and `ProgressStarted` for the monitor (whose
deadlines start then), and talks to the ledger and the breaker on behalf of each job's
ctx.call.

Each job runs in its own cancel scope with its kind's timeout. Outcomes: a return value is
done; `Retry`, an unexpected exception, a timeout, `ServiceUnavailable`/`ServiceFailed` or a
monitor's stuck verdict retries with backoff while attempts remain, else fails; `Fail` (or an
SLA breach) fails at once; a cancel request cancels; `BudgetExhausted` puts the job back in the
queue to wait for budget, and a shutdown (drain past its grace, or the process being stopped)
puts it back too; neither spends an attempt. An ExceptionGroup from the handler's own nursery
is decided by its leaves (actors/outcomes.py).

A job's task ends with its outcome. One recorder task writes the outcomes of every job that
ended meanwhile in one store write (each job isolated), frees their slots in one message as soon
as that write is queued, and answers whoever waits on them once it is committed: per job, no
write of its own and no wake-up. On shutdown the recorder writes what was handed to it before
it stops.

Every write of an attempt is fenced by the job's attempt and this daemon's node (store.jobs
Fence). A write the fence refuses means the attempt lost its job: another daemon recovered it
from this node, taken for dead after a pause. A lost attempt is abandoned: its handler is
stopped, nothing more is written for it, and the pool logs `lost the job`.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import math
import random
from functools import partial
from typing import Any

import msgspec
import structlog
import structlog.contextvars
import trio

from jobwarden.actors.handlers import JobContext, run_command, run_python
from jobwarden.actors.joblogs import JobLogs, capture_logging, logging_for
from jobwarden.actors.messages import (
    CancelJob,
    Drain,
    JobsEnded,
    JobsStarted,
    NodeLost,
    PoolMessage,
    PoolStatistics,
    ProgressStarted,
    Reconfigure,
    Recover,
    RemoteCancel,
    RemoteEnd,
    RunJobs,
)
from jobwarden.actors.outcomes import Outcome, handler_outcome
from jobwarden.actors.services import ServiceLink
from jobwarden.clock import WallClock
from jobwarden.config import Config, RetryPolicy, format_duration
from jobwarden.errors import RequestError, StoreError, error_body
from jobwarden.mailbox import ReplySlot
from jobwarden.metrics import Metrics
from jobwarden.store import Engine, each, jobs
from jobwarden.wire.views import ErrorBody, JobView

log = structlog.get_logger("pool")

# Bounds the final write of a job whose task is being torn down, so shutdown cannot hang on it.
FINAL_WRITE_TIMEOUT = 10.0
# A failure's message comes from the handler, of any length; the log keeps its start (the whole
# of it, with the traceback, stays in the job's error for `show`).
LOGGED_MESSAGE_CHARS = 300


def retry_delay(policy: RetryPolicy, attempt: int, rng: random.Random) -> float | None:
    """Seconds to wait before the next attempt after `attempt` failed; None when used up."""
    if attempt >= policy.max_attempts:
        return None
    if not policy.backoff:
        return 0.0
    base = policy.backoff[min(attempt - 1, len(policy.backoff) - 1)]
    return max(0.0, base * (1 + rng.uniform(-policy.jitter, policy.jitter)))


CANCELED: Outcome = ("canceled", None)
INTERRUPTED: Outcome = ("interrupted", None)
# Another daemon recovered the job from this one: nothing is written for the attempt.
LOST: Outcome = ("lost", None)


def _write_nothing(conn: Any, events: Any) -> None:
    """The outcome of an attempt that lost its job: there is nothing of it to write."""


def _final_write_scope() -> trio.CancelScope:
    """Shielded from the job's teardown, yet bounded, so shutdown cannot hang on a write."""
    return trio.CancelScope(shield=True, deadline=trio.current_time() + FINAL_WRITE_TIMEOUT)


def _recorded_outcome(intended: str, final: JobView | None) -> str:
    if final is None:
        # The fence refused the outcome (or it was never written): the job is another's.
        return "lost"
    if intended == "retry" and final.status == "failed":
        return "failed"
    return intended


class _Running:
    __slots__ = (
        "cancel_replies",
        "deadline",
        "duration",
        "job",
        "outcome",
        "progressed",
        "recovery_replies",
        "scope",
        "stop_outcome",
        "timeout",
    )

    def __init__(
        self, job: JobView, cancel_replies: list[ReplySlot[JobView]], timeout: float
    ) -> None:
        self.job = job
        self.timeout = timeout
        self.deadline = trio.current_time() + timeout
        self.scope = trio.CancelScope()
        # Why the scope was canceled, as the outcome to record: a cancel request, a shutdown,
        # or the monitor's verdict.
        self.stop_outcome: Outcome | None = None
        self.cancel_replies = cancel_replies
        self.recovery_replies: list[ReplySlot[JobView | None]] = []
        # Set when the handler is over; the job stays here until the recorder has written it.
        self.outcome: Outcome | None = None
        self.duration = 0.0
        # Whether this attempt has reported progress yet: its first report starts the stall rule.
        self.progressed = False

    def stop(self, outcome: Outcome) -> None:
        if self.stop_outcome is None:
            self.stop_outcome = outcome
        self.scope.cancel()


class Pool:
    def __init__(
        self,
        *,
        config: Config,
        store: Engine,
        clock: WallClock,
        inbox: trio.MemoryReceiveChannel[PoolMessage],
        scheduler: trio.MemorySendChannel[Any],
        ledger: trio.MemorySendChannel[Any],
        breaker: trio.MemorySendChannel[Any],
        monitor: trio.MemorySendChannel[Any],
        metrics: Metrics,
        node: int,
        job_logs: JobLogs,
        rng: random.Random | None = None,
    ) -> None:
        self._config = config
        self._job_logs = job_logs
        self._store = store
        # This daemon's node: with a job's attempt, the fence of every write for it.
        self._node = node
        self._clock = clock
        self._inbox = inbox
        self._scheduler = scheduler
        self._ledger = ledger
        self._breaker = breaker
        self._monitor = monitor
        self._metrics = metrics
        self._rng = rng or random.Random()
        self._running: dict[int, _Running] = {}
        # Cancels for jobs the scheduler claimed that have not reached the pool yet.
        self._cancel_on_arrival: dict[int, list[ReplySlot[JobView]]] = {}
        self._idle = trio.Event()
        self._idle.set()
        # Jobs whose handler is over, for the recorder to write.
        self._ended: list[_Running] = []
        self._ended_ready = trio.Event()
        # Every running job's timeout, earliest first, and the wait until the earliest. One
        # task enforces them all: a deadline on each job's cancel scope costs trio more per
        # job than a no-op job costs the store.
        self._timeouts: list[tuple[float, int, _Running]] = []
        # Breaks ties between equal deadlines (a job retried at once is there twice).
        self._started = itertools.count()
        self._timeout_wait = trio.CancelScope()
        # Shields the recording of a batch of outcomes from the stop, which then bounds it.
        self._recording = trio.CancelScope(shield=True)
        self._log = log.bind()
        self.outcomes: dict[str, int] = {}

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        channels = (self._inbox, self._scheduler, self._ledger, self._breaker, self._monitor)
        async with contextlib.AsyncExitStack() as stack:
            for channel in channels:
                await stack.enter_async_context(channel)
            nursery = await stack.enter_async_context(trio.open_nursery())
            # On the way out, before the nursery waits for its tasks: the outcomes being
            # recorded get so long to commit, and no longer (a store that takes no writes would
            # hold them forever).
            stack.callback(self._bound_recording)
            stack.enter_context(capture_logging())
            nursery.start_soon(self._job_logs.run)
            nursery.start_soon(self._record_ended)
            nursery.start_soon(self._enforce_timeouts)
            task_status.started()
            async for msg in self._inbox:
                match msg:
                    case RunJobs(jobs=claimed):
                        for job in claimed:
                            self._start(job, nursery)
                        # Unbounded inbox: never blocks.
                        self._monitor.send_nowait(
                            JobsStarted(
                                at=self._clock.now(),
                                jobs=[(job.kind, job.run_at or job.created_at) for job in claimed],
                            )
                        )
                    case CancelJob():
                        nursery.start_soon(self._cancel, msg)
                    case Recover():
                        nursery.start_soon(self._recover, msg)
                    case PoolStatistics(reply=reply):
                        reply.set(self.statistics())
                    case Drain(grace=grace, reply=reply):
                        nursery.start_soon(self._drain, grace, reply)
                    case Reconfigure(config=config):
                        self._config = config
                        self._job_logs.config = config.job_logs
                    case NodeLost():
                        nursery.start_soon(self._abandon_lost)
                    case RemoteCancel(job_id=job_id):
                        entry = self._running.get(job_id)
                        if entry is not None:
                            entry.stop(CANCELED)
                    case RemoteEnd(job_id=job_id) if job_id in self._cancel_on_arrival:
                        nursery.start_soon(self._answer_remote_cancels, job_id)

    def statistics(self) -> dict[str, Any]:
        return {"running": sorted(self._running), "outcomes": dict(self.outcomes)}

    def _fence(self, job: JobView) -> jobs.Fence:
        return jobs.Fence(job.attempt, self._node)

    async def _abandon_lost(self) -> None:
        """This node was taken for dead: the jobs recovered from it are abandoned. Those it
        claimed since (the store gave it them after the recovery) keep running."""
        running = {job_id: entry.job.attempt for job_id, entry in self._running.items()}
        held = await self._store.read(partial(jobs.still_held, node=self._node, attempts=running))
        lost = [
            entry
            for job_id, entry in self._running.items()
            if job_id not in held
            and entry.outcome is None
            # Not one started while the store was asked: that one the store just gave it.
            and running.get(job_id) == entry.job.attempt
        ]
        self._log.warning(
            "this node was taken for dead: abandoning the jobs other daemons recovered from it",
            jobs=len(lost),
        )
        for entry in lost:
            entry.stop(LOST)

    def _start(self, job: JobView, nursery: trio.Nursery) -> None:
        earlier = self._running.get(job.id)
        if earlier is not None:
            # The store gave the job a new attempt: the one running here lost it (this node
            # was taken for dead meanwhile). It is abandoned; its task ends on its own.
            earlier.stop(LOST)
            del self._running[job.id]
        waiting = self._cancel_on_arrival.pop(job.id, None)
        kind = self._config.kinds.get(job.kind)
        entry = _Running(job, waiting or [], kind.timeout if kind is not None else math.inf)
        self._running[job.id] = entry
        heapq.heappush(self._timeouts, (entry.deadline, next(self._started), entry))
        if entry.deadline < self._timeout_wait.deadline:
            self._timeout_wait.deadline = entry.deadline
        if self._idle.is_set():
            # A fresh event only when the pool was idle: a drain waiting on the current one
            # must still be woken when the last running job ends.
            self._idle = trio.Event()
        if waiting is not None:
            entry.stop(CANCELED)
        nursery.start_soon(self._run_job, entry)

    async def _cancel(self, msg: CancelJob) -> None:
        entry = self._running.get(msg.job_id)
        if entry is not None:
            entry.stop(CANCELED)
            self._cancel_on_arrival.setdefault(msg.job_id, []).append(msg.reply)
            return
        try:
            job = await self._store.write(
                partial(jobs.cancel, job_id=msg.job_id, now=self._clock.now(), expect=("queued",))
            )
        except StoreError as exc:
            msg.reply.fail(exc.refusal())
            return
        if job is not None:
            msg.reply.set(job)
            return
        current = await self._store.read(partial(jobs.get_job, job_id=msg.job_id))
        if current is None:
            msg.reply.fail(RequestError("NOT_FOUND", f"no job {msg.job_id}"))
        elif current.status == "running" and msg.job_id not in self._running:
            # Claimed by the scheduler, on its way here: cancel it as it arrives. Or running
            # on another daemon: asked to cancel it through the log, answered when it ends.
            self._cancel_on_arrival.setdefault(msg.job_id, []).append(msg.reply)
            node = await self._store.read(partial(jobs.running_node, job_id=msg.job_id))
            if node is not None and node != self._node:
                try:
                    await self._store.write(
                        partial(jobs.request_cancel, job_id=msg.job_id, now=self._clock.now())
                    )
                except StoreError as exc:
                    self._cancel_on_arrival[msg.job_id].remove(msg.reply)
                    msg.reply.fail(exc.refusal())
        elif current.status == "running":
            await self._cancel(msg)
        else:
            msg.reply.fail(
                RequestError(
                    "INVALID_REQUEST",
                    f"job {msg.job_id} is already {current.status}; nothing to cancel",
                )
            )

    async def _answer_remote_cancels(self, job_id: int) -> None:
        """The job left `running` on another daemon: the cancels waiting for it are answered
        if it was canceled, and otherwise tried again on the job as it is now (queued again,
        finished, or running once more)."""
        current = await self._store.read(partial(jobs.get_job, job_id=job_id))
        for reply in self._cancel_on_arrival.pop(job_id, []):
            if current is not None and current.status == "canceled":
                reply.set(current)
            else:
                await self._cancel(CancelJob(job_id=job_id, reply=reply))

    async def _recover(self, msg: Recover) -> None:
        outcome: Outcome = ("retry" if msg.retry else "failed", msg.error)
        entry = self._running.get(msg.job_id)
        if entry is not None:
            entry.recovery_replies.append(msg.reply)
            entry.stop(outcome)
            return
        # Not running here (finished meanwhile, or a row a crash left behind): record the
        # verdict on the row only if it still says running.
        current = await self._store.read(partial(jobs.get_job, job_id=msg.job_id))
        if current is None or current.status != "running":
            msg.reply.set(current)
            return
        try:
            final = await self._store.write(
                self._transition(current, outcome, self._clock.now(), self._fence(current))
            )
        except StoreError as exc:
            msg.reply.fail(exc)
            return
        msg.reply.set(final)

    async def _drain(self, grace: float, reply: ReplySlot[int]) -> None:
        with trio.move_on_after(grace):
            await self._idle.wait()
        interrupted = 0
        for entry in list(self._running.values()):
            if entry.outcome is None:
                entry.stop(INTERRUPTED)
                interrupted += 1
        # Interrupted handlers end at once. What can hold the pool longer is a store that
        # takes no writes: the outcomes it could not record are left to the recovery at the
        # next start (the jobs run again), rather than holding the stop forever.
        with trio.move_on_after(FINAL_WRITE_TIMEOUT):
            await self._idle.wait()
        reply.set(interrupted)

    async def _run_job(self, entry: _Running) -> None:
        job = entry.job
        started = trio.current_time()
        structlog.contextvars.bind_contextvars(job=job.id, kind=job.kind)
        try:
            outcome = await self._execute(entry)
        except trio.Cancelled:
            # The process is stopping under us: the job goes back to the queue, unspent.
            self._forget(entry)
            with _final_write_scope():
                try:
                    await self._store.write(
                        partial(
                            jobs.requeue_unspent,
                            job_id=job.id,
                            fence=self._fence(job),
                            reason="INTERRUPTED",
                            now=self._clock.now(),
                        )
                    )
                except StoreError as exc:
                    self._log.warning(
                        "interrupted job left running: the recovery at the next start requeues it",
                        job=job.id,
                        error=str(exc),
                    )
            raise
        entry.outcome = outcome
        entry.duration = trio.current_time() - started
        self._ended.append(entry)
        self._ended_ready.set()

    async def _enforce_timeouts(self) -> None:
        while True:
            earliest = self._timeouts[0][0] if self._timeouts else math.inf
            self._timeout_wait = trio.CancelScope(deadline=earliest)
            with self._timeout_wait:
                await trio.sleep_forever()
            now = trio.current_time()
            while self._timeouts and self._timeouts[0][0] <= now:
                _, _, entry = heapq.heappop(self._timeouts)
                if entry.outcome is None:
                    message = (
                        f"the job ran longer than its timeout of {format_duration(entry.timeout)}"
                    )
                    entry.stop(("retry", error_body("TIMEOUT", message)))

    def _drop_finished_timeouts(self) -> None:
        """Finished jobs' timeouts stay in the heap until they come due; rebuild it when they
        outnumber the running ones, so it never grows with the jobs that went through."""
        if len(self._timeouts) > 2 * len(self._running) + 64:
            self._timeouts = [
                (entry.deadline, next(self._started), entry) for entry in self._running.values()
            ]
            heapq.heapify(self._timeouts)

    def _forget(self, entry: _Running) -> None:
        if self._running.get(entry.job.id) is entry:
            del self._running[entry.job.id]
        self._drop_finished_timeouts()
        if not self._running:
            self._idle.set()

    def _bound_recording(self) -> None:
        self._recording.deadline = trio.current_time() + FINAL_WRITE_TIMEOUT

    async def _record_ended(self) -> None:
        try:
            while True:
                await self._ended_ready.wait()
                # No deadline while the pool runs: outcomes wait out a store that takes no
                # writes, however long. `run` sets one when the pool stops.
                self._recording = trio.CancelScope(shield=True)
                with self._recording:
                    await self._record_batch()
        finally:
            # Stopping: what ended before the stop is written, never left `running`, unless
            # the store takes no writes.
            with _final_write_scope():
                await self._record_batch()
            unrecorded = sorted(
                job for job, entry in self._running.items() if entry.outcome is not None
            )
            if unrecorded:
                self._log.warning(
                    "outcomes not recorded before the stop: the store took no writes; the "
                    "recovery at the next start runs these jobs again",
                    count=len(unrecorded),
                    jobs=unrecorded[:20],
                )

    async def _record_batch(self) -> None:
        batch, self._ended = self._ended, []
        self._ended_ready = trio.Event()
        if not batch:
            return
        now = self._clock.now()
        # Their log lines go first, so whoever sees a job final finds all of them.
        self._job_logs.hand_over_for({entry.job.id for entry in batch})
        # Kept through a store fault: these jobs ran, and what they came to is not lost.
        recorded = self._store.hand_over(
            each(
                [
                    self._transition(entry.job, entry.outcome, now, self._fence(entry.job))
                    for entry in batch
                ]
            ),
            keep=True,
        )
        # The slots are free now. The claim that fills them is a write queued behind this one,
        # so it commits in the same transaction or a later one: the store never shows more
        # jobs running than there are slots, and the claim does not wait for this commit.
        self._scheduler.send_nowait(JobsEnded(slots=[(e.job.kind, e.job.user) for e in batch]))
        finals = await recorded.committed()
        unencodable = [
            index
            for index, final in enumerate(finals)
            if isinstance(final, (TypeError, msgspec.EncodeError))
        ]
        if unencodable:
            failures = await self._store.hand_over(
                each(
                    [
                        partial(
                            jobs.fail,
                            job_id=batch[index].job.id,
                            fence=self._fence(batch[index].job),
                            error=error_body(
                                "HANDLER_ERROR",
                                f"the result is not JSON: {finals[index]}",
                                retryable=False,
                            ),
                            now=now,
                        )
                        for index in unencodable
                    ]
                ),
                keep=True,
            ).committed()
            for index, final in zip(unencodable, failures, strict=True):
                finals[index] = final
        for entry, final in zip(batch, finals, strict=True):
            self._settle(entry, final)
        self._drop_finished_timeouts()
        if not self._running:
            self._idle.set()

    def _settle(self, entry: _Running, final: JobView | Exception | None) -> None:
        """Answer whoever waits on a recorded job and count its outcome."""
        job, outcome = entry.job, entry.outcome
        assert outcome is not None
        if self._running.get(job.id) is entry:
            del self._running[job.id]
        if isinstance(final, Exception):
            # Left `running` in the store: the monitor's stuck rule recovers it.
            self._log.error(
                "could not record a job's outcome", job=job.id, kind=job.kind, error=str(final)
            )
            final = None
        for reply in entry.cancel_replies + self._cancel_on_arrival.pop(job.id, []):
            if final is not None and final.status == "canceled":
                reply.set(final)
            else:
                reply.fail(RequestError("INVALID_REQUEST", f"job {job.id} finished first"))
        for recovery in entry.recovery_replies:
            recovery.set(final)
        # The outcome the store recorded: a "retry" past the last attempt is a failure.
        name = _recorded_outcome(outcome[0], final)
        error = outcome[1] if isinstance(outcome[1], ErrorBody) else None
        code = error.code if error is not None else None
        self.outcomes[name] = self.outcomes.get(name, 0) + 1
        self._metrics.job_finished(job.kind, name, entry.duration, code)
        fields = {
            "job": job.id,
            "kind": job.kind,
            "user": job.user,
            "attempt": job.attempt,
            "max_attempts": job.max_attempts,
            "duration": round(entry.duration, 3),
            "outcome": name,
            "code": code,
        }
        if name == "lost":
            # Another daemon recovered the job from this one, taken for dead (a pause, a lost
            # connection to the database): what this attempt came to was not written.
            self._log.warning("lost the job", **fields, intended=outcome[0])
        elif error is not None and name in ("failed", "retry"):
            # A failed attempt is worth a look: what went wrong, and the id to find it by.
            self._log.warning(
                "job finished",
                **fields,
                message=error.message[:LOGGED_MESSAGE_CHARS],
                error_id=error.error_id,
            )
        else:
            self._log.info("job finished", **fields)

    async def _execute(self, entry: _Running) -> Outcome:
        job = entry.job
        kind = self._config.kinds.get(job.kind)
        if kind is None:
            return "failed", error_body(
                "HANDLER_ERROR", f"kind '{job.kind}' is not configured", retryable=False
            )
        runner = run_python if kind.handler is not None else run_command
        services = ServiceLink(
            config=self._config,
            job=job,
            ledger=self._ledger,
            breaker=self._breaker,
            # Late-bound to the context below, so ctx.call heartbeats share its coalescing.
            heartbeat=lambda: ctx.heartbeat(),
            rng=self._rng,
        )
        ctx = JobContext(
            job_id=job.id,
            kind=job.kind,
            user=job.user,
            attempt=job.attempt,
            max_attempts=job.max_attempts,
            checkpoint=job.checkpoint,
            options=kind.options,
            report_progress=partial(self._progress, entry),
            store_checkpoint=partial(self._checkpoint, entry),
            store_heartbeat=partial(self._heartbeat, entry),
            services=services,
            store_process_group=partial(self._process_group, entry),
            write_log=partial(self._job_logs.add, job.id, job.attempt),
        )
        try:
            with entry.scope, logging_for(self._job_logs, job.id, job.attempt):
                return "done", await runner(kind, ctx, job.payload)
        except Exception as exc:
            return handler_outcome(exc)
        # Only `stop` cancels the scope, and it says why.
        assert entry.stop_outcome is not None
        return entry.stop_outcome

    def _transition(
        self, job: JobView, outcome: Outcome | None, now: float, fence: jobs.Fence
    ) -> Any:
        """The store write that records `outcome` for `job`'s attempt under `fence`."""
        assert outcome is not None
        name, detail = outcome
        target = {"job_id": job.id, "fence": fence, "now": now}
        match name:
            case "done":
                return partial(jobs.finish, **target, result=detail)
            case "failed":
                return partial(jobs.fail, **target, error=detail)
            case "canceled":
                return partial(jobs.cancel, **target, expect=("running",))
            case "interrupted":
                return partial(jobs.requeue_unspent, **target, reason="INTERRUPTED")
            case "budget":
                return partial(jobs.requeue_unspent, **target, reason="BUDGET_WAIT")
            case "lost":
                return _write_nothing
        policy = self._config.retry_policy(job.kind)
        delay = retry_delay(
            msgspec.structs.replace(policy, max_attempts=job.max_attempts), job.attempt, self._rng
        )
        if delay is None:
            return partial(jobs.fail, **target, error=detail)
        return partial(jobs.retry_later, **target, error=detail, available_at=now + delay)

    # A handler's reports never fail for the store's sake: while it takes no writes, the latest
    # report of each sort is kept for the job and written first when it does again. A report
    # the fence refuses says the attempt lost its job: it is abandoned.

    async def _report(self, entry: _Running, write: Any, **fields: Any) -> None:
        """Write one of the handler's reports for its attempt, fenced; at most the latest of
        each sort is kept through a store fault."""
        fenced = partial(write, job_id=entry.job.id, fence=self._fence(entry.job), **fields)
        still_ours = await self._store.write_or_keep(fenced, key=(write.__name__, entry.job.id))
        if still_ours is False and entry.outcome is None:
            entry.stop(LOST)

    async def _progress(self, entry: _Running, fraction: float, message: str | None) -> None:
        if not entry.progressed:
            entry.progressed = True
            self._monitor.send_nowait(ProgressStarted(at=self._clock.now(), kind=entry.job.kind))
        await self._report(
            entry, jobs.report_progress, fraction=fraction, message=message, now=self._clock.now()
        )

    async def _heartbeat(self, entry: _Running) -> None:
        await self._report(entry, jobs.heartbeat, now=self._clock.now())

    async def _process_group(self, entry: _Running, pgid: int, identity: str) -> None:
        await self._report(entry, jobs.record_process_group, pgid=pgid, identity=identity)

    async def _checkpoint(self, entry: _Running, state: Any) -> None:
        await self._report(entry, jobs.save_checkpoint, checkpoint=state, now=self._clock.now())
