"""Monitor: finds stuck, stalled and late jobs and recovers them; keeps health and alerts.

Consumes `RunRules` (admin `stuck`), `HealthQuery` (admin `status`, HTTP), `RaiseAlert` (other
actors), `JobsStarted`/`ProgressStarted` (pool), `Reconfigure`, each `SystemLoad` sample and each
`StoreState` (supervisor: a store that stops taking writes raises the `store_fault` alert),
and `Leadership` (the node's lease keeper).
Produces `Recover` for the pool (running jobs) and failure transitions in the store (queued
jobs); asks the scheduler for its snapshot (pause state, running count), the breaker and the
ledger for theirs (health).

The rules (stuck, stall, SLA, queued timeout, failure rate) are plain functions in
actors/rules.py. Stuck and stalled jobs are stopped through the pool (a command's whole
process group), which then follows the kind's retry policy.

The monitor wakes every `interval`, and also exactly at the earliest moment a rule could fire
for a job it knows. The pool tells it of every start and of each attempt's first progress, so
that moment is exact for every running job, however it started: a hung job is caught at
`stuck_after`, not up to an interval later. A recovery is awaited in its own task, so a job
slow to stop holds up no other verdict.

While jobs run, a probe wakes every PAUSE_PROBE seconds; one that wakes much later than due
means the daemon was not running (SIGSTOP, a paused VM, a swap storm, a blocked loop), and
that time is credited to the running jobs' stuck and stall deadlines: it is not their fault.

Where several daemons share the database, each monitor watches the jobs running on its own
node; the rules for queued jobs (queued timeout, SLA) and pruning run on the one daemon that
holds the maintenance role (`Leadership`), so a queued job is failed once, not by each.
"""

from __future__ import annotations

import contextlib
import math
from collections import deque
from collections.abc import Callable
from functools import partial
from typing import Any

import msgspec
import structlog
import trio

from jobwarden.actors.messages import (
    BreakerSnapshot,
    BudgetQuery,
    HealthQuery,
    JobsStarted,
    Leadership,
    MonitorMessage,
    PoolStatistics,
    ProgressStarted,
    QueueChanged,
    RaiseAlert,
    Reconfigure,
    Recover,
    RunRules,
    SchedulerSnapshot,
)
from jobwarden.actors.rules import (
    FAILURE_CODES,
    Finding,
    Pause,
    evaluate,
    failure_rate,
    held_on_purpose,
    progress_deadline,
    relevant_pauses,
    smallest_threshold,
    started_deadline,
    still_stuck,
)
from jobwarden.clock import WallClock
from jobwarden.config import Config, format_duration
from jobwarden.errors import StoreError, error_body
from jobwarden.mailbox import ReplySlot, ask, receive_by
from jobwarden.metrics import Metrics
from jobwarden.store import Engine, jobs, nodes, schedules
from jobwarden.store.engine import StoreState
from jobwarden.store.monitor import find_candidates, stuck_rows
from jobwarden.system import SystemLoad
from jobwarden.wire.views import STATUSES

log = structlog.get_logger("monitor")

# After a full prune batch, come back this soon for the next one instead of a whole interval.
PRUNE_AGAIN_AFTER = 1.0
# While jobs run, the pause probe expects to wake this often; a wake-up later than due by more
# than PAUSE_TOLERANCE is time the daemon was not running. The tolerance keeps a busy loop's
# ordinary lateness from counting.
PAUSE_PROBE = 1.0
PAUSE_TOLERANCE = 1.0
# The health snapshot lists the alerts of the last hour, the latest RECENT_ALERTS at most.
RECENT_ALERTS = 20
ALERTS_SHOWN_FOR = 3600.0
# The dashboard's hour of finished jobs, counted in spans of this many seconds.
LAST_HOUR_SPAN = 300.0
GIB = 1024**3
MIB = 1024**2


class Monitor:
    def __init__(
        self,
        *,
        config: Config,
        store: Engine,
        clock: WallClock,
        inbox: trio.MemoryReceiveChannel[MonitorMessage],
        pool: trio.MemorySendChannel[Any],
        scheduler: trio.MemorySendChannel[Any],
        breaker: trio.MemorySendChannel[Any],
        ledger: trio.MemorySendChannel[Any],
        metrics: Metrics,
        daemon_status: Callable[[], dict[str, Any]],
        load: SystemLoad,
        node: int,
    ) -> None:
        self._config = config
        # This daemon's node: the running jobs it watches are those running here.
        self._node = node
        # Whether this daemon holds the maintenance role: the queued jobs' rules and pruning.
        self._leader = False
        self._store = store
        self._clock = clock
        self._inbox = inbox
        self._pool = pool
        self._scheduler = scheduler
        self._breaker = breaker
        self._ledger = ledger
        self._metrics = metrics
        self._daemon_status = daemon_status
        self._next_tick = -math.inf
        self._next_rule = math.inf
        self._load = load
        self._recovered: dict[str, int] = {}
        self._last_findings = 0
        # Jobs found stuck or stalled -> the attempt found so, until they are heard from again.
        self._found_stuck: dict[int, int] = {}
        # Running jobs the pool is stopping on a verdict, with the pool's answer to come.
        self._recovering: dict[int, ReplySlot[Any]] = {}
        # When the pause probe is due to wake (trio time); inf while no job runs.
        self._probe_due = math.inf
        self._jobs_running = trio.Event()
        self._pauses: list[Pause] = []
        self._history: deque[tuple[float, int, int]] = deque()
        self._alerted_at: dict[str, float] = {}
        # The latest alerts raised, for the health snapshot (the dashboard shows them).
        self._alerts: deque[dict[str, Any]] = deque(maxlen=RECENT_ALERTS)
        self._wal_clean = False

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        channels = (self._inbox, self._pool, self._scheduler, self._breaker, self._ledger)
        async with contextlib.AsyncExitStack() as stack:
            for channel in channels:
                await stack.enter_async_context(channel)
            nursery = await stack.enter_async_context(trio.open_nursery())
            self._tasks = nursery
            nursery.start_soon(self._probe_for_pauses)
            task_status.started()
            while True:
                wake = min(self._next_tick, self._clock.deadline_for(self._next_rule))
                try:
                    msg = await receive_by(self._inbox, wake)
                except trio.EndOfChannel:
                    break
                if msg is None:
                    await self._tick()
                else:
                    await self._handle(msg)
            nursery.cancel_scope.cancel()

    async def _handle(self, msg: MonitorMessage) -> None:
        match msg:
            case RunRules(dry_run=False, reply=reply) if self._store.health.fault is not None:
                # Its recoveries could not be written, and unwritten heartbeats look stuck.
                error = self._store.health.error()
                assert error is not None
                reply.fail(error.refusal())
            case RunRules(dry_run=dry_run, reply=reply):
                findings, recoveries = await self._apply_rules(dry_run=dry_run)
                # An operator's `stuck` answers once its verdicts are carried out.
                self._tasks.start_soon(self._answer_when_recovered, findings, recoveries, reply)
            case JobsStarted(at=at, jobs=started):
                for kind, created_at in started:
                    deadline = started_deadline(self._config, kind, created_at, at)
                    self._next_rule = min(self._next_rule, deadline)
                self._jobs_running.set()
            case Leadership(leader=leader):
                self._leader = leader
                # A new leader checks the queued jobs at once.
                self._next_tick = -math.inf
            case ProgressStarted(at=at, kind=kind):
                self._next_rule = min(self._next_rule, progress_deadline(self._config, kind, at))
            case HealthQuery(reply=reply, by_kind=by_kind, last_hour=last_hour):
                reply.set(await self.health(by_kind=by_kind, last_hour=last_hour))
            case Reconfigure(config=config):
                self._config = config
                self._next_tick = -math.inf
            case RaiseAlert(name=name, message=message, data=data):
                self._alert(name, message, **data)
            case SystemLoad():
                self._load = msg
            case StoreState(fault=None):
                # Check at once what waited while nothing could be written.
                self._next_tick = -math.inf
            case StoreState(fault=fault):
                message = f"the store takes no writes: {fault.message}"
                self._alert("store_fault", message, code=fault.code)

    async def _tick(self) -> None:
        now = self._clock.now()
        self._next_tick = trio.current_time() + self._config.monitor.interval
        if self._store.health.fault is not None:
            # No recovery, pruning or checkpoint could be written; and running jobs' heartbeats
            # are kept, not written, so the rules would find healthy jobs stuck. A StoreState
            # brings the next check forward when the store takes writes again.
            self._next_rule = math.inf
            return
        findings, _ = await self._apply_rules(dry_run=False)
        self._last_findings = len(findings)
        stuck = await self._stuck_now()
        if stuck > self._config.monitor.stuck_alert:
            self._alert("stuck_jobs", f"{stuck} jobs stuck now", count=stuck)
        await self._check_failure_rate(now)
        if not self._leader:
            return
        before = now - self._config.monitor.retain_finished
        try:
            pruned = await self._store.write(
                partial(jobs.prune_finished, before=before, batch=self._config.monitor.prune_batch)
            )
            # The schedules' runs go with the jobs they made.
            await self._store.write(partial(schedules.prune_runs, before=before))
        except StoreError:
            return  # the next tick tries again, once the store takes writes
        if pruned:
            log.info("pruned finished jobs", count=pruned)
            self._wal_clean = False
            if pruned == self._config.monitor.prune_batch:
                self._next_tick = trio.current_time() + PRUNE_AGAIN_AFTER
        await self._checkpoint_when_idle()

    async def _apply_rules(self, *, dry_run: bool) -> tuple[list[Finding], list[ReplySlot[Any]]]:
        """Run the rules now; act on what they find unless `dry_run`. Returns the findings
        and the pool's answers to come for the running jobs it was asked to stop."""
        config = self._config
        now = self._clock.now()
        found = await self._store.read(
            partial(
                find_candidates,
                node=self._node,
                queued=self._leader,
                queued_before=now - smallest_threshold(config, "queued_timeout"),
                created_before=now - smallest_threshold(config, "sla"),
            )
        )
        held, all_held = held_on_purpose(config, await self._scheduler_snapshot())
        # After the awaits: a pause that ended while this check waited is credited too.
        self._note_pause()
        self._pauses = relevant_pauses(self._pauses, found.running)
        if not found.running and self._jobs_running.is_set():
            self._jobs_running = trio.Event()
        findings, self._next_rule = evaluate(
            config, found, held=held, all_held=all_held, now=now, pauses=self._pauses
        )
        if not dry_run:
            # A job already being stopped is not stopped twice, nor reported again.
            findings = [f for f in findings if f.job not in self._recovering]
        attempts = {job.id: job.attempt for job in found.running}
        recoveries = []
        for finding in findings:
            log.warning(
                "rule fired" if not dry_run else "rule would fire",
                job=finding.job,
                kind=finding.kind,
                rule=finding.rule,
                action=finding.action,
                detail=finding.detail,
            )
            if not dry_run:
                recovery = await self._act(finding, now, attempts.get(finding.job))
                if recovery is not None:
                    recoveries.append(recovery)
        return findings, recoveries

    async def _act(
        self, finding: Finding, now: float, attempt: int | None
    ) -> ReplySlot[Any] | None:
        """Carry out a verdict. A running job is stopped through the pool: the answer comes
        later, and is returned. A queued job is failed here."""
        error = error_body(
            FAILURE_CODES[finding.rule], f"{finding.rule}: {finding.detail}", retryable=False
        )
        if finding.status == "running":
            reply: ReplySlot[Any] = ReplySlot()
            retry = finding.rule in ("stuck", "stall")
            if retry and attempt is not None:
                self._found_stuck[finding.job] = attempt
            self._recovering[finding.job] = reply
            await self._pool.send(
                Recover(job_id=finding.job, error=error, retry=retry, reply=reply)
            )
            self._tasks.start_soon(self._stopped, finding, reply)
            return reply
        try:
            await self._store.write(
                partial(jobs.fail, job_id=finding.job, error=error, now=now, expect=("queued",))
            )
        except StoreError as exc:
            # The rule fires again on a later check, once the store takes writes.
            log.warning("rule could not act", job=finding.job, rule=finding.rule, error=str(exc))
            return None
        # Jobs that run after it whatever its outcome may start now.
        await self._scheduler.send(QueueChanged())
        self._count_recovered(finding.rule)
        return None

    async def _stopped(self, finding: Finding, reply: ReplySlot[Any]) -> None:
        """Once the pool has stopped a job on a verdict and recorded it, count it."""
        try:
            await reply.wait()
        except StoreError as exc:
            # The rule fires again on a later check, once the store takes writes.
            log.warning("rule could not act", job=finding.job, rule=finding.rule, error=str(exc))
            return
        finally:
            del self._recovering[finding.job]
        self._count_recovered(finding.rule)

    def _count_recovered(self, rule: str) -> None:
        self._recovered[rule] = self._recovered.get(rule, 0) + 1
        self._metrics.stuck_recovered.labels(rule).inc()

    @staticmethod
    async def _answer_when_recovered(
        findings: list[Finding],
        recoveries: list[ReplySlot[Any]],
        reply: ReplySlot[list[dict[str, Any]]],
    ) -> None:
        try:
            for recovery in recoveries:
                await recovery.wait()
        except StoreError as exc:
            reply.fail(exc)
            return
        reply.set([msgspec.to_builtins(f) for f in findings])

    async def _stuck_now(self) -> int:
        """How many jobs are stuck now: found stuck or stalled, in this check or an earlier
        one, and not heard from since (rules.still_stuck). The others are forgotten."""
        if self._found_stuck:
            rows = await self._store.read(partial(stuck_rows, job_ids=list(self._found_stuck)))
            stuck = still_stuck(self._found_stuck, rows)
            self._found_stuck = {job: self._found_stuck[job] for job in stuck}
        return len(self._found_stuck)

    async def _probe_for_pauses(self) -> None:
        """While jobs may run, wake every PAUSE_PROBE; see _note_pause."""
        while True:
            await self._jobs_running.wait()
            self._probe_due = trio.current_time() + PAUSE_PROBE
            while self._jobs_running.is_set():
                await trio.sleep_until(self._probe_due)
                self._note_pause()
            self._probe_due = math.inf

    def _note_pause(self) -> None:
        """A probe later than due by more than PAUSE_TOLERANCE: the daemon was not running, and
        the running jobs get that time back on their stuck and stall deadlines. The pause began
        between the probe's last wake-up and its due time, so it lasted up to PAUSE_PROBE more
        than the lateness: the jobs get the benefit of that doubt. Called by the probe and
        before each check, whichever runs first after the pause."""
        now = trio.current_time()
        if self._probe_due == math.inf:
            return
        late = now - self._probe_due
        self._probe_due = now + PAUSE_PROBE
        if late > PAUSE_TOLERANCE:
            seconds = late + PAUSE_PROBE
            self._pauses.append((self._clock.now(), seconds))
            log.warning(
                "the daemon was not running; running jobs get the time back",
                seconds=round(seconds, 3),
            )

    async def _scheduler_snapshot(self) -> dict[str, Any]:
        return await ask(self._scheduler, SchedulerSnapshot)

    async def _check_failure_rate(self, now: float) -> None:
        outcomes = (await ask(self._pool, PoolStatistics))["outcomes"]
        self._history.append((now, outcomes.get("done", 0), outcomes.get("failed", 0)))
        monitor = self._config.monitor
        rate, finished = failure_rate(self._history, now, monitor.failure_window)
        if finished >= monitor.failure_min_jobs and rate > monitor.failure_rate_alert:
            self._alert(
                "failure_rate",
                f"{rate:.0%} of {finished} jobs failed in the last "
                f"{format_duration(monitor.failure_window)}",
                rate=round(rate, 4),
                finished=finished,
            )

    def _alert(self, name: str, message: str, **data: Any) -> None:
        """Log the alert; run alert_command with it, at most once per alert_repeat per name."""
        now = self._clock.now()
        if now - self._alerted_at.get(name, -math.inf) < self._config.monitor.alert_repeat:
            return
        self._alerted_at[name] = now
        log.warning("alert", alert=name, message=message, **data)
        self._alerts.append({"alert": name, "message": message, "at": now})
        command = self._config.monitor.alert_command
        if command:
            payload = {"alert": name, "message": message, "at": now, **data}
            self._tasks.start_soon(self._run_alert_command, list(command), payload)

    async def _run_alert_command(self, command: list[str], payload: dict[str, Any]) -> None:
        with trio.move_on_after(self._config.monitor.alert_timeout) as timed_out:
            try:
                result = await trio.run_process(
                    command,
                    stdin=msgspec.json.encode(payload),
                    capture_stdout=True,
                    capture_stderr=True,
                    check=False,
                )
            except OSError as exc:
                log.error("alert command could not start", command=command[0], error=str(exc))
                return
            if result.returncode != 0:
                log.error(
                    "alert command failed",
                    command=command[0],
                    exit_status=result.returncode,
                    stderr=result.stderr.decode(errors="replace")[-500:],
                )
        if timed_out.cancelled_caught:
            log.error("alert command timed out", command=command[0])

    async def _checkpoint_when_idle(self) -> None:
        if self._wal_clean:
            return
        counts = await self._store.read(jobs.counts_by_status)
        if counts.get("running", 0) == 0 and counts.get("queued", 0) == 0:
            try:
                await self._store.checkpoint_wal()
            except StoreError as exc:
                # Writes may still work (the WAL grows instead); the next idle tick tries again.
                log.warning("wal checkpoint failed", error=str(exc))
                return
            self._wal_clean = True

    async def health(self, *, by_kind: bool = False, last_hour: bool = False) -> dict[str, Any]:
        """One snapshot for /health, `jobwarden status`, the metrics scrape and (`last_hour`)
        the dashboard's overview."""
        counts = await self._store.read(jobs.counts_by_status)
        depth = await self._store.read(jobs.queued_by_kind)
        oldest = await self._store.read(jobs.oldest_queued_since)
        snapshot = await self._scheduler_snapshot()
        now = self._clock.now()
        health = {
            **self._daemon_status(),
            "jobs": {status: counts.get(status, 0) for status in STATUSES},
            "queue_depth": depth,
            # A job submitted to start later is not waiting before its time.
            "oldest_queued_seconds": None if oldest is None else round(max(0.0, now - oldest), 3),
            "running": snapshot["running"],
            "max_concurrent_jobs": snapshot["max_concurrent_jobs"],
            "paused": snapshot["paused"],
            "paused_all": snapshot["paused_all"],
            "stuck": {
                "last_check": self._last_findings,
                "now": await self._stuck_now(),
                "recovered": dict(self._recovered),
            },
            "system": system_view(self._load),
            "breakers": await ask(self._breaker, BreakerSnapshot),
            "budget": await ask(self._ledger, BudgetQuery),
            "store": self._store.health.view(),
            "node": self._node,
            "leader": self._leader,
            "nodes": msgspec.to_builtins(
                await self._store.read(partial(nodes.live_nodes, now=now))
            ),
            "alerts": [alert for alert in self._alerts if now - alert["at"] <= ALERTS_SHOWN_FOR],
        }
        if by_kind:
            health["by_status_kind"] = await self._store.read(jobs.counts_by_status_and_kind)
        if last_hour:
            health["kinds"] = sorted(self._config.kinds)
            # Spans on the clock's five minutes, the last one the one now runs in.
            spans = int(3600 // LAST_HOUR_SPAN)
            current = math.floor(now / LAST_HOUR_SPAN) * LAST_HOUR_SPAN
            health["finished_last_hour"] = {
                "span_seconds": LAST_HOUR_SPAN,
                "spans": await self._store.read(
                    partial(
                        jobs.finished_per_span,
                        since=current - (spans - 1) * LAST_HOUR_SPAN,
                        width=LAST_HOUR_SPAN,
                        spans=spans,
                    )
                ),
            }
        return health


def system_view(load: SystemLoad) -> dict[str, Any]:
    """The latest sample as the health snapshot shows it."""
    return {
        "memory_available_gb": round(load.memory_available / GIB, 2),
        "memory_total_gb": round(load.memory_total / GIB, 2),
        "memory_percent": load.memory_percent,
        "cpu_percent": load.cpu_percent,
        "daemon_rss_mb": round(load.daemon_rss / MIB, 1),
    }
