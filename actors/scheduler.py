"""Scheduler: decides what runs next, and says why everything else waits.

Consumes `JobQueued` (admission), `QueueChanged` (holds, queued jobs that ended), `JobsEnded`
(pool), `Pause`/`Resume`/`SchedulerSnapshot`/`Explain` (admin), `ServiceState` (breaker),
`BudgetState` (ledger), `StopDispatch`/`Reconfigure`, each `SystemLoad` sample and each
change of the store's health, `StoreState` (supervisor).
Produces `RunJobs` for the pool, and `position` events through the store. Its decisions (free
capacity, load, waiting reasons) are plain functions in actors/dispatch.py.

Order: highest priority first; within a priority, round-robin across users by fair tag (a
user's n-th waiting job gets a tag one past their previous one, and never below the tag being
dispatched, so a user with 100 queued jobs delays another user's single job by at most one
slot); then oldest first. Only jobs whose `available_at` (backoff) has come, whose kind is not
paused, needs no service whose circuit is open, has a free slot under its own limit and, if it
declares `min_memory`, finds that much free; whose user is under their running limit; within
the global `max_concurrent_jobs`. Nothing starts while the budget is stopped, the daemon
drains, the store takes no writes (it could not record the claim), or memory or CPU use is
above its limit (in the latest sample, taken every `limits.sample_every`).

The queue stays in the store; each dispatch round claims just enough rows for the free slots in
one store write, so memory does not grow with the queue. That write first reads the pauses and
the open circuits as they are stored now, so that a pause or a breaker of any daemon on the
database holds the jobs here too, decided in the transaction that claims; the scheduler keeps
what it read for `explain` and for its wake-ups. A change made by another daemon is seen at the
next round: any message wakes one (a cluster's wake-up sends `JobQueued`). Between rounds the
scheduler sleeps until a message arrives (a new sample among them, which starts a round while
load holds jobs back), a backoff ends or an open circuit's recovery time comes.

Positions: at most every `limits.position_every`, when anything changed, the head of the queue
(`limits.position_head` jobs in dispatch order) is read and each job whose position or reason
changed gets one `position` event, so a queue of 10,000 costs at most a hundred events a tick.
A job that waits only for its turn (free slots, nothing holding it) gets none: it starts in the
dispatch round under way.
`jobwarden show` computes any job's position and reason on demand (`explain`).
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any
from zoneinfo import ZoneInfo

import msgspec
import structlog
import trio

from jobwarden.actors.dispatch import (
    TURN_REASON,
    WaitState,
    explain,
    free_capacity,
    load_too_high,
    short_of_memory,
)
from jobwarden.actors.messages import (
    BudgetState,
    Explain,
    JobQueued,
    JobsEnded,
    Pause,
    PauseState,
    QueueChanged,
    Reconfigure,
    Resume,
    RunJobs,
    SchedulerMessage,
    SchedulerSnapshot,
    ServiceState,
    StopDispatch,
    WaitingInfo,
)
from jobwarden.clock import WallClock
from jobwarden.config import Config
from jobwarden.errors import StoreError
from jobwarden.mailbox import ReplySlot
from jobwarden.store import Engine, jobs, users
from jobwarden.store.breakers import load_breakers
from jobwarden.store.engine import StoreState
from jobwarden.store.rows import Events
from jobwarden.system import SystemLoad
from jobwarden.wire.views import JobView

log = structlog.get_logger("scheduler")

PAUSED_SETTING = "paused"


class Claimed(msgspec.Struct):
    """A dispatch round's write: the pauses and open circuits it found stored, the capacity
    they left, and what it claimed within that (None: nothing could start)."""

    paused: PauseState
    open_services: dict[str, float]
    capacity: dict[str, int]
    claimed: jobs.ClaimResult | None


def claim_where_allowed(
    conn: Any,
    events: Events,
    *,
    config: Config,
    running: dict[str, int],
    running_by_user: dict[str, int],
    load: SystemLoad,
    now: float,
    node: int,
) -> Claimed:
    """Run in the store's transaction: the pauses and open circuits as stored now, by any
    daemon on the database, then the claim of jobs to run on `node` within the capacity
    they leave."""
    paused = msgspec.convert(jobs.get_setting(conn, PAUSED_SETTING) or {}, PauseState)
    open_services = {
        service: circuit.open_until
        for service, circuit in load_breakers(conn).items()
        if circuit.state == "open" and circuit.open_until is not None and circuit.open_until > now
    }
    total, capacity = free_capacity(config, running, paused, set(open_services), load)
    claimed = None
    if capacity:
        claimed = jobs.claim(
            conn,
            events,
            capacity=capacity,
            total=total,
            now=now,
            node=node,
            running_by_user=running_by_user,
            max_running_per_user=config.limits.max_running_per_user,
            # A kind's max_concurrent holds for all the daemons on the database.
            kind_limits={
                name: kind.max_concurrent
                for name, kind in config.kinds.items()
                if kind.max_concurrent is not None
            },
        )
    return Claimed(paused, open_services, capacity, claimed)


def pause(state: Any, kind: str | None) -> Any:
    """The stored pause state with `kind` (None: every kind) paused."""
    paused = msgspec.convert(state, PauseState)
    if kind is None:
        paused = PauseState(kinds=paused.kinds, all=True)
    elif kind not in paused.kinds:
        paused = PauseState(kinds=[*paused.kinds, kind], all=paused.all)
    return msgspec.to_builtins(paused)


def resume(state: Any, kind: str | None) -> Any:
    """The stored pause state with `kind` (None: every kind, and all) resumed."""
    paused = msgspec.convert(state, PauseState)
    if kind is None:
        return msgspec.to_builtins(PauseState())
    return msgspec.to_builtins(
        PauseState(kinds=[k for k in paused.kinds if k != kind], all=paused.all)
    )


class Scheduler:
    def __init__(
        self,
        *,
        config: Config,
        store: Engine,
        clock: WallClock,
        inbox: trio.MemoryReceiveChannel[SchedulerMessage],
        pool: trio.MemorySendChannel[RunJobs],
        load: SystemLoad,
        node: int,
    ) -> None:
        self._config = config
        # This daemon's node: the claims mark the jobs as running here.
        self._node = node
        self._store = store
        self._clock = clock
        self._inbox = inbox
        self._pool = pool
        self._running: dict[str, int] = {}
        self._running_by_user: dict[str, int] = {}
        self._paused = PauseState()
        self._dispatching = True
        # Services whose circuit is open, and until when; kinds needing them wait.
        self._open_services: dict[str, float] = {}
        self._budget = BudgetState(stopped=False)
        # True when something changed that may let a job start; the next round claims.
        self._dirty = True
        self._next_available_at: float | None = None
        self._load = load
        # Load holds jobs back: the next sample may let them start. Otherwise a new sample can
        # only hold more back, and needs no dispatch round.
        self._held_by_load = False
        self._positions_stale = trio.Event()
        self._last_positions: dict[int, WaitingInfo] = {}
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        stored = await self._store.read(partial(jobs.get_setting, key=PAUSED_SETTING, default=None))
        if stored is not None:
            self._paused = msgspec.convert(stored, PauseState)
        async with self._inbox, self._pool, trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._report_positions)
            task_status.started()
            while True:
                if self._dirty:
                    await self._dispatch()
                    self._positions_stale.set()
                # Only the wait is bounded by the wake deadline: a message being handled (a
                # pause being saved) must not be cut off, or its asker is never answered.
                wake_at = self._wake_deadline()
                with trio.move_on_at(wake_at) as waiting:
                    try:
                        msg = await self._inbox.receive()
                    except trio.EndOfChannel:
                        nursery.cancel_scope.cancel()
                        return
                if waiting.cancelled_caught:
                    self._dirty = True
                    continue
                await self._handle(msg)
                # Fold everything already waiting into one dispatch round.
                while True:
                    try:
                        msg = self._inbox.receive_nowait()
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                    await self._handle(msg)
                if trio.current_time() >= wake_at:
                    # The moment came while messages were handled: it counts as a wake-up.
                    self._dirty = True

    def _wake_deadline(self) -> float:
        """When time alone may let a job start: a backoff ending, a circuit's recovery.

        Only future moments count: a past one was already acted on, and waking for it again
        would spin. While dispatch is stopped (drain, budget) nothing but a message helps.
        """
        if not self._dispatching or self._budget.stopped or self._store.health.fault:
            return math.inf
        now = self._clock.now()
        wakes = [*self._open_services.values(), self._next_available_at]
        future = [t for t in wakes if t is not None and t > now]
        return self._clock.deadline_for(min(future, default=math.inf))

    async def _handle(self, msg: SchedulerMessage) -> None:
        match msg:
            case JobQueued() | QueueChanged():
                self._dirty = True
            case JobsEnded(slots=slots):
                for kind, user in slots:
                    self._running[kind] = self._running.get(kind, 1) - 1
                    left = self._running_by_user.get(user, 1) - 1
                    if left > 0:
                        self._running_by_user[user] = left
                    else:
                        self._running_by_user.pop(user, None)
                self._dirty = True
            case Pause(kind=kind, reply=reply):
                if await self._change_pause(partial(pause, kind=kind), reply):
                    self._positions_stale.set()
                    reply.set(self._pause_view())
            case Resume(kind=kind, reply=reply):
                if await self._change_pause(partial(resume, kind=kind), reply):
                    self._dirty = True
                    reply.set(self._pause_view())
            case StopDispatch():
                self._dispatching = False
                self._positions_stale.set()
            case SchedulerSnapshot(reply=reply):
                reply.set(self.statistics())
            case Explain(jobs=queued, reply=reply):
                # Answered from a task of its own: it reads the store, and dispatch must not
                # wait for a client's question.
                self._nursery.start_soon(self._explain, queued, self._wait_state(), reply)
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
            case SystemLoad():
                self._load = msg
                self._dirty = self._dirty or self._held_by_load
            case StoreState():
                # Dispatch held while the store took no writes; it may take them again.
                self._dirty = True
                self._positions_stale.set()

    async def _change_pause(self, change: Any, reply: ReplySlot[Any]) -> bool:
        """Change the stored pause state, which every daemon on the database reads when it
        claims; a store that takes no writes refuses the change, so what the operator is told
        holds after a restart too."""
        try:
            stored = await self._store.write(
                partial(
                    jobs.update_setting,
                    key=PAUSED_SETTING,
                    change=change,
                    default=msgspec.to_builtins(PauseState()),
                )
            )
        except StoreError as exc:
            reply.fail(exc.refusal())
            return False
        self._paused = msgspec.convert(stored, PauseState)
        return True

    def _pause_view(self) -> dict[str, Any]:
        return {"paused": list(self._paused.kinds), "all": self._paused.all}

    def statistics(self) -> dict[str, Any]:
        load = self._load
        return {
            "running": sum(self._running.values()),
            "running_by_kind": {k: n for k, n in self._running.items() if n},
            "running_by_user": dict(self._running_by_user),
            "max_concurrent_jobs": self._config.daemon.max_concurrent_jobs,
            "paused": list(self._paused.kinds),
            "paused_all": self._paused.all,
            "dispatching": self._dispatching,
            "next_available_at": self._next_available_at,
            "open_services": dict(self._open_services),
            "budget_stopped": self._budget.stopped,
            "load": msgspec.to_builtins(load),
            "held_by_load": load_too_high(self._config, load),
            "short_of_memory": [
                name for name, kind in self._config.kinds.items() if short_of_memory(kind, load)
            ],
        }

    def _wait_state(self) -> WaitState:
        return WaitState(
            now=self._clock.now(),
            dispatching=self._dispatching,
            paused=self._paused,
            budget=self._budget,
            open_services=dict(self._open_services),
            load=self._load,
            running=dict(self._running),
            running_by_user=dict(self._running_by_user),
            store_fault=self._store.health.fault,
        )

    async def _dispatch(self) -> None:
        self._dirty = False
        self._held_by_load = False
        # A store that takes no writes could not record a claim: nothing starts until it
        # does again (a StoreState says so).
        if not self._dispatching or self._budget.stopped or self._store.health.fault:
            return
        if sum(self._running.values()) >= self._config.daemon.max_concurrent_jobs:
            # No slot, whatever is paused: nothing can start until one frees, which messages us.
            self._next_available_at = None
            return
        now = self._clock.now()
        try:
            # Copies: the write may run on the store's thread while this one moves on.
            result = await self._store.write(
                partial(
                    claim_where_allowed,
                    config=self._config,
                    running=dict(self._running),
                    running_by_user=dict(self._running_by_user),
                    load=self._load,
                    now=now,
                    node=self._node,
                )
            )
        except StoreError:
            # This claim found the fault (the engine logged it): held until a StoreState.
            return
        self._paused, self._open_services = result.paused, result.open_services
        # Slots that go unused only for memory or CPU: nothing but the next sample frees them.
        unloaded = free_capacity(
            self._config, self._running, self._paused, set(self._open_services)
        )[1]
        self._held_by_load = unloaded != result.capacity
        claimed = result.claimed
        if claimed is None:
            # Nothing can start until a slot frees or a kind resumes; both message us.
            self._next_available_at = None
            return
        self._next_available_at = claimed.next_available_at
        for job in claimed.jobs:
            self._running[job.kind] = self._running.get(job.kind, 0) + 1
            self._running_by_user[job.user] = self._running_by_user.get(job.user, 0) + 1
        if claimed.jobs:
            await self._pool.send(RunJobs(jobs=claimed.jobs))

    def _zone(self) -> ZoneInfo:
        return ZoneInfo(self._config.limits.day_zone(self._config.budget))

    async def _explain(
        self, queued: list[JobView], state: WaitState, reply: ReplySlot[dict[int, WaitingInfo]]
    ) -> None:
        try:
            positions = await self._store.read(
                partial(jobs.queue_positions, job_ids=[job.id for job in queued])
            )
            placed = [(job, positions[job.id]) for job in queued if job.id in positions]
            reply.set(await self._waiting_infos(placed, state))
        except Exception as exc:
            reply.fail(exc)

    async def _waiting_infos(
        self, placed: list[tuple[JobView, tuple[int, int, int, int]]], state: WaitState
    ) -> dict[int, WaitingInfo]:
        names = sorted({job.user for job, _ in placed})
        limits = await self._store.read(partial(users.running_limits, names=names))
        on_hold = await self._store.read(partial(users.on_hold, names=names))
        waiting_for = await self._store.read(
            partial(jobs.unended_dependencies, job_ids=[job.id for job, _ in placed])
        )
        zone = self._zone()
        return {
            job.id: WaitingInfo(
                *place,
                reason=explain(
                    self._config,
                    state,
                    job,
                    user_limit=limits.get(job.user),
                    position=place,
                    zone=zone,
                    user_held=job.user in on_hold,
                    waiting_for=waiting_for.get(job.id),
                ),
            )
            for job, place in placed
        }

    async def _report_positions(self) -> None:
        """Position events for the head of the queue, coalesced to one tick at most every
        `position_every`, and only for the jobs whose position or reason changed."""
        while True:
            if math.isinf(self._config.limits.position_every):
                await trio.sleep_forever()
            await self._positions_stale.wait()
            self._positions_stale = trio.Event()
            state = self._wait_state()
            head = await self._store.read(
                partial(jobs.queue_head, limit=self._config.limits.position_head)
            )
            current = await self._waiting_infos(head, state)
            # A job held back by nothing but its turn starts in the round under way: an event
            # for it would be stale on arrival, and under a fast flow there are many.
            changed = [
                (job, msgspec.to_builtins(current[job.id]))
                for job, _ in head
                if self._last_positions.get(job.id) != current[job.id]
                and not current[job.id].reason.startswith(TURN_REASON)
            ]
            if changed:
                try:
                    await self._store.write(
                        partial(jobs.add_position_events, changed=changed, now=state.now)
                    )
                except StoreError:
                    # Told when the store takes writes again (a StoreState marks them stale).
                    await trio.sleep(self._config.limits.position_every)
                    continue
            self._last_positions = current
            await trio.sleep(self._config.limits.position_every)
