"""Monitor: finds stuck, stalled and late jobs and recovers them; keeps health and alerts.

Consumes `RunRules` (admin `stuck`), `HealthQuery` (admin `status`, HTTP), `RaiseAlert` (other
actors), `Reconfigure`, each `SystemLoad` sample and each `StoreState` (supervisor: a store
that stops taking writes raises the `store_fault` alert). Produces `Recover` for the pool
(running jobs) and failure transitions in the store (queued jobs); asks the scheduler for its
snapshot (pause state, running count), the breaker and the ledger for theirs (health).

The rules (stuck, stall, SLA, queued timeout, failure rate) are plain functions in
actors/rules.py. Stuck and stalled jobs are stopped through the pool (a command's whole
process group), which then follows the kind's retry policy.

The monitor wakes every `interval`, and also exactly at the earliest moment a rule could fire
for a job it knows, so a hung job is caught at `stuck_after`, not up to an interval later.
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
    MonitorMessage,
    PoolStatistics,
    RaiseAlert,
    Reconfigure,
    Recover,
    RunRules,
    SchedulerSnapshot,
)
from jobwarden.actors.rules import (
    FAILURE_CODES,
    Finding,
    evaluate,
    failure_rate,
    held_on_purpose,
    smallest_threshold,
)
from jobwarden.clock import WallClock
from jobwarden.config import Config, format_duration
from jobwarden.errors import StoreError, error_body
from jobwarden.mailbox import ReplySlot, ask, receive_by
from jobwarden.metrics import Metrics
from jobwarden.store import Engine, jobs
from jobwarden.store.engine import StoreState
from jobwarden.store.monitor import find_candidates
from jobwarden.system import SystemLoad
from jobwarden.wire.views import STATUSES

log = structlog.get_logger("monitor")

# After a full prune batch, come back this soon for the next one instead of a whole interval.
PRUNE_AGAIN_AFTER = 1.0
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
    ) -> None:
        self._config = config
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
        self._history: deque[tuple[float, int, int]] = deque()
        self._alerted_at: dict[str, float] = {}
        self._wal_clean = False

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        channels = (self._inbox, self._pool, self._scheduler, self._breaker, self._ledger)
        async with contextlib.AsyncExitStack() as stack:
            for channel in channels:
                await stack.enter_async_context(channel)
            nursery = await stack.enter_async_context(trio.open_nursery())
            self._alerts = nursery
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
                findings = await self._apply_rules(dry_run=dry_run)
                reply.set([msgspec.to_builtins(f) for f in findings])
            case HealthQuery(reply=reply, by_kind=by_kind):
                reply.set(await self.health(by_kind=by_kind))
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
        findings = await self._apply_rules(dry_run=False)
        self._last_findings = len(findings)
        stuck = sum(1 for f in findings if f.rule in ("stuck", "stall"))
        if stuck > self._config.monitor.stuck_alert:
            self._alert("stuck_jobs", f"{stuck} stuck jobs recovered in one check", count=stuck)
        await self._check_failure_rate(now)
        try:
            pruned = await self._store.write(
                partial(
                    jobs.prune_finished,
                    before=now - self._config.monitor.retain_finished,
                    batch=self._config.monitor.prune_batch,
                )
            )
        except StoreError:
            return  # the next tick tries again, once the store takes writes
        if pruned:
            log.info("pruned finished jobs", count=pruned)
            self._wal_clean = False
            if pruned == self._config.monitor.prune_batch:
                self._next_tick = trio.current_time() + PRUNE_AGAIN_AFTER
        await self._checkpoint_when_idle()

    async def _apply_rules(self, *, dry_run: bool) -> list[Finding]:
        config = self._config
        now = self._clock.now()
        found = await self._store.read(
            partial(
                find_candidates,
                queued_before=now - smallest_threshold(config, "queued_timeout"),
                created_before=now - smallest_threshold(config, "sla"),
            )
        )
        held, all_held = held_on_purpose(config, await self._scheduler_snapshot())
        findings, self._next_rule = evaluate(config, found, held=held, all_held=all_held, now=now)
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
                await self._act(finding, now)
        return findings

    async def _act(self, finding: Finding, now: float) -> None:
        error = error_body(
            FAILURE_CODES[finding.rule], f"{finding.rule}: {finding.detail}", retryable=False
        )
        try:
            if finding.status == "running":
                reply: ReplySlot[Any] = ReplySlot()
                retry = finding.rule in ("stuck", "stall")
                await self._pool.send(
                    Recover(job_id=finding.job, error=error, retry=retry, reply=reply)
                )
                await reply.wait()
            else:
                await self._store.write(
                    partial(jobs.fail, job_id=finding.job, error=error, now=now, expect=("queued",))
                )
        except StoreError as exc:
            # The rule fires again on a later check, once the store takes writes.
            log.warning("rule could not act", job=finding.job, rule=finding.rule, error=str(exc))
            return
        self._recovered[finding.rule] = self._recovered.get(finding.rule, 0) + 1
        self._metrics.stuck_recovered.labels(finding.rule).inc()

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
        command = self._config.monitor.alert_command
        if command:
            payload = {"alert": name, "message": message, "at": now, **data}
            self._alerts.start_soon(self._run_alert_command, list(command), payload)

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

    async def health(self, *, by_kind: bool = False) -> dict[str, Any]:
        """One snapshot for /health, `jobwarden status` and the metrics scrape."""
        counts = await self._store.read(jobs.counts_by_status)
        depth = await self._store.read(jobs.queued_by_kind)
        oldest = await self._store.read(jobs.oldest_queued_created_at)
        snapshot = await self._scheduler_snapshot()
        now = self._clock.now()
        health = {
            **self._daemon_status(),
            "jobs": {status: counts.get(status, 0) for status in STATUSES},
            "queue_depth": depth,
            "oldest_queued_seconds": None if oldest is None else round(now - oldest, 3),
            "running": snapshot["running"],
            "max_concurrent_jobs": snapshot["max_concurrent_jobs"],
            "paused": snapshot["paused"],
            "paused_all": snapshot["paused_all"],
            "stuck": {"last_check": self._last_findings, "recovered": dict(self._recovered)},
            "system": system_view(self._load),
            "breakers": await ask(self._breaker, BreakerSnapshot),
            "budget": await ask(self._ledger, BudgetQuery),
            "store": self._store.health.view(),
        }
        if by_kind:
            health["by_status_kind"] = await self._store.read(jobs.counts_by_status_and_kind)
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
