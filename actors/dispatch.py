"""The scheduler's decisions, as plain functions of its state: which kinds may start how many
jobs now (`free_capacity`), whether the machine's load holds dispatch (`load_too_high`,
`short_of_memory`), and the one reason a queued job waits (`explain`). The order among the
jobs that may start is the store's claim query; the scheduler actor applies all of this.
"""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

import msgspec

from jobwarden.actors.messages import BudgetState, PauseState
from jobwarden.config import Config, KindSection, format_size
from jobwarden.store.engine import StoreFault
from jobwarden.system import SystemLoad
from jobwarden.wire.views import JobView

# The reason of a job that waits only for its turn in the dispatch order.
TURN_REASON = "position"


class WaitState(msgspec.Struct, frozen=True):
    """What the scheduler knows that decides whether a queued job may start now."""

    now: float
    dispatching: bool
    paused: PauseState
    budget: BudgetState
    open_services: dict[str, float]
    load: SystemLoad
    running: dict[str, int]
    running_by_user: dict[str, int]
    # Why the store takes no writes, while it takes none: no claim could be recorded.
    store_fault: StoreFault | None = None


def load_too_high(config: Config, load: SystemLoad | None) -> str | None:
    """Why dispatch is paused for the machine's sake, or None."""
    if load is None:
        return None
    limits = config.limits
    if load.memory_percent > limits.max_memory_percent:
        return f"memory {load.memory_percent:.0f}% > {limits.max_memory_percent:g}%"
    if load.cpu_percent is not None and load.cpu_percent > limits.max_cpu_percent:
        return f"cpu {load.cpu_percent:.0f}% > {limits.max_cpu_percent:g}%"
    return None


def short_of_memory(kind: KindSection, load: SystemLoad | None) -> bool:
    """The kind needs more free memory than the last sample found."""
    return (
        kind.min_memory is not None and load is not None and load.memory_available < kind.min_memory
    )


def explain(
    config: Config,
    state: WaitState,
    job: JobView,
    *,
    user_limit: int | None,
    position: tuple[int, int, int, int],
    zone: ZoneInfo,
    user_held: bool = False,
    waiting_for: list[int] | None = None,
) -> str:
    """The one reason a queued job is not running, the most direct first: what only an
    operator or another job ends (a hold, a dependency), then time, then the daemon's state.
    `waiting_for`: the jobs it runs after that have not ended."""
    kind = config.kinds.get(job.kind)
    if job.held:
        return "held by an operator"
    if user_held:
        return f"user {job.user} on hold"
    if waiting_for:
        more = f" and {len(waiting_for) - 1} more" if len(waiting_for) > 1 else ""
        return f"waiting for job {waiting_for[0]}{more}"
    if job.available_at > state.now:
        if job.attempt:
            until = datetime.fromtimestamp(job.available_at, zone).strftime("%H:%M:%S")
            return f"backoff until {until} (attempt {job.attempt + 1} of {job.max_attempts})"
        return f"scheduled for {wall_time(job.available_at, state.now, zone)}"
    if kind is None:
        return f"kind {job.kind} is not configured"
    if not state.dispatching:
        return "the daemon is draining"
    if state.store_fault is not None:
        return f"the store takes no writes ({state.store_fault.code}): {state.store_fault.message}"
    if state.paused.all:
        return "all kinds paused"
    if job.kind in state.paused.kinds:
        return f"kind {job.kind} paused"
    if state.budget.stopped:
        return f"budget stopped: {state.budget.reason}"
    for service in kind.services:
        until = state.open_services.get(service)
        if until is not None and until > state.now:
            at = datetime.fromtimestamp(until, zone).strftime("%H:%M:%S")
            return f"service {service} unavailable until {at} (circuit open)"
    too_high = load_too_high(config, state.load)
    if too_high is not None:
        return too_high
    if short_of_memory(kind, state.load):
        free = format_size(state.load.memory_available)
        return f"needs {format_size(kind.min_memory)}, {free} free"
    limit = config.limits.max_running_per_user if user_limit is None else user_limit
    mine = state.running_by_user.get(job.user, 0)
    if limit and mine >= limit:
        return f"user {job.user} at running limit {limit}"
    running = sum(state.running.values())
    slots = config.daemon.max_concurrent_jobs
    if running >= slots:
        return f"no free slot ({running} of {slots} running)"
    of_kind = state.running.get(job.kind, 0)
    if kind.max_concurrent is not None and of_kind >= kind.max_concurrent:
        return f"no free slot for {job.kind} ({of_kind} of {kind.max_concurrent} running)"
    place, queued = position[0], position[1]
    return f"{TURN_REASON} {place} of {queued}"


def wall_time(at: float, now: float, zone: ZoneInfo) -> str:
    """A moment as a person reads it: the time and the zone, with the date unless today."""
    moment = datetime.fromtimestamp(at, zone)
    if moment.date() == datetime.fromtimestamp(now, zone).date():
        return moment.strftime("%H:%M:%S %Z")
    return moment.strftime("%Y-%m-%d %H:%M:%S %Z")


def free_capacity(
    config: Config,
    running: dict[str, int],
    paused: PauseState,
    open_services: set[str],
    load: SystemLoad | None = None,
) -> tuple[int, dict[str, int]]:
    """Free slots overall, and per kind that may start a job now: not paused, no service it
    needs behind an open circuit, under its own limit, its memory requirement free."""
    total = config.daemon.max_concurrent_jobs - sum(running.values())
    if total <= 0 or paused.all or load_too_high(config, load) is not None:
        return 0, {}
    capacity = {}
    for name, kind in config.kinds.items():
        if name in paused.kinds or open_services.intersection(kind.services):
            continue
        free = total
        if kind.max_concurrent is not None:
            free = min(total, kind.max_concurrent - running.get(name, 0))
        if kind.min_memory is not None and load is not None:
            # Each job started now needs its own share of the free memory.
            free = min(free, load.memory_available // kind.min_memory)
        if free > 0:
            capacity[name] = free
    return total, capacity
