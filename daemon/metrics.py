"""Prometheus metrics, made with prometheus-client in a registry of the daemon's own.

The instruments are write-only sinks, shared the way the logger is: actors count and observe
into them, and only the /metrics listener reads them. Gauges that describe the whole state
(jobs by status, queue depth, memory) are set from one snapshot just before each scrape.

Every configured kind, service, outcome and monitor rule has its series from the start, at 0
(`declare`): a series that first appears at 1 hides its first increment from `rate()` and
`increase()`, and an empty queue should read 0, not "no data". Shares are 0-1 ratios named
`_ratio`, as Prometheus's conventions ask; the process collector adds the daemon's own memory,
CPU seconds and open file descriptors.
"""

from __future__ import annotations

from typing import Any

import structlog
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)

from jobwarden.config import Config
from jobwarden.wire.views import STATUSES

log = structlog.get_logger("requests")

DURATION_BUCKETS = (0.1, 0.5, 1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600)
BREAKER_LEVELS = {"closed": 0, "half_open": 1, "open": 2}
REQUEST_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5)
# How a job attempt can end, as the pool records it.
OUTCOMES = ("done", "failed", "retry", "canceled", "interrupted", "budget")
# The monitor's rules (actors/rules.py), which label the jobs it recovered.
RULES = ("stuck", "stall", "sla", "queued_timeout")
# What became of a schedule's slot: it made a job, it was skipped (a run still active, a
# guard's refusal), or it was missed while the daemon was down and catch_up let it go.
SCHEDULE_OUTCOMES = ("fired", "skipped", "missed")


class Metrics:
    def __init__(self) -> None:
        # The `_created` series carry wall-clock stamps; the daemon reads only trio's clock.
        disable_created_metrics()
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.jobs = Gauge(
            "jobwarden_jobs", "Jobs by status and kind", ["status", "kind"], registry=r
        )
        self.queue_depth = Gauge(
            "jobwarden_queue_depth", "Queued jobs per kind", ["kind"], registry=r
        )
        self.running = Gauge("jobwarden_running_jobs", "Jobs running now", registry=r)
        self.oldest_queued = Gauge(
            "jobwarden_oldest_queued_seconds",
            "How long the oldest queued job has waited since it was to start",
            registry=r,
        )
        self.memory_used = Gauge(
            "jobwarden_memory_used_ratio", "Share of system memory in use, 0-1", registry=r
        )
        self.cpu_used = Gauge(
            "jobwarden_cpu_used_ratio",
            "Share of system CPU in use since the previous sample, 0-1",
            registry=r,
        )
        self.processed = Counter(
            "jobwarden_jobs_processed",
            "Finished job attempts by outcome (done, failed, retry, canceled, interrupted, budget)",
            ["kind", "outcome"],
            registry=r,
        )
        self.retries = Counter(
            "jobwarden_job_retries", "Attempts that ended in a retry", ["kind"], registry=r
        )
        self.duration = Histogram(
            "jobwarden_job_duration_seconds",
            "Duration of one attempt",
            ["kind"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.failed = Counter(
            "jobwarden_jobs_failed",
            "Jobs that failed for good, by kind and failure code",
            ["kind", "code"],
            registry=r,
        )
        self.stuck_recovered = Counter(
            "jobwarden_stuck_recovered",
            "Jobs the monitor stopped, by rule (stuck, stall, sla, queued_timeout)",
            ["rule"],
            registry=r,
        )
        self.jobs_stuck = Gauge(
            "jobwarden_jobs_stuck",
            "Jobs stuck now: found stuck or stalled, and not heard from since",
            registry=r,
        )
        self.schedule_slots = Counter(
            "jobwarden_schedule_slots",
            "Recurring schedules' slots (and triggers) by outcome: fired, skipped, missed",
            ["schedule", "outcome"],
            registry=r,
        )
        self.rejected = Counter(
            "jobwarden_admission_rejected", "Submissions refused, by code", ["code"], registry=r
        )
        self.breaker_state = Gauge(
            "jobwarden_breaker_state",
            "Circuit state per service: 0 closed, 1 half-open, 2 open",
            ["service"],
            registry=r,
        )
        self.breaker_recovery = Gauge(
            "jobwarden_breaker_recovery_seconds",
            "How long an open circuit refuses calls before it lets probes through",
            ["service"],
            registry=r,
        )
        self.breaker_not_closed = Gauge(
            "jobwarden_breaker_not_closed_seconds",
            "How long the circuit has been open or half-open, as seen at each scrape; 0 closed",
            ["service"],
            registry=r,
        )
        self.spend = Counter(
            "jobwarden_spend_usd", "Money spent on external calls", ["service"], registry=r
        )
        self.budget_remaining = Gauge(
            "jobwarden_budget_remaining_usd", "What today's budget has left", registry=r
        )
        self.store_writable = Gauge(
            "jobwarden_store_writable",
            "1 while the store takes writes, 0 while it takes none (disk full, file refuses)",
            registry=r,
        )
        self.budget_limit = Gauge(
            "jobwarden_budget_limit_usd",
            "The budget's hard limit per period (day, month); no series when unlimited",
            ["period"],
            registry=r,
        )
        self.budget_spent = Gauge(
            "jobwarden_budget_spent_usd",
            "Spent in the current budget period (day, month)",
            ["period"],
            registry=r,
        )
        self.budget_used = Gauge(
            "jobwarden_budget_used_ratio",
            "Spent over the limit in the current period, 0-1; no series when unlimited",
            ["period"],
            registry=r,
        )
        self.budget_stopped = Gauge(
            "jobwarden_budget_stopped",
            "1 while the budget's emergency stop holds spending, else 0",
            registry=r,
        )
        self.request_duration = Histogram(
            "jobwarden_request_duration_seconds",
            "Listener request duration",
            ["listener", "cmd"],
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.refused = Counter(
            "jobwarden_requests_refused",
            "Requests and connections a listener refused, by error code (INTERNAL included)",
            ["listener", "code"],
            registry=r,
        )
        # The daemon's own resident memory, CPU seconds and open file descriptors.
        ProcessCollector(registry=r)
        self._job_series: dict[tuple[str, str], tuple[Any, Any, Any]] = {}
        self._kinds: tuple[str, ...] = ()
        # Scrape time (trio's clock) at which each service's circuit was first seen not closed.
        self._not_closed_since: dict[str, float] = {}
        for rule in RULES:
            self.stuck_recovered.labels(rule)

    def declare(self, config: Config) -> None:
        """Give every configured kind, schedule and service its series at 0; again after a
        reload."""
        self._kinds = tuple(config.kinds)
        for kind in self._kinds:
            self.duration.labels(kind)
            self.retries.labels(kind)
            for outcome in OUTCOMES:
                self.processed.labels(kind, outcome)
        for schedule in config.schedules:
            for outcome in SCHEDULE_OUTCOMES:
                self.schedule_slots.labels(schedule, outcome)
        self.breaker_recovery.clear()
        for name, service in config.services.items():
            self.spend.labels(name)
            self.breaker_recovery.labels(name).set(service.breaker.recovery)

    def request_done(
        self, listener: str, seconds: float, thresholds: tuple[float, float], **what: str
    ) -> None:
        """Time one listener request; one past the thresholds (slow, very slow) is logged too
        (seed 004). `what` is the one field naming the request (cmd=, path=, op=)."""
        (name,) = what.values()
        self.request_duration.labels(listener, name).observe(seconds)
        slow, very_slow = thresholds
        if seconds >= very_slow:
            log.warning("very slow request", duration=round(seconds, 3), **what)
        elif seconds >= slow:
            log.info("slow request", duration=round(seconds, 3), **what)

    def job_finished(self, kind: str, outcome: str, seconds: float, code: str | None) -> None:
        """Count one finished attempt; `code` is its error code, if it ended with one."""
        # Looking a labelled series up costs more than counting into it, once per job.
        series = self._job_series.get((kind, outcome))
        if series is None:
            series = self._job_series[kind, outcome] = (
                self.processed.labels(kind, outcome),
                self.duration.labels(kind),
                self.retries.labels(kind) if outcome == "retry" else None,
            )
        processed, duration, retries = series
        processed.inc()
        duration.observe(seconds)
        if retries is not None:
            retries.inc()
        if outcome == "failed":
            self.failed.labels(kind, code or "UNKNOWN").inc()

    def set_state(
        self, health: dict[str, Any], by_status_kind: dict[tuple[str, str], int], now: float
    ) -> None:
        """Set the gauges from the health snapshot; `now` is trio's clock at the scrape."""
        self.jobs.clear()
        for kind in self._kinds:
            for status in STATUSES:
                self.jobs.labels(status, kind).set(0)
        for (status, kind), count in by_status_kind.items():
            self.jobs.labels(status, kind).set(count)
        self.queue_depth.clear()
        for kind in self._kinds:
            self.queue_depth.labels(kind).set(0)
        for kind, count in health["queue_depth"].items():
            self.queue_depth.labels(kind).set(count)
        self.running.set(health["running"])
        self.oldest_queued.set(health["oldest_queued_seconds"] or 0)
        self.memory_used.set(health["system"]["memory_percent"] / 100)
        self.jobs_stuck.set(health["stuck"]["now"])
        if health["system"]["cpu_percent"] is not None:
            self.cpu_used.set(health["system"]["cpu_percent"] / 100)
        self.store_writable.set(1 if health["store"]["writable"] else 0)
        self._set_breakers(health["breakers"], now)
        self._set_budget(health["budget"])

    def _set_breakers(self, breakers: dict[str, dict[str, Any]], now: float) -> None:
        self.breaker_state.clear()
        self.breaker_not_closed.clear()
        for service, view in breakers.items():
            state = view["state"]
            self.breaker_state.labels(service).set(BREAKER_LEVELS[state])
            if state == "closed":
                self._not_closed_since.pop(service, None)
                since = now
            else:
                since = self._not_closed_since.setdefault(service, now)
            self.breaker_not_closed.labels(service).set(now - since)

    def _set_budget(self, budget: dict[str, Any]) -> None:
        remaining = budget["remaining_today"]
        self.budget_remaining.set(remaining if remaining is not None else float("inf"))
        self.budget_stopped.set(1 if budget["stopped"] else 0)
        self.budget_limit.clear()
        self.budget_used.clear()
        for period, limit, spent in (
            ("day", budget["daily_usd"], budget["spent_today"]),
            ("month", budget["monthly_usd"], budget["spent_month"]),
        ):
            self.budget_spent.labels(period).set(spent)
            if limit:
                self.budget_limit.labels(period).set(limit)
                self.budget_used.labels(period).set(spent / limit)

    def render(self) -> bytes:
        return generate_latest(self.registry)
