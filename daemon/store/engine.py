"""The engine: every job and event written by one thread with group commit, read by another.

One thread owns the write connection. Callers hand it a write and wait; the thread takes every
write that is waiting, runs them in one transaction (each in its own savepoint, so one bad
write does not spoil its batch), commits once, and only then wakes each caller and publishes
the batch's events. Under load many writes share one fsync; idle, a write commits alone.
Reads go through a second connection in WAL mode and never wait for the writer.

Each transition changes the job row and adds one event row in the same write (the event rows
a write collects are inserted when it returns, in one statement), so the event log and the jobs
table can never disagree, even after `kill -9`.

`Engine` is what the rest of jobwarden uses of a store; `Store` is the SQLite one, and reaches
SQLite only through sqlite.py.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Protocol, Self, TypeVar

import trio

from jobwarden.errors import StoreError
from jobwarden.hub import EventHub
from jobwarden.store import sqlite
from jobwarden.store.rows import Events, insert_events
from jobwarden.store.schema import migrate
from jobwarden.wire.views import Event

T = TypeVar("T")

# A write: a function of the write connection and the event rows it adds.
Write = Callable[[sqlite.Connection, Events], T]
# A query: a function of the read connection.
Query = Callable[[sqlite.Connection], T]


@dataclass(slots=True)
class PendingWrite(Generic[T]):
    """A write handed to the writer: it commits after every write handed over before it."""

    apply: Write[T]
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


class Engine(Protocol):
    """What actors and listeners use of a store; every backend provides it."""

    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        hub: EventHub,
        synchronous: str = "NORMAL",
        max_batch: int = 1000,
        threaded: bool = True,
    ) -> AbstractAsyncContextManager[Self]:
        """The store, migrated to the newest schema, for as long as the context lasts."""
        ...

    async def write(self, apply: Write[T], *, solo: bool = False) -> T:
        """Run `apply` in a transaction; returns its result once it is committed."""
        ...

    def hand_over(self, apply: Write[T], *, solo: bool = False) -> PendingWrite[T]:
        """Queue a write without waiting for its commit."""
        ...

    async def read(self, query: Query[T]) -> T:
        """Run `query` on a connection that never waits for the writer."""
        ...

    async def checkpoint_wal(self) -> None:
        """Fold the write-ahead log into the database while idle (SQLite keeps one)."""
        ...


_STOP = object()


class Store:
    """The SQLite engine. Open with `async with Store.open(...)`; all methods are called from
    trio."""

    def __init__(self, path: str, *, max_batch: int, hub: EventHub, threaded: bool) -> None:
        self.path = path
        self._max_batch = max_batch
        self._hub = hub
        self._threaded = threaded
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._read_limiter = trio.CapacityLimiter(1)
        self._writer: sqlite.Connection | None = None
        self._reader: sqlite.Connection | None = None
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
        if path != sqlite.IN_MEMORY:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        store = cls(path, max_batch=max_batch, hub=hub, threaded=threaded)
        store._writer = sqlite.connect(path, synchronous)
        migrate(store._writer)
        store._reader = (
            store._writer if path == sqlite.IN_MEMORY else sqlite.connect(path, synchronous)
        )
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
                sqlite.begin_write(conn)
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
        except sqlite.DatabaseError as exc:
            sqlite.roll_back(conn)
            for write in grouped:
                write.error = StoreError(f"database write failed: {exc}")
                write.events = []
        for write in batch:
            if write.solo:
                try:
                    write.result = write.apply(conn, write.events)
                    insert_events(conn, write.events)
                except sqlite.DatabaseError as exc:
                    write.error = StoreError(f"database maintenance failed: {exc}")
        self.batches += 1
        self.writes += len(batch)

    def _deliver(self, batch: list[PendingWrite[Any]]) -> None:
        for write in batch:
            write.done.set()
        self._hub.publish([event for write in batch for event in write.events])

    async def write(self, apply: Write[T], *, solo: bool = False) -> T:
        """Run `apply(conn, events)` in a transaction; returns once it is committed.

        `apply` appends the Event rows it adds to `events`; they are inserted with it and
        published after the commit. A write that was handed over is committed even if the
        caller is cancelled while waiting.
        """
        pending = self.hand_over(apply, solo=solo)
        if not self._threaded:
            await trio.lowlevel.checkpoint()
        return await pending.committed()

    def hand_over(self, apply: Write[T], *, solo: bool = False) -> PendingWrite[T]:
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

        def apply(conn: sqlite.Connection, events: Events) -> None:
            sqlite.checkpoint_wal(conn)

        await self.write(apply, solo=True)

    async def read(self, query: Query[T]) -> T:
        conn = self._reader
        assert conn is not None
        if not self._threaded:
            await trio.lowlevel.checkpoint()
            return query(conn)
        return await trio.to_thread.run_sync(query, conn, limiter=self._read_limiter)
