"""Nodes, leases, fencing and the maintenance role, as the store keeps them (any backend).

Times are wall seconds passed in, as the daemon passes its clock's."""

from __future__ import annotations

import collections
import threading
from functools import partial

import pytest
import trio

from jobwarden.hub import EventHub
from jobwarden.store import Store, jobs, nodes, webhooks
from jobwarden.wire.views import ErrorBody, Event
from tests import postgres

pytestmark = pytest.mark.both_stores

LEASE = 30.0
ERROR = ErrorBody(code="X", message="x", retryable=True)


@pytest.fixture
async def store(tmp_path):
    async with Store.open(postgres.current_url or tmp_path / "jw.db", hub=EventHub()) as store:
        yield store


async def register(store: Store, now: float = 0.0) -> int:
    return await store.write(partial(nodes.register, host="h", pid=1, now=now, lease=LEASE))


async def queue_and_claim(
    store: Store, node: int, *, now: float = 1.0, kind: str = "k", payload: str = "{}"
) -> jobs.JobView:
    """A job submitted and claimed by `node`, as that node's daemon would."""
    new = jobs.NewJob(
        kind=kind,
        user="alice",
        payload_json=payload,
        priority=0,
        idempotency_key=None,
        max_attempts=4,
    )
    await store.write(partial(jobs.insert_many, batch=[new], now=now))
    claimed = await store.write(
        partial(jobs.claim, capacity={kind: 1}, total=1, node=node, now=now)
    )
    (job,) = claimed.jobs
    return job


def fenced_writes(job_id: int, fence: jobs.Fence) -> dict[str, object]:
    """Every write an attempt makes, under `fence`."""
    at = {"job_id": job_id, "fence": fence, "now": 500.0}
    return {
        "progress": partial(jobs.report_progress, **at, fraction=0.5, message="half"),
        "heartbeat": partial(jobs.heartbeat, **at),
        "checkpoint": partial(jobs.save_checkpoint, **at, checkpoint={"step": 5}),
        "process_group": partial(
            jobs.record_process_group, job_id=job_id, fence=fence, pgid=7, identity="b:1"
        ),
        "finish": partial(jobs.finish, **at, result=1),
        "fail": partial(jobs.fail, **at, error=ERROR),
        "retry": partial(jobs.retry_later, **at, error=ERROR, available_at=600.0),
        "cancel": partial(jobs.cancel, **at, expect=("running",)),
        "requeue": partial(jobs.requeue_unspent, **at, reason="INTERRUPTED"),
    }


@pytest.mark.parametrize("write", list(fenced_writes(0, jobs.Fence(0, 0))))
@pytest.mark.parametrize("stale", ["attempt", "node"])
async def test_a_write_whose_fence_no_longer_holds_changes_nothing(store, write, stale):
    node = await register(store)
    job = await queue_and_claim(store, node)
    before = await store.read(partial(jobs.job_with_events, job_id=job.id, limit=100))
    wrong = (
        jobs.Fence(job.attempt - 1, node)
        if stale == "attempt"
        else jobs.Fence(job.attempt, node + 1)
    )
    result = await store.write(fenced_writes(job.id, wrong)[write])
    assert result in (None, False)
    after = await store.read(partial(jobs.job_with_events, job_id=job.id, limit=100))
    assert after == before


@pytest.mark.parametrize("write", list(fenced_writes(0, jobs.Fence(0, 0))))
async def test_the_attempt_holding_the_fence_writes(store, write):
    node = await register(store)
    job = await queue_and_claim(store, node)
    result = await store.write(fenced_writes(job.id, jobs.Fence(job.attempt, node))[write])
    assert result not in (None, False)


async def test_a_job_recovered_from_a_dead_node_cannot_be_finished_by_it(store):
    dead = await register(store, now=0.0)
    job = await queue_and_claim(store, dead, now=1.0)
    alive = await register(store, now=1.0)
    # Only `alive` renews: `dead`'s lease runs out at 30.
    assert await store.write(partial(nodes.renew, node=alive, now=31.0, lease=LEASE))
    recovered = await store.write(partial(nodes.recover_expired, now=31.0, crash_loop_after=3))
    assert recovered == nodes.Recovered([dead], 1, 0, ["k"])
    again = await store.write(partial(jobs.claim, capacity={"k": 1}, total=1, node=alive, now=32.0))
    assert [(j.id, j.attempt) for j in again.jobs] == [(job.id, 2)]
    # The dead node wakes up and finishes its attempt: nothing changes.
    late = partial(jobs.finish, job_id=job.id, fence=jobs.Fence(1, dead), result="late", now=33.0)
    assert await store.write(late) is None
    # Its lease is gone too: it learns it was taken for dead.
    assert not await store.write(partial(nodes.renew, node=dead, now=33.0, lease=LEASE))
    done = await store.write(
        partial(jobs.finish, job_id=job.id, fence=jobs.Fence(2, alive), result="ok", now=34.0)
    )
    assert (done.status, done.result) == ("done", "ok")
    _, events = await store.read(partial(jobs.job_with_events, job_id=job.id, limit=100))
    statuses = [(e.data["status"], e.data.get("reason")) for e in events if e.type == "status"]
    assert statuses == [
        ("queued", None),
        ("running", None),
        ("queued", "RECOVERED"),
        ("running", None),
        ("done", None),
    ]


async def test_a_live_node_keeps_its_jobs(store):
    node = await register(store, now=0.0)
    await queue_and_claim(store, node, now=1.0)
    assert await store.write(partial(nodes.renew, node=node, now=25.0, lease=LEASE))
    recovered = await store.write(partial(nodes.recover_expired, now=50.0, crash_loop_after=3))
    assert recovered.nodes == []
    assert (await store.read(jobs.counts_by_status)) == {"running": 1}


async def test_jobs_of_a_node_that_left_are_recovered(store):
    """A clean stop deletes the node's row; a job its drain could not requeue is recovered."""
    node = await register(store, now=0.0)
    await queue_and_claim(store, node, now=1.0)
    await store.write(partial(nodes.leave, node=node))
    recovered = await store.write(partial(nodes.recover_expired, now=2.0, crash_loop_after=3))
    assert (recovered.nodes, recovered.recovered) == ([node], 1)


async def test_one_node_holds_the_maintenance_role_until_its_lease_runs_out(store):
    a, b = await register(store), await register(store)
    take = partial(nodes.take_role, role=nodes.MAINTENANCE, lease=LEASE)
    assert await store.write(partial(take, node=a, now=0.0))
    assert not await store.write(partial(take, node=b, now=1.0))
    # The holder renews it.
    assert await store.write(partial(take, node=a, now=20.0))
    assert not await store.write(partial(take, node=b, now=49.0))
    # `a` stops renewing: at 50 its lease has run out, and `b` takes the role.
    assert await store.write(partial(take, node=b, now=50.5))
    assert not await store.write(partial(take, node=a, now=51.0))
    live = await store.read(partial(nodes.live_nodes, now=25.0))
    assert [(n.id, n.leader) for n in live] == [(a, False), (b, True)]


async def test_a_node_taken_for_dead_rejoins_under_its_own_id(store):
    node = await register(store, now=0.0)
    await store.write(partial(nodes.recover_expired, now=31.0, crash_loop_after=3))
    assert not await store.write(partial(nodes.renew, node=node, now=32.0, lease=LEASE))
    await store.write(
        partial(nodes.rejoin, node=node, host="h", pid=1, started_at=0.0, now=32.0, lease=LEASE)
    )
    assert await store.write(partial(nodes.renew, node=node, now=33.0, lease=LEASE))
    assert [n.id for n in await store.read(partial(nodes.live_nodes, now=33.0))] == [node]


async def insert_jobs(store: Store, count: int, *, now: float = 1.0) -> None:
    batch = [
        jobs.NewJob(
            kind="k",
            user=f"user{n % 7}",
            payload_json="{}",
            priority=0,
            idempotency_key=None,
            max_attempts=4,
        )
        for n in range(count)
    ]
    await store.write(partial(jobs.insert_many, batch=batch, now=now))


async def test_daemons_claiming_at_once_never_take_one_job_twice(store, tmp_path):
    """Two stores (two daemons' engines, each with its own writer thread) drain one queue
    with claims running at the same time."""
    await insert_jobs(store, 300)
    target = postgres.current_url or str(tmp_path / "jw.db")
    claimed: dict[int, list[int]] = {1: [], 2: []}

    async def drain(engine: Store, node: int) -> None:
        while True:
            result = await engine.write(
                partial(jobs.claim, capacity={"k": 7}, total=7, node=node, now=5.0)
            )
            if not result.jobs:
                return
            claimed[node] += [job.id for job in result.jobs]

    async with (
        Store.open(target, hub=EventHub()) as first,
        Store.open(target, hub=EventHub()) as second,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(drain, first, 1)
        nursery.start_soon(drain, second, 2)
    every = claimed[1] + claimed[2]
    assert sorted(every) == list(range(1, 301))
    assert claimed[1] and claimed[2]
    running = await store.read(
        partial(jobs.list_jobs, statuses=["running"], kind=None, user=None, limit=1000)
    )
    assert len(running) == 300


async def test_a_kinds_limit_holds_across_daemons(store, tmp_path):
    await insert_jobs(store, 50)
    target = postgres.current_url or str(tmp_path / "jw.db")

    async def claim_all(engine: Store, node: int) -> int:
        result = await engine.write(
            partial(
                jobs.claim, capacity={"k": 10}, total=10, node=node, now=5.0, kind_limits={"k": 4}
            )
        )
        return len(result.jobs)

    counts = []
    async with (
        Store.open(target, hub=EventHub()) as first,
        Store.open(target, hub=EventHub()) as second,
        trio.open_nursery() as nursery,
    ):
        for engine, node in ((first, 1), (second, 2), (first, 1), (second, 2)):
            nursery.start_soon(lambda e=engine, n=node: _record(counts, claim_all(e, n)))
    assert sum(counts) == 4
    assert (await store.read(jobs.counts_by_status))["running"] == 4


async def _record(into: list[int], coroutine) -> None:
    into.append(await coroutine)


async def test_a_reader_resuming_by_seq_misses_no_event_written_by_daemons_at_once(store, tmp_path):
    """Two daemons' engines write events at the same time while a reader follows the log by
    `since`, as a watcher does: it must see every event, though seq values are handed out
    before the commits that make them visible."""
    target = postgres.current_url or str(tmp_path / "jw.db")
    await insert_jobs(store, 1)
    seen: list[int] = []
    writing = 2

    async def write_progress(engine: Store) -> None:
        nonlocal writing
        for n in range(400):
            await engine.write(partial(_progress_event, fraction=n / 400))
        writing -= 1

    async def follow() -> None:
        while True:
            done = writing == 0
            page = await store.read(partial(jobs.events_since, since=seen[-1] if seen else 0))
            seen.extend(event.seq for event in page)
            if done and not page:
                return
            await trio.sleep(0)

    async with (
        Store.open(target, hub=EventHub()) as first,
        Store.open(target, hub=EventHub()) as second,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(write_progress, first)
        nursery.start_soon(write_progress, second)
        nursery.start_soon(follow)
    every = [
        event.seq for event in await store.read(partial(jobs.events_since, since=0, limit=10_000))
    ]
    assert len(every) == 801
    assert seen == every


def _progress_event(conn, events, *, fraction: float, into: list[Event] | None = None) -> None:
    """An event row of its own, as any write of a job adds one; `into` gets it too (its seq
    is set once it is committed)."""
    event = Event(
        seq=0, job=1, user="user0", kind="k", type="progress", at=1.0, data={"f": fraction}
    )
    events.append(event)
    if into is not None:
        into.append(event)


async def test_each_daemons_hub_carries_every_daemons_events_in_seq_order_once(store):
    if postgres.current_url is None:
        pytest.skip("one daemon per SQLite file: no other daemon's events to carry")
    await insert_jobs(store, 1)
    hubs = [EventHub(), EventHub()]
    received: list[list[int]] = [[], []]
    foreign: list[list[int]] = [[], []]
    written: list[list[Event]] = [[], []]
    async with (
        Store.open(postgres.current_url, hub=hubs[0]) as first,
        Store.open(postgres.current_url, hub=hubs[1]) as second,
    ):
        for index, hub in enumerate(hubs):
            hub.foreign_listeners.append(
                lambda events, index=index: foreign[index].extend(e.seq for e in events)
            )
        with hubs[0].subscribe(buffer=10_000) as sub_a, hubs[1].subscribe(buffer=10_000) as sub_b:
            async with trio.open_nursery() as nursery:
                for engine, into in ((first, written[0]), (second, written[1])):
                    nursery.start_soon(_write_many, engine, 150, into)
            every = [
                event.seq
                for event in await store.read(partial(jobs.events_since, since=1, limit=10_000))
            ]
            assert len(every) == 300
            with trio.fail_after(10):
                for index, sub in enumerate((sub_a, sub_b)):
                    while len(received[index]) < len(every):
                        received[index].append((await sub.events.receive()).seq)
    assert received == [every, every]
    # Each heard of all the other's events (and may have taken some of its own, read back
    # before its own commit was handed on, for foreign: they only wake actors).
    for index in (0, 1):
        assert {event.seq for event in written[1 - index]} <= set(foreign[index])


async def _write_many(engine: Store, count: int, into: list[Event]) -> None:
    for n in range(count):
        await engine.write(partial(_progress_event, fraction=n / count, into=into))


async def test_a_write_that_two_daemons_deadlock_on_is_run_again_not_failed(store):
    """Two daemons' writes take two users' rows in opposite orders, each holding the first
    while it waits for the second: one is the database's victim. It runs again once the
    other's transaction has committed, and both land."""
    if postgres.current_url is None:
        pytest.skip("one daemon per SQLite file: no other daemon's locks to wait on")
    await insert_jobs(store, 2)  # creates user0 and user1
    both_hold_one = threading.Barrier(2, timeout=10)
    runs = collections.Counter()

    def cross(conn, events, *, first: str, second: str) -> None:
        runs[first] += 1
        conn.execute("UPDATE users SET spent = spent + 1 WHERE name = ?", (first,))
        if runs[first] == 1:
            both_hold_one.wait()
        conn.execute("UPDATE users SET spent = spent + 1 WHERE name = ?", (second,))

    async with (
        Store.open(postgres.current_url, hub=EventHub()) as one,
        Store.open(postgres.current_url, hub=EventHub()) as other,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(one.write, partial(cross, first="user0", second="user1"))
        nursery.start_soon(other.write, partial(cross, first="user1", second="user0"))
    spent = await store.read(
        lambda conn: dict(conn.execute("SELECT name, spent FROM users ORDER BY name").fetchall())
    )
    assert spent == {"user0": 2, "user1": 2}
    # At least one was a victim (with a lock wait bound, both can be) and ran again.
    assert max(runs.values()) > 1


async def test_daemons_taking_due_webhook_deliveries_at_once_take_each_once_and_never_wait(store):
    """One daemon's sender leases two of four due deliveries and keeps its transaction open
    until the other's sender has taken its share: the other takes the two left, at once."""
    if postgres.current_url is None:
        pytest.skip("one daemon per SQLite file: no other daemon's sender")

    def owed(conn, events) -> None:
        for job_id in range(1, 5):
            conn.execute(
                "INSERT INTO webhook_deliveries (job_id, url, status, created_at, next_at)"
                " VALUES (?, 'http://hook', 'done', 1.0, 1.0)",
                (job_id,),
            )

    await store.write(owed)
    first_holds, second_took = threading.Event(), threading.Event()
    taken: dict[str, object] = {}

    def take_and_hold(conn, events):
        taken["first"] = webhooks.take_due(conn, events, now=10.0, lease=60.0, limit=2)
        first_holds.set()
        taken["second_was_kept_waiting"] = not second_took.wait(timeout=5)

    async def take_meanwhile(engine: Store) -> None:
        await trio.to_thread.run_sync(first_holds.wait)
        taken["second"] = await engine.write(
            partial(webhooks.take_due, now=10.0, lease=60.0, limit=4)
        )
        second_took.set()

    async with (
        Store.open(postgres.current_url, hub=EventHub()) as one,
        Store.open(postgres.current_url, hub=EventHub()) as other,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(one.write, take_and_hold)
        nursery.start_soon(take_meanwhile, other)
    assert taken["second_was_kept_waiting"] is False
    first = [delivery.job_id for delivery in taken["first"]]
    second = [delivery.job_id for delivery in taken["second"]]
    assert sorted(first + second) == [1, 2, 3, 4]
