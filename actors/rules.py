"""The monitor's rules, as plain functions of the config, the job rows and the time.

Thresholds per kind, with [monitor] defaults:
1. stuck: running with no heartbeat (progress, checkpoint, ctx.heartbeat) for `stuck_after`;
2. stall: running, has reported progress, and it has not changed for `stall_after`;
3. sla: queued or running and older than the kind's `sla` (counted from its `run_at`, for a
   job submitted to start later) -> failed SLA_BREACH;
4. queued_timeout: eligible to run (backoff over, kind not held on purpose, the job not held
   nor waiting for jobs it runs after) yet not started for `queued_timeout` -> failed
   QUEUED_TIMEOUT.
Rules 1 and 2 stop the handler and then follow the kind's retry policy: requeue with backoff
while attempts remain, else fail STUCK_TIMEOUT. Time the daemon itself was not running (stopped,
a paused VM, a loop blocked) is credited to rules 1 and 2: a job cannot report while nothing
reads it. Beside them, the failure rate over a window, which raises an alert, and which jobs
found stuck still are.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import msgspec

from jobwarden.config import Config, format_duration
from jobwarden.store.monitor import Candidates, Row, StuckRow

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


# (wall time a pause ended, its length in seconds): time the daemon was not running.
Pause = tuple[float, float]


def paused_since(pauses: Sequence[Pause], since: float) -> float:
    """Seconds the daemon was not running after `since`: the part of each pause after it."""
    return sum(max(0.0, min(length, end - since)) for end, length in pauses)


class _Clocks(msgspec.Struct):
    """When each rule fires for one running job: the SLA, and rules 1 and 2 with the time
    the daemon was not running added; and its last sign of life."""

    last_beat: float
    sla: float
    stuck: float
    stall: float


def _clocks(config: Config, job: Row, pauses: Sequence[Pause]) -> _Clocks:
    last_beat = job.heartbeat_at if job.heartbeat_at is not None else job.started_at
    assert last_beat is not None
    stall = math.inf
    if job.progress_at is not None:
        stall = (
            job.progress_at
            + config.rule(job.kind, "stall_after")
            + paused_since(pauses, job.progress_at)
        )
    return _Clocks(
        last_beat=last_beat,
        sla=job.asked_for + config.rule(job.kind, "sla"),
        stuck=last_beat + config.rule(job.kind, "stuck_after") + paused_since(pauses, last_beat),
        stall=stall,
    )


def relevant_pauses(pauses: list[Pause], running: Sequence[Row]) -> list[Pause]:
    """The pauses that can still move a running job's deadline: those that ended after the
    oldest last heartbeat or progress change among them."""
    marks = [
        mark
        for job in running
        for mark in (job.heartbeat_at, job.started_at, job.progress_at)
        if mark is not None
    ]
    oldest = min(marks, default=math.inf)
    return [pause for pause in pauses if pause[0] > oldest]


def started_deadline(config: Config, kind: str, created_at: float, started_at: float) -> float:
    """The earliest a rule can fire for a job that has just started and not reported yet."""
    return min(created_at + config.rule(kind, "sla"), started_at + config.rule(kind, "stuck_after"))


def progress_deadline(config: Config, kind: str, reported_at: float) -> float:
    """The earliest the stall rule can fire for a job whose first progress came just now."""
    return reported_at + config.rule(kind, "stall_after")


def evaluate(
    config: Config,
    found: Candidates,
    *,
    held: set[str],
    all_held: bool,
    now: float,
    pauses: Sequence[Pause] = (),
) -> tuple[list[Finding], float]:
    """The rules as a plain function: what to do now, and when a rule could next fire.
    Queued jobs of the kinds `held` on purpose (or of every kind, `all_held`) are not late;
    `pauses` the daemon was not running do not count against running jobs."""
    findings: list[Finding] = []
    deadlines = [math.inf]
    for job in found.running:
        clocks = _clocks(config, job, pauses)
        requeue = "requeue" if job.attempt < job.max_attempts else "fail STUCK_TIMEOUT"
        if now >= clocks.sla:
            findings.append(_sla_breach(job, now, config.rule(job.kind, "sla")))
        elif now >= clocks.stuck:
            detail = f"no heartbeat for {format_duration(round(now - clocks.last_beat))}"
            findings.append(Finding(job.id, job.kind, job.status, "stuck", requeue, detail))
        elif now >= clocks.stall:
            assert job.progress_at is not None
            detail = (
                f"progress unchanged at {job.progress or 0:.0%} "
                f"for {format_duration(round(now - job.progress_at))}"
            )
            findings.append(Finding(job.id, job.kind, job.status, "stall", requeue, detail))
        else:
            deadlines += [clocks.sla, clocks.stuck, clocks.stall]
    for job in found.queued:
        sla = config.rule(job.kind, "sla")
        queued_timeout = config.rule(job.kind, "queued_timeout")
        waits_by_choice = (
            all_held or job.held_back or job.kind in held or job.kind not in config.kinds
        )
        if now - job.asked_for >= sla:
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
    age = format_duration(round(now - job.asked_for))
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


def still_stuck(found_at_attempt: dict[int, int], rows: Iterable[StuckRow]) -> set[int]:
    """Of the jobs found stuck or stalled (job -> the attempt found so), those stuck now:
    not finished, and not heard from since. A job is heard from again once a later attempt
    has ended or has reported (a heartbeat after its start); until then it is still stuck,
    whether its stuck attempt has not stopped yet, it waits for a retry, or the retry runs
    without a sign of life."""
    stuck = set()
    for row in rows:
        if row.status not in ("queued", "running"):
            continue
        later = row.attempt > found_at_attempt[row.id]
        reported = (
            row.heartbeat_at is not None
            and row.started_at is not None
            and row.heartbeat_at > row.started_at
        )
        if later and (row.status != "running" or reported):
            continue
        stuck.add(row.id)
    return stuck
