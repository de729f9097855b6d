"""The monitor's rules, as plain functions of the config, the job rows and the time.

Thresholds per kind, with [monitor] defaults:
1. stuck: running with no heartbeat (progress, checkpoint, ctx.heartbeat) for `stuck_after`;
2. stall: running, has reported progress, and it has not changed for `stall_after`;
3. sla: queued or running and older than the kind's `sla` -> failed SLA_BREACH;
4. queued_timeout: eligible to run (backoff over, kind not held on purpose) yet not started for
   `queued_timeout` -> failed QUEUED_TIMEOUT.
Rules 1 and 2 stop the handler and then follow the kind's retry policy: requeue with backoff
while attempts remain, else fail STUCK_TIMEOUT. Beside them, the failure rate over a window,
which raises an alert.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any, Literal

import msgspec

from jobwarden.config import Config, format_duration
from jobwarden.store.monitor import Candidates, Row

Rule = Literal["stuck", "stall", "sla", "queued_timeout"]
# The error code a job gets when a rule fails it.
FAILURE_CODES: dict[Rule, str] = {
    "stuck": "STUCK_TIMEOUT",
    "stall": "STUCK_TIMEOUT",
    "sla": "SLA_BREACH",
    "queued_timeout": "QUEUED_TIMEOUT",
}


class Finding(msgspec.Struct, omit_defaults=True):
    """What a rule found about one job, and what is done about it."""

    job: int
    kind: str
    status: str
    rule: Rule
    action: str
    detail: str


def evaluate(
    config: Config, found: Candidates, *, held: set[str], all_held: bool, now: float
) -> tuple[list[Finding], float]:
    """The rules as a plain function: what to do now, and when a rule could next fire.
    Queued jobs of the kinds `held` on purpose (or of every kind, `all_held`) are not late."""
    findings: list[Finding] = []
    deadlines = [math.inf]
    for job in found.running:
        sla = config.rule(job.kind, "sla")
        stuck_after = config.rule(job.kind, "stuck_after")
        stall_after = config.rule(job.kind, "stall_after")
        last_beat = job.heartbeat_at if job.heartbeat_at is not None else job.started_at
        assert last_beat is not None
        requeue = "requeue" if job.attempt < job.max_attempts else "fail STUCK_TIMEOUT"
        if now - job.created_at >= sla:
            findings.append(_sla_breach(job, now, sla))
        elif now - last_beat >= stuck_after:
            detail = f"no heartbeat for {format_duration(round(now - last_beat))}"
            findings.append(Finding(job.id, job.kind, job.status, "stuck", requeue, detail))
        elif job.progress_at is not None and now - job.progress_at >= stall_after:
            detail = (
                f"progress unchanged at {job.progress or 0:.0%} "
                f"for {format_duration(round(now - job.progress_at))}"
            )
            findings.append(Finding(job.id, job.kind, job.status, "stall", requeue, detail))
        else:
            deadlines += [job.created_at + sla, last_beat + stuck_after]
            if job.progress_at is not None:
                deadlines.append(job.progress_at + stall_after)
    for job in found.queued:
        sla = config.rule(job.kind, "sla")
        queued_timeout = config.rule(job.kind, "queued_timeout")
        waits_by_choice = all_held or job.kind in held or job.kind not in config.kinds
        if now - job.created_at >= sla:
            findings.append(_sla_breach(job, now, sla))
        elif not waits_by_choice and now - job.available_at >= queued_timeout:
            detail = f"waiting for a slot for {format_duration(round(now - job.available_at))}"
            findings.append(
                Finding(
                    job.id, job.kind, job.status, "queued_timeout", "fail QUEUED_TIMEOUT", detail
                )
            )
    if found.oldest_available_at is not None and not all_held:
        deadlines.append(found.oldest_available_at + smallest_threshold(config, "queued_timeout"))
    if found.oldest_created_at is not None:
        deadlines.append(found.oldest_created_at + smallest_threshold(config, "sla"))
    upcoming = [d for d in deadlines if d > now]
    return findings, min(upcoming, default=math.inf)


def _sla_breach(job: Row, now: float, sla: float) -> Finding:
    age = format_duration(round(now - job.created_at))
    detail = f"{age} old, over its SLA of {format_duration(sla)}"
    return Finding(job.id, job.kind, job.status, "sla", "fail SLA_BREACH", detail)


def smallest_threshold(config: Config, rule: str) -> float:
    """The smallest `rule` threshold over every kind: no job passes that rule sooner."""
    return min((config.rule(kind, rule) for kind in config.kinds), default=math.inf)


def failure_rate(
    history: deque[tuple[float, int, int]], now: float, window: float
) -> tuple[float, int]:
    """Failed share of finished attempts over the window, from (time, done, failed) totals."""
    while len(history) > 1 and history[1][0] <= now - window:
        history.popleft()
    if len(history) < 2:
        return 0.0, 0
    _, done_then, failed_then = history[0]
    _, done_now, failed_now = history[-1]
    finished = (done_now - done_then) + (failed_now - failed_then)
    return ((failed_now - failed_then) / finished if finished else 0.0), finished


def held_on_purpose(config: Config, scheduler: dict[str, Any]) -> tuple[set[str], bool]:
    """From the scheduler's snapshot: the kinds whose queued jobs are held on purpose, and
    whether every job is. Such jobs are not late: a paused kind, a kind whose service is open
    or whose memory requirement is not free; everything while draining, while the budget is
    stopped or while the machine is loaded."""
    open_services = set(scheduler["open_services"])
    kinds = (
        set(scheduler["paused"])
        | set(scheduler["short_of_memory"])
        | {name for name, kind in config.kinds.items() if open_services & set(kind.services)}
    )
    everything = (
        scheduler["paused_all"]
        or not scheduler["dispatching"]
        or scheduler["budget_stopped"]
        or scheduler["held_by_load"] is not None
    )
    return kinds, everything
