"""This daemon as one node of those sharing the database: its lease, and the maintenance role.

Produces `NodeLost` for the pool, `Leadership` and `RaiseAlert` for the monitor, `JobQueued` for
the scheduler (jobs recovered from a dead node wait to run).

`relay` turns what other daemons commit (the event log's tail, store/tail.py) into wake-ups
for this daemon's actors: a job queued or leaving `running` elsewhere may let the scheduler
start one (a new job, or a slot of a kind limited across daemons); a `cancel` event asks the
pool to stop a job it runs; a job that left `running` elsewhere answers the cancels waiting
for it here.

The keeper renews the node's lease every third of `cluster.lease`, on trio's clock, and tries
to take or keep the maintenance role (a lease row, store.nodes.take_role). While it holds the
role it recovers the running jobs of every node whose lease has run out, so a node that dies
has its jobs back in the queue within a lease and a third. A node that finds its own row gone
was taken for dead while it could not renew (a pause longer than the lease, a database out of
reach): its jobs are another's now, the pool abandons them, and the node rejoins under its
own id.

On a store only one daemon opens (SQLite) the keeper is that daemon's, holds the role from
its first round and finds no other node; the same code runs.
"""

from __future__ import annotations

import os
import socket
from functools import partial
from typing import Any

import structlog
import trio

from jobwarden.actors.messages import (
    JobQueued,
    Leadership,
    NodeLost,
    RaiseAlert,
    RemoteCancel,
    RemoteEnd,
)
from jobwarden.clock import WallClock
from jobwarden.config import Config
from jobwarden.errors import StoreError
from jobwarden.store import Engine, nodes
from jobwarden.wire.views import Event

log = structlog.get_logger("cluster")


def relay(
    events: list[Event],
    *,
    scheduler: trio.MemorySendChannel[Any],
    pool: trio.MemorySendChannel[Any],
) -> None:
    """Other daemons' events as wake-ups for this one's actors (their inboxes are unbounded:
    this never blocks). A repeat is harmless: each is a reason to look again."""
    try:
        for event in events:
            if event.type == "cancel":
                pool.send_nowait(RemoteCancel(job_id=event.job))
            elif event.type == "status" and event.data.get("status") != "running":
                scheduler.send_nowait(JobQueued(kind=event.kind))
                pool.send_nowait(RemoteEnd(job_id=event.job))
    except trio.BrokenResourceError:
        # The actors have stopped (the daemon is stopping): there is nobody left to wake.
        return


class NodeKeeper:
    def __init__(
        self,
        *,
        config: Config,
        store: Engine,
        clock: WallClock,
        node: int,
        registered: bool,
        pool: trio.MemorySendChannel[Any],
        monitor: trio.MemorySendChannel[Any],
        scheduler: trio.MemorySendChannel[Any],
    ) -> None:
        self._config = config
        self._store = store
        self._clock = clock
        self.node = node
        # False when the daemon started while the store took no writes: the row is written
        # in the first round that can.
        self._registered = registered
        self._started_at = clock.now()
        self._pool = pool
        self._monitor = monitor
        self._scheduler = scheduler
        self.leader = False

    @staticmethod
    async def register(store: Engine, clock: WallClock, config: Config) -> tuple[int, bool]:
        """This daemon's node id, and whether its row is written. A store that takes no
        writes gets an id no node has; the keeper writes the row once it can."""
        try:
            node = await store.write(
                partial(
                    nodes.register,
                    host=socket.gethostname(),
                    pid=os.getpid(),
                    now=clock.now(),
                    lease=config.cluster.lease,
                )
            )
        except StoreError:
            return await store.read(nodes.next_id), False
        return node, True

    def reconfigure(self, config: Config) -> None:
        self._config = config

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with self._pool, self._monitor, self._scheduler:
            task_status.started()
            while True:
                try:
                    await self._round()
                except StoreError as exc:
                    # The store's health says so already; the lease is renewed next round.
                    log.warning("node lease not renewed", node=self.node, error=str(exc))
                await trio.sleep(self._config.cluster.lease / 3)

    async def _round(self) -> None:
        lease = self._config.cluster.lease
        if not await self._store.write(
            partial(nodes.renew, node=self.node, now=self._clock.now(), lease=lease)
        ):
            await self._rejoin(lease)
        leader = await self._store.write(
            partial(
                nodes.take_role,
                role=nodes.MAINTENANCE,
                node=self.node,
                now=self._clock.now(),
                lease=lease,
            )
        )
        if leader != self.leader:
            self.leader = leader
            log.info(
                "maintenance role taken" if leader else "maintenance role lost", node=self.node
            )
            await self._monitor.send(Leadership(leader=leader))
        if leader:
            await self._recover_dead_nodes()

    async def _rejoin(self, lease: float) -> None:
        if self._registered:
            log.error(
                "this node was taken for dead: its lease ran out before it was renewed; its "
                "running jobs belong to other daemons now",
                node=self.node,
                lease=lease,
            )
            await self._pool.send(NodeLost())
        await self._store.write(
            partial(
                nodes.rejoin,
                node=self.node,
                host=socket.gethostname(),
                pid=os.getpid(),
                started_at=self._started_at,
                now=self._clock.now(),
                lease=lease,
            )
        )
        self._registered = True

    async def _recover_dead_nodes(self) -> None:
        recovered = await self._store.write(
            partial(
                nodes.recover_expired,
                now=self._clock.now(),
                crash_loop_after=self._config.daemon.crash_loop_after,
            )
        )
        if not recovered.nodes:
            return
        message = (
            f"nodes {', '.join(map(str, recovered.nodes))} stopped renewing their lease: "
            f"{recovered.recovered} running jobs requeued, {recovered.crash_loop} failed CRASH_LOOP"
        )
        log.warning(
            "dead nodes recovered",
            nodes=recovered.nodes,
            recovered=recovered.recovered,
            crash_loop=recovered.crash_loop,
        )
        await self._monitor.send(RaiseAlert(name="node_lost", message=message))
        for kind in recovered.kinds:
            await self._scheduler.send(JobQueued(kind=kind))

    async def leave(self) -> None:
        """A clean stop: the row and the role go now, not when the lease runs out."""
        try:
            await self._store.write(partial(nodes.leave, node=self.node))
        except StoreError as exc:
            log.warning("node row left behind: it expires with its lease", error=str(exc))
