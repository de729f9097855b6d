"""The store: every job and event in SQLite, written by one thread with group commit.

One thread owns the write connection. Callers hand it a write and wait; the thread takes every
write that is waiting, runs them in one transaction (each in its own savepoint, so one bad
write does not spoil its batch), commits once, and only then wakes each caller and publishes
the batch's events. Under load many writes share one fsync; idle, a write commits alone.
Reads go through a second connection in WAL mode and never wait for the writer.

Each transition changes the job row and adds one event row in the same write (the event rows
a write collects are inserted when it returns, in one statement), so the event log and the jobs
table can never disagree, even after `kill -9`.
"""

from __future__ import annotations

import queue
import sqlite3
import threading
from collections.abc import Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import msgspec
import structlog
import trio

from jobwarden.errors import StoreError
from jobwarden.hub import EventHub
from jobwarden.wire.views import ErrorBody, Event, JobView

T = TypeVar("T")
X = TypeVar("X")
log = structlog.get_logger("store")

_json = msgspec.json.Encoder()
_decode_error = msgspec.json.Decoder(ErrorBody)


def dump_json(value: Any) -> str | None:
    return None if value is None else _json.encode(value).decode()


def _load(text: str | None) -> Any:
    return None if text is None else msgspec.json.decode(text)


MIGRATIONS: list[str] = [
    """
    CREATE TABLE jobs (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        kind TEXT NOT NULL,
        user TEXT NOT NULL,
        status TEXT NOT NULL,
        priority INTEGER NOT NULL,
        payload TEXT NOT NULL,
        idempotency_key TEXT,
        attempt INTEGER NOT NULL DEFAULT 0,
        max_attempts INTEGER NOT NULL,
        recoveries INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        available_at REAL NOT NULL,
        started_at REAL,
        finished_at REAL,
        heartbeat_at REAL,
        progress REAL,
        message TEXT,
        reason TEXT,
        checkpoint TEXT,
        result TEXT,
        error TEXT
    );
    -- The next backoff deadline: MIN(available_at) among queued jobs.
    CREATE INDEX jobs_dispatch ON jobs(status, available_at, priority, id);
    -- Dispatch order: highest priority first, then oldest.
    CREATE INDEX jobs_order ON jobs(status, priority DESC, id);
    CREATE INDEX jobs_kind_status ON jobs(kind, status);
    CREATE INDEX jobs_user ON jobs(user, id);
    CREATE UNIQUE INDEX jobs_idempotency ON jobs(user, idempotency_key)
        WHERE idempotency_key IS NOT NULL;
    CREATE TABLE events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        job_id INTEGER NOT NULL,
        user TEXT NOT NULL,
        kind TEXT NOT NULL,
        type TEXT NOT NULL,
        at REAL NOT NULL,
        data TEXT NOT NULL
    );
    CREATE INDEX events_job ON events(job_id, seq);
    CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    """,
    """
    -- When the reported progress last changed: the stall rule's clock.
    ALTER TABLE jobs ADD COLUMN progress_at REAL;
    CREATE INDEX jobs_finished ON jobs(status, finished_at);
    """,
    """
    -- One row per external call: what it cost, to whom. Kept when finished jobs are pruned.
    CREATE TABLE ledger (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        job_id INTEGER,
        user TEXT NOT NULL,
        kind TEXT NOT NULL,
        service TEXT NOT NULL,
        units REAL NOT NULL,
        usd REAL NOT NULL,
        ok INTEGER NOT NULL,
        at REAL NOT NULL,
        day TEXT NOT NULL,
        month TEXT NOT NULL
    );
    CREATE INDEX ledger_day ON ledger(day);
    CREATE INDEX ledger_month ON ledger(month);
    CREATE INDEX ledger_job ON ledger(job_id);
    CREATE TABLE breakers (
        service TEXT PRIMARY KEY,
        state TEXT NOT NULL,
        open_until REAL,
        changed_at REAL NOT NULL
    );
    """,
    """
    -- Users: limits, credits, and only a hash of the token.
    CREATE TABLE users (
        name TEXT PRIMARY KEY,
        token_hash TEXT UNIQUE,
        credits INTEGER,
        spent INTEGER NOT NULL DEFAULT 0,
        daily_limit INTEGER,
        rate TEXT,
        max_running INTEGER,
        disabled INTEGER NOT NULL DEFAULT 0,
        -- Jobs created on `day` (in the limits' time zone): the daily limit's count.
        day TEXT,
        day_count INTEGER NOT NULL DEFAULT 0,
        -- The fair-queueing tag of the user's latest job.
        fair_tag INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL
    ) WITHOUT ROWID;
    -- Round-robin across users within a priority level: the n-th job a user has waiting
    -- gets a tag one past their previous job's and never below the tag being dispatched.
    ALTER TABLE jobs ADD COLUMN fair_tag INTEGER NOT NULL DEFAULT 0;
    -- Credits reserved at admission: spent when done, refunded on failure or cancel.
    ALTER TABLE jobs ADD COLUMN credits INTEGER NOT NULL DEFAULT 0;
    DROP INDEX jobs_order;
    CREATE INDEX jobs_order ON jobs(status, priority DESC, fair_tag, id);
    DROP INDEX jobs_kind_status;
    CREATE INDEX jobs_kind_order ON jobs(kind, status, priority DESC, fair_tag, id);
    """,
    """
    -- The queue's indexes hold queued rows only, so that a job's later transitions (running,
    -- done) leave them alone: each transition changes one index on status instead of four.
    -- Queries name `status = 'queued'` literally, which is what lets SQLite use them.
    DROP INDEX jobs_dispatch;
    DROP INDEX jobs_order;
    DROP INDEX jobs_kind_order;
    DROP INDEX jobs_finished;
    CREATE INDEX jobs_status ON jobs(status, kind);
    CREATE INDEX jobs_dispatch ON jobs(available_at) WHERE status = 'queued';
    CREATE INDEX jobs_order ON jobs(priority DESC, fair_tag, id) WHERE status = 'queued';
    CREATE INDEX jobs_kind_order ON jobs(kind, priority DESC, fair_tag, id)
        WHERE status = 'queued';
    CREATE INDEX jobs_finished ON jobs(finished_at) WHERE finished_at IS NOT NULL;
    """,
]

JOB_COLUMNS = (
    "id, kind, user, status, priority, attempt, max_attempts, created_at, updated_at, "
    "available_at, started_at, finished_at, progress, message, reason, idempotency_key, "
    "result, error, payload, checkpoint"
)
LIST_COLUMNS = JOB_COLUMNS.replace(", payload, checkpoint", "")


def job_from_row(row: Sequence[Any]) -> JobView:
    full = len(row) > 18
    return JobView(
        id=row[0],
        kind=row[1],
        user=row[2],
        status=row[3],
        priority=row[4],
        attempt=row[5],
        max_attempts=row[6],
        created_at=row[7],
        updated_at=row[8],
        available_at=row[9],
        started_at=row[10],
        finished_at=row[11],
        progress=row[12],
        message=row[13],
        reason=row[14],
        idempotency_key=row[15],
        result=_load(row[16]),
        error=None if row[17] is None else _decode_error.decode(row[17]),
        payload=_load(row[18]) if full else None,
        checkpoint=_load(row[19]) if full else None,
    )


@dataclass(slots=True)
class PendingWrite(Generic[T]):
    """A write handed to the writer: it commits after every write handed over before it."""

    apply: Callable[[sqlite3.Connection, list[Event]], T]
    # Runs after the batch's transaction, on its own (maintenance that cannot run inside one).
    solo: bool = False
    done: trio.Event = field(default_factory=trio.Event)
    result: Any = None
    error: BaseException | None = None
    events: list[Event] = field(default_factory=list)

    async def committed(self) -> T:
        """The write's result once it is committed; raises what the write raised."""
        await self.done.wait()
        if self.error is not None:
            raise self.error
        return self.result


_STOP = object()


def _connect(path: str, synchronous: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.execute("PRAGMA busy_timeout=5000")
    conn.execute("PRAGMA foreign_keys=ON")
    # Savepoints keep the pages they change in a statement journal: in memory, not a file.
    conn.execute("PRAGMA temp_store=MEMORY")
    # 32 MB of page cache (the default is 2 MB): the queue's index pages stay in memory.
    conn.execute("PRAGMA cache_size=-32768")
    return conn


def migrate(conn: sqlite3.Connection) -> int:
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > len(MIGRATIONS):
        raise StoreError(
            f"database schema version {version} is newer than this jobwarden knows "
            f"({len(MIGRATIONS)}); upgrade jobwarden"
        )
    for number in range(version, len(MIGRATIONS)):
        # One transaction per step: a crash mid-migration leaves the previous version intact.
        try:
            conn.executescript(
                f"BEGIN IMMEDIATE; {MIGRATIONS[number]}; PRAGMA user_version={number + 1}; COMMIT;"
            )
        except sqlite3.Error:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
    return len(MIGRATIONS)


class Store:
    """Open with `async with Store.open(...)`; all methods are called from trio."""

    def __init__(self, path: str, *, max_batch: int, hub: EventHub, threaded: bool) -> None:
        self.path = path
        self._max_batch = max_batch
        self._hub = hub
        self._threaded = threaded
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._read_limiter = trio.CapacityLimiter(1)
        self._writer: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        self.batches = 0
        self.writes = 0

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        path: str | Path,
        *,
        hub: EventHub,
        synchronous: str = "NORMAL",
        max_batch: int = 1000,
        threaded: bool = True,
    ):
        """Threaded is the daemon's mode. Unthreaded runs each write inline on the trio
        thread: for tests on MockClock, where a write in flight on another thread would let
        autojump move time under it."""
        path = str(path)
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        store = cls(path, max_batch=max_batch, hub=hub, threaded=threaded)
        store._writer = _connect(path, synchronous)
        migrate(store._writer)
        store._reader = store._writer if path == ":memory:" else _connect(path, synchronous)
        thread = None
        if threaded:
            token = trio.lowlevel.current_trio_token()
            thread = threading.Thread(
                target=store._write_loop, args=(token,), name="jobwarden-store", daemon=True
            )
            thread.start()
        try:
            yield store
        finally:
            if thread is not None:
                store._queue.put(_STOP)
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(thread.join)
            store._writer.close()
            if store._reader is not store._writer:
                store._reader.close()

    # -- the write path -------------------------------------------------------------------

    def _write_loop(self, token: trio.lowlevel.TrioToken) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            batch = [first]
            stop = False
            while len(batch) < self._max_batch:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is _STOP:
                    stop = True
                    break
                batch.append(more)
            self._commit(batch)
            try:
                token.run_sync_soon(self._deliver, batch)
            except trio.RunFinishedError:
                return
            if stop:
                return

    def _commit(self, batch: list[PendingWrite[Any]]) -> None:
        conn = self._writer
        assert conn is not None
        grouped = [write for write in batch if not write.solo]
        try:
            if grouped:
                conn.execute("BEGIN IMMEDIATE")
                for write in grouped:
                    conn.execute("SAVEPOINT w")
                    try:
                        write.result = write.apply(conn, write.events)
                        insert_events(conn, write.events)
                    except Exception as exc:
                        conn.execute("ROLLBACK TO w")
                        write.error, write.events = exc, []
                    conn.execute("RELEASE w")
                conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            for write in grouped:
                write.error = StoreError(f"database write failed: {exc}")
                write.events = []
        for write in batch:
            if write.solo:
                try:
                    write.result = write.apply(conn, write.events)
                    insert_events(conn, write.events)
                except sqlite3.Error as exc:
                    write.error = StoreError(f"database maintenance failed: {exc}")
        self.batches += 1
        self.writes += len(batch)

    def _deliver(self, batch: list[PendingWrite[Any]]) -> None:
        for write in batch:
            write.done.set()
        self._hub.publish([event for write in batch for event in write.events])

    async def write(
        self, apply: Callable[[sqlite3.Connection, list[Event]], T], *, solo: bool = False
    ) -> T:
        """Run `apply(conn, events)` in a transaction; returns once it is committed.

        `apply` appends the Event rows it adds to `events`; they are inserted with it and
        published after the commit. A write that was handed over is committed even if the
        caller is cancelled while waiting.
        """
        pending = self.hand_over(apply, solo=solo)
        if not self._threaded:
            await trio.lowlevel.checkpoint()
        return await pending.committed()

    def hand_over(
        self, apply: Callable[[sqlite3.Connection, list[Event]], T], *, solo: bool = False
    ) -> PendingWrite[T]:
        """Queue a write without waiting for it: whatever the caller does next (a message
        that leads to another write) is ordered after it."""
        pending = PendingWrite(apply, solo=solo)
        if self._threaded:
            self._queue.put(pending)
        else:
            self._commit([pending])
            self._deliver([pending])
        return pending

    # -- the read path --------------------------------------------------------------------

    async def checkpoint_wal(self) -> None:
        """Fold the WAL back into the database file; done when idle, outside any transaction."""

        def apply(conn: sqlite3.Connection, events: list[Event]) -> None:
            # Read the pragma's answer to the end: an open statement blocks the next batch.
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()

        await self.write(apply, solo=True)

    async def read(self, query: Callable[[sqlite3.Connection], T]) -> T:
        conn = self._reader
        assert conn is not None
        if not self._threaded:
            await trio.lowlevel.checkpoint()
            return query(conn)
        return await trio.to_thread.run_sync(query, conn, limiter=self._read_limiter)


def each(
    applies: Sequence[Callable[[sqlite3.Connection, list[Event]], T]],
) -> Callable[[sqlite3.Connection, list[Event]], list[T | Exception]]:
    """Several writes as one, each isolated: one that fails comes back as its exception, in
    its place, and the others land."""

    def apply(conn: sqlite3.Connection, events: list[Event]) -> list[T | Exception]:
        return apply_each(conn, events, applies, lambda one: one(conn, events))

    return apply


def apply_each(
    conn: sqlite3.Connection,
    events: list[Event],
    items: Sequence[X],
    apply_one: Callable[[X], T],
    *,
    reset: Callable[[], None] | None = None,
) -> list[T | Exception]:
    """`apply_one(item)` for each item, where one that raises fails alone.

    All items go in one savepoint first. If one raises, all are rolled back (and `reset`
    called, to forget what they left in memory), then applied again in a savepoint each, so
    that only the failing ones fail. A savepoint per item from the start would cost more than
    the items: SQLite copies every page a savepoint changes first.
    """
    mark = len(events)
    conn.execute("SAVEPOINT batch")
    try:
        results: list[T | Exception] = [apply_one(item) for item in items]
    except Exception:
        conn.execute("ROLLBACK TO batch")
        del events[mark:]
        results = []
    conn.execute("RELEASE batch")
    if len(results) == len(items):
        return results
    if reset is not None:
        reset()
    for item in items:
        conn.execute("SAVEPOINT item")
        mark = len(events)
        try:
            results.append(apply_one(item))
        except Exception as exc:
            conn.execute("ROLLBACK TO item")
            del events[mark:]
            results.append(exc)
        conn.execute("RELEASE item")
    return results


def add_event(
    events: list[Event],
    job: JobView | tuple[int, str, str],
    type_: str,
    at: float,
    data: dict[str, Any],
) -> None:
    """Collect one event row; the store inserts and numbers a write's rows when it returns."""
    job_id, user, kind = (job.id, job.user, job.kind) if isinstance(job, JobView) else job
    events.append(Event(seq=0, job=job_id, user=user, kind=kind, type=type_, at=at, data=data))


# Rows per INSERT: 6 parameters each, well under SQLite's 32,766.
EVENT_ROWS_PER_INSERT = 1000


def insert_events(conn: sqlite3.Connection, events: list[Event]) -> None:
    """Insert a write's event rows in multi-row statements and give each its seq.

    One statement per event would cost a SQLite step each, and each step gives the GIL away
    and waits to get it back from the trio thread. Rows one INSERT adds to an AUTOINCREMENT
    table are numbered consecutively, and this thread is the only writer.
    """
    for start in range(0, len(events), EVENT_ROWS_PER_INSERT):
        chunk = events[start : start + EVENT_ROWS_PER_INSERT]
        cursor = conn.execute(
            "INSERT INTO events (job_id, user, kind, type, at, data) VALUES "
            + ", ".join(["(?, ?, ?, ?, ?, ?)"] * len(chunk)),
            [
                value
                for event in chunk
                for value in (
                    event.job,
                    event.user,
                    event.kind,
                    event.type,
                    event.at,
                    dump_json(event.data),
                )
            ],
        )
        first = cursor.lastrowid - len(chunk) + 1
        for offset, event in enumerate(chunk):
            event.seq = first + offset


def fetch_job(conn: sqlite3.Connection, job_id: int) -> JobView | None:
    row = conn.execute(f"SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
    return None if row is None else job_from_row(row)


def placeholders(values: Iterable[Any]) -> str:
    return ", ".join("?" for _ in values)
