"""One daemon as a node of a cluster, on MockClock: its lease, the fence on its jobs' writes,
the maintenance role, and the recovery of a dead node's jobs.

Another daemon is played by the test, writing to the store what it would write: a node row
that stops renewing, or the claim of a job recovered from this one."""

from __future__ import annotations

from functools import partial

import pytest
import trio
from structlog.testing import capture_logs

from jobwarden.actors.messages import HealthQuery, PoolStatistics
from jobwarden.mailbox import ask
from jobwarden.store import jobs, nodes
from tests.conftest import EPOCH, Daemon
from tests.test_cluster_store import queue_and_claim

pytestmark = pytest.mark.both_stores

LEASE = 30.0
KINDS = f"""
[cluster]
lease = "{LEASE:g}s"

[kinds.sleepy]
handler = "tests.handlers:sleepy"
timeout = "1h"

[kinds.hang]
handler = "tests.handlers:hang"
timeout = "1h"
"""


async def own_node(daemon: Daemon) -> int:
    health = await ask(daemon.handle.monitor, HealthQuery, by_kind=False)
    return health["node"]


async def other_node(daemon: Daemon) -> int:
    """A second daemon's node row, registered now; it renews only when the test says so."""
    return await daemon.handle.store.write(
        partial(nodes.register, host="elsewhere", pid=4242, now=daemon.now, lease=LEASE)
    )


async def take_over(daemon: Daemon, job_id: int, node: int) -> jobs.JobView:
    """What another daemon does once this one's node is taken for dead: its maintenance
    recovers the running jobs of the node (whose row is gone), and its scheduler claims one."""
    store = daemon.handle.store
    await store.write(partial(nodes.leave, node=await own_node(daemon)))
    await store.write(partial(nodes.recover_expired, now=daemon.now, crash_loop_after=3))
    claimed = await store.write(
        partial(jobs.claim, capacity={"sleepy": 1, "hang": 1}, total=1, node=node, now=daemon.now)
    )
    (job,) = claimed.jobs
    assert job.id == job_id
    return job


def statuses(events) -> list[tuple[str, str | None, int]]:
    return [
        (e.data["status"], e.data.get("reason"), e.data["attempt"])
        for e in events
        if e.type == "status"
    ]


async def test_a_daemon_taken_for_dead_cannot_finish_a_job_taken_from_it(
    autojump_clock, start_daemon
):
    daemon = await start_daemon(KINDS)
    other = await other_node(daemon)
    job = await daemon.submit("sleepy", {"seconds": 5})
    await daemon.wait_status(job.id, {"running"})
    await trio.sleep(1)
    taken = await take_over(daemon, job.id, other)
    with capture_logs() as logs:
        # At 5 s this daemon's handler returns, before its node keeper renews (at 10 s) and
        # finds its row gone: the fence alone stops the write.
        await trio.sleep(5)
    lost = [line for line in logs if line["event"] == "lost the job"]
    assert [(line["job"], line["attempt"], line["intended"]) for line in lost] == [
        (job.id, 1, "done")
    ]
    current = await daemon.job(job.id)
    assert (current.status, current.attempt) == ("running", 2)
    finished = await daemon.handle.store.write(
        partial(
            jobs.finish,
            job_id=job.id,
            fence=jobs.Fence(taken.attempt, other),
            result="from the other daemon",
            now=daemon.now,
        )
    )
    assert finished.result == "from the other daemon"
    assert statuses(await daemon.events(job.id)) == [
        ("queued", None, 0),
        ("running", None, 1),
        ("queued", "RECOVERED", 1),
        ("running", None, 2),
        ("done", None, 2),
    ]


async def test_a_daemon_that_finds_its_node_gone_abandons_its_jobs_and_rejoins(
    autojump_clock, start_daemon
):
    daemon = await start_daemon(KINDS)
    node = await own_node(daemon)
    other = await other_node(daemon)
    job = await daemon.submit("hang", {})
    await daemon.wait_status(job.id, {"running"})
    await take_over(daemon, job.id, other)
    with capture_logs() as logs:
        await trio.sleep(LEASE / 3 + 1)
    events = [line["event"] for line in logs]
    assert any(event.startswith("this node was taken for dead") for event in events)
    assert "lost the job" in events
    assert (await ask(daemon.handle.pool, PoolStatistics))["running"] == []
    # The job is the other daemon's, untouched; this one is a live node again, same id.
    current = await daemon.job(job.id)
    assert (current.status, current.attempt) == ("running", 2)
    live = await daemon.handle.store.read(partial(nodes.live_nodes, now=daemon.now))
    assert node in [n.id for n in live]


async def test_the_jobs_of_a_node_that_stops_renewing_are_recovered_within_its_lease(
    autojump_clock, start_daemon
):
    daemon = await start_daemon(KINDS)
    dead = await other_node(daemon)
    # The other node's job: submitted and claimed there (this daemon's scheduler never heard
    # of it).
    store = daemon.handle.store
    job = await queue_and_claim(
        store, dead, now=daemon.now, kind="sleepy", payload='{"seconds": 1}'
    )
    lease_ends = daemon.now + LEASE
    done = await daemon.wait_done(job.id)
    assert (done.status, done.attempt) == ("done", 2)
    trail = [
        (e.at, e.data["status"], e.data.get("reason"))
        for e in await daemon.events(job.id)
        if e.type == "status"
    ]
    recovered_at = next(at for at, status, reason in trail if reason == "RECOVERED")
    # Recovered at the first maintenance round after the lease ran out: a third of a lease.
    assert lease_ends < recovered_at <= lease_ends + LEASE / 3
    live = await store.read(partial(nodes.live_nodes, now=daemon.now))
    assert dead not in [n.id for n in live]


async def test_status_lists_the_live_nodes_and_the_leader(autojump_clock, start_daemon):
    daemon = await start_daemon(KINDS)
    other = await other_node(daemon)
    health = await ask(daemon.handle.monitor, HealthQuery, by_kind=False)
    assert health["leader"] is True
    listed = [(n["id"], n["host"], n["leader"]) for n in health["nodes"]]
    assert listed == [(health["node"], listed[0][1], True), (other, "elsewhere", False)]
    assert health["nodes"][0]["started_at"] == EPOCH
