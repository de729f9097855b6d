"""Prometheus metrics, made with prometheus-client in a registry of the daemon's own.

The instruments are write-only sinks, shared the way the logger is: actors count and observe
into them, and only the /metrics listener reads them. Gauges that describe the whole state
(jobs by status, queue depth, memory) are set from one snapshot just before each scrape.
"""

from __future__ import annotations

from typing import Any

import structlog
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

log = structlog.get_logger("requests")

DURATION_BUCKETS = (0.1, 0.5, 1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600)
BREAKER_LEVELS = {"closed": 0, "half_open": 1, "open": 2}
REQUEST_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5)


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
            "jobwarden_oldest_queued_seconds", "Age of the oldest queued job", registry=r
        )
        self.memory_percent = Gauge(
            "jobwarden_memory_used_percent", "System memory in use", registry=r
        )
        self.cpu_percent = Gauge("jobwarden_cpu_percent", "System CPU in use", registry=r)
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
        self.rejected = Counter(
            "jobwarden_admission_rejected", "Submissions refused, by code", ["code"], registry=r
        )
        self.breaker_state = Gauge(
            "jobwarden_breaker_state",
            "Circuit state per service: 0 closed, 1 half-open, 2 open",
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
        self.request_duration = Histogram(
            "jobwarden_request_duration_seconds",
            "Listener request duration",
            ["listener", "cmd"],
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self._job_series: dict[tuple[str, str], tuple[Any, Any, Any]] = {}

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

    def job_finished(self, kind: str, outcome: str, seconds: float) -> None:
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

    def set_state(self, health: dict[str, Any], by_status_kind: dict[tuple[str, str], int]) -> None:
        self.jobs.clear()
        for (status, kind), count in by_status_kind.items():
            self.jobs.labels(status, kind).set(count)
        self.queue_depth.clear()
        for kind, count in health["queue_depth"].items():
            self.queue_depth.labels(kind).set(count)
        self.running.set(health["running"])
        self.oldest_queued.set(health["oldest_queued_seconds"] or 0)
        self.memory_percent.set(health["system"]["memory_percent"])
        self.jobs_stuck.set(health["stuck"]["now"])
        for service, view in health["breakers"].items():
            self.breaker_state.labels(service).set(BREAKER_LEVELS[view["state"]])
        remaining = health["budget"]["remaining_today"]
        self.budget_remaining.set(remaining if remaining is not None else float("inf"))
        if health["system"]["cpu_percent"] is not None:
            self.cpu_percent.set(health["system"]["cpu_percent"])
        self.store_writable.set(1 if health["store"]["writable"] else 0)

    def render(self) -> bytes:
        return generate_latest(self.registry)
