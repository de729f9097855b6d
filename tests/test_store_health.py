"""The store's health: a database that takes no writes is a fault the engine reports, keeps
what must not be lost through, and ends by itself once a write of its own commits again.

The faults are SQLite's own, made on the writer's connection: `max_page_count` at the current
size is a full disk (SQLITE_FULL), `query_only` a read-only file (SQLITE_READONLY, which a
fresh connection no longer has, as after `chattr -i`).
"""

from __future__ import annotations

from functools import partial

import pytest
import trio
import trio.testing

from jobwarden.actors.messages import Explain, HealthQuery
from jobwarden.errors import RequestError, StoreError
from jobwarden.hub import EventHub
from jobwarden.mailbox import ask
from jobwarden.store import Store, jobs
from jobwarden.store.engine import PROBE_FIRST

PADDING = "x" * 4000


def new_job(n: int) -> jobs.NewJob:
    return jobs.NewJob(
        kind="k",
        user="alice",
        payload_json=f'{{"n": {n}, "pad": "{PADDING}"}}',
        priority=0,
        idempotency_key=None,
        max_attempts=4,
    )


def insert(n: int):
    return partial(jobs.insert_many, batch=[new_job(n)], now=100.0)


def fill_disk(store: Store) -> None:
    """No page may be added to the database any more, as on a full disk."""
    writer = store._writer
    pages = writer.execute("PRAGMA page_count").fetchone()[0]
    writer.execute(f"PRAGMA max_page_count = {pages}")


def free_disk(store: Store) -> None:
    store._writer.execute("PRAGMA max_page_count = 1073741823")


async def insert_until_full(store: Store) -> tuple[int, StoreError]:
    """Insert jobs until the store refuses one; how many it took, and the refusal."""
    for n in range(1000):
        try:
            await store.write(insert(n))
        except StoreError as exc:
            return n, exc
    raise AssertionError("the store never filled up")


async def sleep_past_probe(seconds: float) -> None:
    """Sleep until the probe due in `seconds` has run."""
    await trio.sleep(seconds)
    await trio.testing.wait_all_tasks_blocked()


async def count_jobs(store: Store) -> int:
    return sum((await store.read(jobs.counts_by_status)).values())


@pytest.fixture
async def store(tmp_path):
    async with Store.open(tmp_path / "jw.db", hub=EventHub(), threaded=False) as store:
        yield store


async def test_a_full_disk_is_a_store_fault_until_a_write_commits_again(
    store, nursery, autojump_clock
):
    await nursery.start(store.probe_while_faulted)
    fill_disk(store)

    accepted, refusal = await insert_until_full(store)

    assert (refusal.code, refusal.full, refusal.retry_after) == ("STORAGE_FULL", True, 1.0)
    assert "database or disk is full" in str(refusal)
    fault = store.health.fault
    assert fault is not None and fault.code == "STORAGE_FULL"
    assert store.health.view()["writable"] is False
    # Reads go on.
    assert await count_jobs(store) == accepted

    # Still full at the first probe: it waits twice as long for the next.
    await sleep_past_probe(PROBE_FIRST)
    assert store.health.fault == fault
    assert store.health.retry_after() == 2 * PROBE_FIRST
    free_disk(store)
    await sleep_past_probe(2 * PROBE_FIRST)

    assert store.health.fault is None
    await store.write(insert(accepted))
    assert await count_jobs(store) == accepted + 1


async def test_kept_writes_land_first_and_in_order_once_the_store_takes_writes(
    store, nursery, autojump_clock
):
    await nursery.start(store.probe_while_faulted)
    fill_disk(store)
    accepted, _ = await insert_until_full(store)
    first = store.hand_over(insert(1001), keep=True)
    # Kept under one key, only the latest of these is written: the earlier commits nothing.
    stale = store.hand_over(
        partial(jobs.set_setting, key="breaker", value="open"), keep=True, key="breaker"
    )
    store.hand_over(
        partial(jobs.set_setting, key="breaker", value="closed"), keep=True, key="breaker"
    )
    second = store.hand_over(insert(1002), keep=True)
    with pytest.raises(StoreError):
        await store.write(insert(1003))
    assert not first.done.is_set()

    free_disk(store)
    (admitted_first,) = await first.committed()
    (admitted_second,) = await second.committed()

    assert await stale.committed() is None
    assert admitted_first.job.id < admitted_second.job.id
    assert await count_jobs(store) == accepted + 2
    assert await store.read(partial(jobs.get_setting, key="breaker")) == "closed"
    assert store.health.fault is None


async def test_a_read_only_database_is_reopened_once_it_takes_writes_again(
    store, nursery, autojump_clock
):
    await nursery.start(store.probe_while_faulted)
    store._writer.execute("PRAGMA query_only = 1")

    with pytest.raises(StoreError) as refused:
        await store.write(insert(1))

    assert (refused.value.code, refused.value.full) == ("STORAGE_ERROR", False)
    assert "readonly" in str(refused.value)
    # The probe's fresh connection takes writes: the read-only one is gone.
    await sleep_past_probe(PROBE_FIRST)
    assert store.health.fault is None
    await store.write(insert(2))
    assert await count_jobs(store) == 1


async def test_a_write_that_fails_on_its_own_is_no_store_fault(store, autojump_clock):
    def broken(conn, events):
        conn.execute("INSERT INTO no_such_table VALUES (1)")

    with pytest.raises(Exception, match="no such table"):
        await store.write(broken)

    assert store.health.fault is None


# -- the daemon around a store that takes no writes ------------------------------------------

STEPPER = """
[kinds.stepper]
handler = "tests.handlers:stepper"

[kinds.sleepy]
handler = "tests.handlers:sleepy"
"""


async def submit_until_refused(daemon) -> RequestError:
    for n in range(1000):
        try:
            await daemon.submit("sleepy", {"seconds": 0, "n": n, "pad": PADDING})
        except RequestError as exc:
            return exc
    raise AssertionError("the store never filled up")


async def test_a_full_store_refuses_jobs_and_holds_dispatch_until_it_takes_writes_again(
    autojump_clock, start_daemon
):
    daemon = await start_daemon(STEPPER, max_concurrent_jobs=1)
    store = daemon.handle.store
    running = await daemon.submit("stepper", {"steps": 6, "step_seconds": 1.0})
    await daemon.wait_status(running.id, {"running"})
    waiting = await daemon.submit("sleepy", {"seconds": 0})
    fill_disk(store)

    refusal = (await submit_until_refused(daemon)).body

    assert (refusal.code, refusal.retryable, refusal.retry_after) == ("STORAGE_FULL", True, 1.0)
    # The running job goes on and ends meanwhile, checkpointing: what of it the store could
    # not write is kept. Nothing else starts.
    await trio.sleep(10)
    health = await ask(daemon.handle.monitor, HealthQuery)
    assert health["store"]["writable"] is False
    assert health["store"]["code"] == "STORAGE_FULL"
    queued = await daemon.job(waiting.id)
    assert queued.status == "queued"
    reasons = await ask(daemon.handle.scheduler, Explain, jobs=[queued])
    assert reasons[waiting.id].reason.startswith("the store takes no writes (STORAGE_FULL)")

    free_disk(store)

    finished = await daemon.wait_done(running.id)
    assert (finished.status, finished.result) == ("done", {"steps": 6, "resumed_from": 0})
    assert finished.checkpoint == {"done": 6}
    assert (await daemon.wait_done(waiting.id)).status == "done"
    again = await daemon.submit("sleepy", {"seconds": 0})
    assert (await daemon.wait_done(again.id)).status == "done"
    health = await ask(daemon.handle.monitor, HealthQuery)
    assert health["store"] == {"writable": True}


CALLER = """
[services.paid]
price_usd = 1.0

[kinds.caller]
handler = "tests.handlers:call_service"
"""


async def ledger_rows(store: Store) -> tuple[int, float]:
    return await store.read(
        lambda conn: conn.execute("SELECT COUNT(*), COALESCE(SUM(usd), 0) FROM ledger").fetchone()
    )


async def test_what_a_job_did_while_the_store_took_no_writes_is_written_when_it_does(
    autojump_clock, start_daemon
):
    daemon = await start_daemon(CALLER)
    store = daemon.handle.store
    job = await daemon.submit("caller", {"service": "paid", "seconds": 0.5})
    await daemon.wait_status(job.id, {"running"})
    # The database file refuses writes (read-only) until the probe's fresh connection.
    store._writer.execute("PRAGMA query_only = 1")

    # The call is made and paid for, and the job ends: none of it can be written yet.
    await trio.sleep(0.6)
    assert store.health.fault is not None and store.health.fault.code == "STORAGE_ERROR"
    assert (await daemon.job(job.id)).status == "running"
    assert await ledger_rows(store) == (0, 0.0)

    finished = await daemon.wait_done(job.id)

    assert (finished.status, finished.attempt, finished.result) == ("done", 1, {"answer": "ok"})
    assert await ledger_rows(store) == (1, 1.0)
    assert store.health.fault is None
