"""Scheduler: decides what runs next.

Consumes `JobQueued` (admission), `JobFinished` (pool), `Pause`/`Resume`/`Snapshot` (admin),
`ServiceState` (breaker), `BudgetState` (ledger), `StopDispatch`/`Reconfigure` (supervisor).
Produces `RunJob` for the pool.

Order: highest priority first, then oldest (FIFO by id), among jobs whose `available_at`
(backoff) has come, whose kind is not paused, needs no service whose circuit is open, and has
a free slot under its own limit, within the global `max_concurrent_jobs`; nothing starts while
the budget is stopped or the daemon drains. The queue stays in SQLite; each dispatch round
claims just enough rows for the free slots in one store write, so memory does not grow with
the queue. Between rounds the scheduler sleeps until a message arrives, a backoff ends, or an
open circuit's recovery time comes.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import msgspec
import structlog
import trio

from actors.breaker import ServiceState
from actors.ledger import BudgetState
from daemon import jobs
from daemon.clock import WallClock
from daemon.config import Config
from daemon.mailbox import ReplySlot
from daemon.protocol import JobView
from daemon.store import Store

log = structlog.get_logger("scheduler")

PAUSED_SETTING = "paused"


class JobQueued(msgspec.Struct):
    kind: str


class JobFinished(msgspec.Struct):
    kind: str


class Pause(msgspec.Struct):
    """Pause one kind, or everything when kind is None."""

    kind: str | None
    reply: ReplySlot[dict[str, Any]]


class Resume(msgspec.Struct):
    kind: str | None
    reply: ReplySlot[dict[str, Any]]


class StopDispatch(msgspec.Struct):
    pass


class Snapshot(msgspec.Struct):
    reply: ReplySlot[dict[str, Any]]


class Reconfigure(msgspec.Struct):
    config: Config


class RunJob(msgspec.Struct):
    job: JobView


SchedulerMessage = (
    JobQueued
    | JobFinished
    | Pause
    | Resume
    | StopDispatch
    | Snapshot
    | Reconfigure
    | ServiceState
    | BudgetState
)


class PauseState(msgspec.Struct):
    kinds: list[str] = []
    all: bool = False


def free_capacity(
    config: Config, running: dict[str, int], paused: PauseState, open_services: set[str]
) -> tuple[int, dict[str, int]]:
    """Free slots overall, and per kind that may start a job now: not paused, no service it
    needs behind an open circuit, under its own limit."""
    total = config.daemon.max_concurrent_jobs - sum(running.values())
    if total <= 0 or paused.all:
        return 0, {}
    capacity = {}
    for name, kind in config.kinds.items():
        if name in paused.kinds or open_services.intersection(kind.services):
            continue
        free = total
        if kind.max_concurrent is not None:
            free = min(total, kind.max_concurrent - running.get(name, 0))
        if free > 0:
            capacity[name] = free
    return total, capacity


class Scheduler:
    def __init__(
        self,
        *,
        config: Config,
        store: Store,
        clock: WallClock,
        inbox: trio.MemoryReceiveChannel[SchedulerMessage],
        pool: trio.MemorySendChannel[RunJob],
    ) -> None:
        self._config = config
        self._store = store
        self._clock = clock
        self._inbox = inbox
        self._pool = pool
        self._running: dict[str, int] = {}
        self._paused = PauseState()
        self._dispatching = True
        # Services whose circuit is open, and until when; kinds needing them wait.
        self._open_services: dict[str, float] = {}
        self._budget = BudgetState(stopped=False)
        # True when something changed that may let a job start; the next round claims.
        self._dirty = True
        self._next_available_at: float | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        stored = await self._store.read(partial(jobs.get_setting, key=PAUSED_SETTING, default=None))
        if stored is not None:
            self._paused = msgspec.convert(stored, PauseState)
        async with self._inbox, self._pool:
            task_status.started()
            while True:
                if self._dirty:
                    await self._dispatch()
                with trio.move_on_at(self._wake_deadline()) as waiting:
                    try:
                        msg = await self._inbox.receive()
                    except trio.EndOfChannel:
                        return
                    await self._handle(msg)
                    # Fold everything already waiting into one dispatch round.
                    while True:
                        try:
                            msg = self._inbox.receive_nowait()
                        except (trio.WouldBlock, trio.EndOfChannel):
                            break
                        await self._handle(msg)
                if waiting.cancelled_caught:
                    self._dirty = True

    def _wake_deadline(self) -> float:
        """When time alone may let a job start: a backoff ending, a circuit's recovery.

        Only future moments count: a past one was already acted on, and waking for it again
        would spin. While dispatch is stopped (drain, budget) nothing but a message helps.
        """
        if not self._dispatching or self._budget.stopped:
            return math.inf
        now = self._clock.now()
        wakes = [*self._open_services.values(), self._next_available_at]
        future = [t for t in wakes if t is not None and t > now]
        return self._clock.deadline_for(min(future, default=math.inf))

    async def _handle(self, msg: SchedulerMessage) -> None:
        match msg:
            case JobQueued():
                self._dirty = True
            case JobFinished(kind=kind):
                self._running[kind] = self._running.get(kind, 1) - 1
                self._dirty = True
            case Pause(kind=kind, reply=reply):
                if kind is None:
                    self._paused = PauseState(kinds=self._paused.kinds, all=True)
                elif kind not in self._paused.kinds:
                    self._paused = PauseState(
                        kinds=[*self._paused.kinds, kind], all=self._paused.all
                    )
                await self._save_paused()
                reply.set(self._pause_view())
            case Resume(kind=kind, reply=reply):
                if kind is None:
                    self._paused = PauseState()
                else:
                    self._paused = PauseState(
                        kinds=[k for k in self._paused.kinds if k != kind], all=self._paused.all
                    )
                await self._save_paused()
                self._dirty = True
                reply.set(self._pause_view())
            case StopDispatch():
                self._dispatching = False
            case Snapshot(reply=reply):
                reply.set(self.statistics())
            case Reconfigure(config=config):
                self._config = config
                self._dirty = True
            case ServiceState(service=service, open_until=open_until):
                if open_until is None:
                    self._open_services.pop(service, None)
                else:
                    self._open_services[service] = open_until
                self._dirty = True
            case BudgetState():
                self._budget = msg
                self._dirty = True

    async def _save_paused(self) -> None:
        await self._store.write(
            partial(jobs.set_setting, key=PAUSED_SETTING, value=msgspec.to_builtins(self._paused))
        )

    def _pause_view(self) -> dict[str, Any]:
        return {"paused": list(self._paused.kinds), "all": self._paused.all}

    def statistics(self) -> dict[str, Any]:
        return {
            "running": sum(self._running.values()),
            "running_by_kind": {k: n for k, n in self._running.items() if n},
            "max_concurrent_jobs": self._config.daemon.max_concurrent_jobs,
            "paused": list(self._paused.kinds),
            "paused_all": self._paused.all,
            "dispatching": self._dispatching,
            "next_available_at": self._next_available_at,
            "open_services": dict(self._open_services),
            "budget_stopped": self._budget.stopped,
        }

    async def _dispatch(self) -> None:
        self._dirty = False
        if not self._dispatching or self._budget.stopped:
            return
        now = self._clock.now()
        # Past its open_until a circuit lets probes through, so its kinds may run again.
        open_now = {name for name, until in self._open_services.items() if until > now}
        total, capacity = free_capacity(self._config, self._running, self._paused, open_now)
        if not capacity:
            # Nothing can start until a slot frees or a kind resumes; both message us.
            self._next_available_at = None
            return
        claimed = await self._store.write(
            partial(jobs.claim, capacity=capacity, total=total, now=now)
        )
        self._next_available_at = claimed.next_available_at
        for job in claimed.jobs:
            self._running[job.kind] = self._running.get(job.kind, 0) + 1
            await self._pool.send(RunJob(job=job))
