"""The store: group commit, crash recovery, guarded transitions, schema versions."""

from __future__ import annotations

import sqlite3
from functools import partial

import msgspec
import pytest
import trio

from jobwarden.errors import StartupError
from jobwarden.hub import EventHub
from jobwarden.store import Store, each, jobs
from jobwarden.store.backend import backend_for
from jobwarden.store.schema import MIGRATIONS
from jobwarden.wire.views import ErrorBody
from tests.conftest import opened_database

pytestmark = pytest.mark.both_stores

# The node the claims in these tests run jobs on.
NODE = 1


def new_job(n: int = 0, key: str | None = None, kind: str = "k") -> jobs.NewJob:
    return jobs.NewJob(
        kind=kind,
        user="alice",
        payload_json=f'{{"n": {n}}}',
        priority=0,
        idempotency_key=key,
        max_attempts=4,
    )


async def insert(store: Store, n: int = 0, key: str | None = None):
    return (await insert_one(store, new_job(n, key), now=100.0)).job


async def insert_one(store: Store, new: jobs.NewJob, *, now: float) -> jobs.Admitted:
    (admitted,) = await store.write(partial(jobs.insert_many, batch=[new], now=now))
    return admitted


async def test_concurrent_writes_share_commits_and_all_land(store_target):
    async with Store.open(store_target, hub=EventHub()) as store:
        async with trio.open_nursery() as nursery:
            for n in range(500):
                nursery.start_soon(insert, store, n)
        assert store.writes == 500
        # Writes that waited together committed together.
        assert store.batches < 250
    with opened_database(store_target) as conn:
        assert conn.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] == 500
        assert conn.execute("SELECT COUNT(*) FROM events").fetchone()[0] == 500


async def test_a_failing_write_does_not_spoil_its_batch(store_target):
    def broken(conn, events):
        conn.execute("INSERT INTO no_such_table VALUES (1)")

    async with Store.open(store_target, hub=EventHub()) as store:
        results = {}

        async def attempt(name, fn):
            try:
                results[name] = await store.write(fn)
            except Exception as exc:
                results[name] = exc

        async with trio.open_nursery() as nursery:
            nursery.start_soon(attempt, "good-1", partial(jobs.set_setting, key="a", value=1))
            nursery.start_soon(attempt, "bad", broken)
            nursery.start_soon(attempt, "good-2", partial(jobs.set_setting, key="b", value=2))
        assert isinstance(results["bad"], backend_for(store_target).DatabaseError)
        assert await store.read(partial(jobs.get_setting, key="a")) == 1
        assert await store.read(partial(jobs.get_setting, key="b")) == 2


async def test_events_are_published_only_after_commit_in_seq_order(store_target):
    hub = EventHub()
    async with Store.open(store_target, hub=hub) as store:
        with hub.subscribe(buffer=100) as sub:
            for n in range(5):
                await insert(store, n)
            seqs = [sub.events.receive_nowait().seq for _ in range(5)]
    assert seqs == sorted(seqs)
    assert len(set(seqs)) == 5


async def test_idempotency_key_is_per_user(store_target):
    async with Store.open(store_target, hub=EventHub()) as store:
        first = await insert(store, 1, key="x")
        again = await insert_one(store, new_job(1, "x"), now=101.0)
        assert again.existing and again.job.id == first.id


async def test_a_refused_submission_does_not_spoil_its_batch(store_target):
    hub = EventHub()
    async with Store.open(store_target, hub=hub) as store:
        with hub.subscribe(buffer=100) as sub:
            batch = [
                new_job(1),
                new_job(2, kind=None),
                new_job(3),
                new_job(4, "k1"),
                new_job(4, "k1"),
            ]
            results = await store.write(partial(jobs.insert_many, batch=batch, now=100.0))
            published = [sub.events.receive_nowait().job for _ in range(3)]
        # No kind: the column is NOT NULL.
        assert isinstance(results[1], backend_for(store_target).DatabaseError)
        first, _, third, fourth, fifth = results
        assert [r.existing for r in (first, third, fourth, fifth)] == [False, False, False, True]
        # The same key twice in one batch: the second gets the first's job.
        assert fifth.job.id == fourth.job.id
        assert published == [first.job.id, third.job.id, fourth.job.id]
        assert (await store.read(jobs.counts_by_status)) == {"queued": 3}


async def test_guarded_transitions_refuse_the_wrong_status(store_target):
    async with Store.open(store_target, hub=EventHub()) as store:
        job = await insert(store)
        # Not running yet: finishing it is refused, not applied.
        first = jobs.Fence(attempt=1, node=NODE)
        assert (
            await store.write(partial(jobs.finish, job_id=job.id, fence=first, result=1, now=1.0))
            is None
        )
        claimed = await store.write(
            partial(jobs.claim, capacity={"k": 1}, total=1, node=NODE, now=200.0)
        )
        assert [j.id for j in claimed.jobs] == [job.id]
        done = await store.write(
            partial(jobs.finish, job_id=job.id, fence=first, result=1, now=201.0)
        )
        assert done.status == "done"
        again = partial(jobs.finish, job_id=job.id, fence=first, result=2, now=202.0)
        assert await store.write(again) is None
        assert await store.write(partial(jobs.cancel, job_id=job.id, now=203.0)) is None
        assert (await store.read(partial(jobs.get_job, job_id=job.id))).result == 1


async def test_claim_honours_backoff_and_reports_the_next_deadline(store_target):
    async with Store.open(store_target, hub=EventHub()) as store:
        job = await insert(store)
        await store.write(partial(jobs.claim, capacity={"k": 1}, total=1, node=NODE, now=100.0))
        error = ErrorBody(code="X", message="x", retryable=True)
        await store.write(
            partial(
                jobs.retry_later,
                job_id=job.id,
                fence=jobs.Fence(attempt=1, node=NODE),
                error=error,
                available_at=130.0,
                now=100.0,
            )
        )
        early = await store.write(
            partial(jobs.claim, capacity={"k": 1}, total=1, node=NODE, now=129.0)
        )
        assert early.jobs == [] and early.next_available_at == 130.0
        due = await store.write(
            partial(jobs.claim, capacity={"k": 1}, total=1, node=NODE, now=130.0)
        )
        assert [(j.id, j.attempt) for j in due.jobs] == [(job.id, 2)]


@pytest.mark.parametrize("crashes", [1, 2, 3], ids=lambda n: f"{n}-crashes")
async def test_recovery_requeues_until_the_crash_loop_limit(store_target, crashes):
    async with Store.open(store_target, hub=EventHub()) as store:
        job = await insert(store)
        for crash in range(crashes):
            started = 1000.0 * (crash + 1)
            await store.write(
                partial(jobs.claim, capacity={"k": 1}, total=1, node=NODE, now=started)
            )
            counts = await store.write(
                partial(jobs.recover_running, now=started + 1, crash_loop_after=3)
            )
        final = await store.read(partial(jobs.get_job, job_id=job.id))
    if crashes < 3:
        assert counts == {"recovered": 1, "crash_loop": 0}
        assert (final.status, final.reason, final.attempt) == ("queued", "RECOVERED", crashes)
    else:
        assert counts == {"recovered": 0, "crash_loop": 1}
        assert (final.status, final.error.code) == ("failed", "CRASH_LOOP")


@pytest.mark.sqlite_only("the version is SQLite's PRAGMA user_version")
async def test_a_newer_schema_is_refused_with_a_clear_error(tmp_path):
    path = tmp_path / "jw.db"
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA user_version = 99")
    with pytest.raises(StartupError, match="newer than this jobwarden"):
        async with Store.open(path, hub=EventHub()):
            pass


async def test_reopening_keeps_rows_and_schema(store_target):
    async with Store.open(store_target, hub=EventHub()) as store:
        job = await insert(store)
    async with Store.open(store_target, hub=EventHub(), synchronous="FULL") as store:
        again = await store.read(partial(jobs.get_job, job_id=job.id))
    assert msgspec.structs.asdict(again) == msgspec.structs.asdict(job)


async def test_each_fails_only_the_write_that_raised(store_target):
    hub = EventHub()
    async with Store.open(store_target, hub=hub) as store:
        queued = [await insert(store, n) for n in range(3)]
        first = jobs.Fence(attempt=1, node=NODE)
        await store.write(partial(jobs.claim, capacity={"k": 3}, total=3, node=NODE, now=200.0))
        with hub.subscribe(buffer=100) as sub:
            results = await store.write(
                each(
                    [
                        partial(jobs.finish, job_id=queued[0].id, fence=first, result=1, now=201.0),
                        # Not JSON: raises inside the transaction, after the others began.
                        partial(
                            jobs.finish,
                            job_id=queued[1].id,
                            fence=first,
                            result=object(),
                            now=201.0,
                        ),
                        partial(jobs.finish, job_id=queued[2].id, fence=first, result=3, now=201.0),
                    ]
                )
            )
            published = [sub.events.receive_nowait() for _ in range(2)]
            assert sub.events.statistics().current_buffer_used == 0
        assert isinstance(results[1], TypeError)
        assert [results[0].status, results[2].status] == ["done", "done"]
        assert [event.job for event in published] == [queued[0].id, queued[2].id]
        stored = [await store.read(partial(jobs.get_job, job_id=job.id)) for job in queued]
        assert [job.status for job in stored] == ["done", "running", "done"]


def _plan(conn: sqlite3.Connection, sql: str) -> str:
    return " | ".join(row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}"))


@pytest.mark.sqlite_only("SQLite's query plans")
async def test_a_version_4_database_is_migrated_to_partial_queue_indexes(tmp_path):
    """Migration 5 swaps the queue's indexes for ones that hold only queued rows; a database
    written by the previous version keeps its jobs, and the hot queries use the new indexes
    (without ANALYZE statistics, as a daemon's database has none)."""
    path = tmp_path / "jw.db"
    with sqlite3.connect(path, isolation_level=None) as conn:
        for step in MIGRATIONS[:4]:
            conn.executescript(f"BEGIN; {step}; COMMIT;")
        conn.execute("PRAGMA user_version = 4")
        conn.executemany(
            "INSERT INTO jobs (kind, user, status, priority, payload, max_attempts, created_at,"
            " updated_at, available_at, finished_at) VALUES ('k', 'alice', ?, 0, '{}', 4, 1, 1,"
            " 1, ?)",
            [("queued", None), ("queued", None), ("done", 5.0)],
        )
    async with Store.open(path, hub=EventHub()) as store:
        claimed = await store.write(
            partial(jobs.claim, capacity={"k": 1}, total=1, node=NODE, now=10.0)
        )
        assert [job.id for job in claimed.jobs] == [1]
        counts = await store.read(jobs.counts_by_status)
    assert counts == {"queued": 1, "running": 1, "done": 1}
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
        due = _plan(
            conn,
            "SELECT MIN(available_at) FROM jobs INDEXED BY jobs_dispatch "
            "WHERE status = 'queued' AND available_at > 0",
        )
        finished = _plan(
            conn,
            "SELECT COUNT(*) FROM jobs INDEXED BY jobs_finished "
            "WHERE status IN ('done', 'failed', 'canceled') AND finished_at > 0",
        )
        running = _plan(conn, "SELECT id FROM jobs WHERE status = 'running'")
    assert "jobs_dispatch (available_at>?)" in due
    assert "jobs_finished (finished_at>?)" in finished
    assert "jobs_status (status=?)" in running


def _insert_row(conn: sqlite3.Connection, status: str, key: str) -> None:
    """A job row written past every lookup, as a racing writer's would be."""
    conn.execute(
        "INSERT INTO jobs (kind, user, status, priority, payload, idempotency_key, max_attempts,"
        " created_at, updated_at, available_at, finished_at) VALUES ('k', 'alice', ?, 0,"
        " '{\"n\": 0}', ?, 4, 1, 1, 1, ?)",
        (status, key, 5.0 if status in ("done", "failed", "canceled") else None),
    )


async def test_the_database_refuses_a_second_active_job_with_one_key(store_target):
    """Whatever a writer looked up before (a second daemon on one database, say), two active
    jobs of a user never share a key, while a finished job's key is free for a new one."""
    async with Store.open(store_target, hub=EventHub()) as store:
        await store.write(lambda conn, events: _insert_row(conn, "done", "book"))
        await store.write(lambda conn, events: _insert_row(conn, "queued", "book"))
        with pytest.raises(backend_for(store_target).DatabaseError, match=r"(?i)unique"):
            await store.write(lambda conn, events: _insert_row(conn, "running", "book"))
        counts = await store.read(jobs.counts_by_status)
    assert counts == {"done": 1, "queued": 1}


@pytest.mark.sqlite_only("writes an old SQLite schema by hand")
async def test_a_database_whose_keys_held_finished_jobs_is_migrated_to_active_keys(tmp_path):
    """Keys used to stay with their job until it was pruned: after the migration, a finished
    job's key starts a new job, and an active job's key still returns that job."""
    before = next(n for n, step in enumerate(MIGRATIONS) if "jobs_idempotency_active" in step)
    path = tmp_path / "jw.db"
    with sqlite3.connect(path, isolation_level=None) as conn:
        for step in MIGRATIONS[:before]:
            conn.executescript(f"BEGIN; {step}; COMMIT;")
        conn.execute(f"PRAGMA user_version = {before}")
        _insert_row(conn, "done", "book")
        _insert_row(conn, "queued", "draft")
    async with Store.open(path, hub=EventHub()) as store:
        book = await insert_one(store, new_job(0, "book"), now=10.0)
        draft = await insert_one(store, new_job(0, "draft"), now=10.0)
    assert (book.job.id, book.existing) == (3, False)
    assert (draft.job.id, draft.existing) == (2, True)
