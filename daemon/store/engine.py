"""The engine: every job and event written by one thread with group commit, read by another.

One thread owns the write connection. Callers hand it a write and wait; the thread takes every
write that is waiting, runs them in one transaction (each in its own savepoint, so one bad
write does not spoil its batch), commits once, and only then wakes each caller and publishes
the batch's events. Under load many writes share one fsync; idle, a write commits alone.
Reads go through a second connection in WAL mode and never wait for the writer.

Each transition changes the job row and adds one event row in the same write (the event rows
a write collects are inserted when it returns, in one statement), so the event log and the jobs
table can never disagree, even after `kill -9`.

The engine also knows whether the database takes writes (`Store.health`): a batch whose commit
fails for the database's sake (disk full, read-only or failing file) puts the store in a fault.
Callers read it (admission refuses, the scheduler holds dispatch, probes answer 503). While it
lasts, `probe_while_faulted` tries a write of its own with backoff on trio's clock, one with
room in it, and the fault ends when that commits: the store comes back by itself, and a small
write that happens to fit does not end it early. A write handed over with `keep=True` is not
refused by a fault but kept, and committed first in the next batch that commits: what already
happened (a job's outcome, a call's cost) is never lost.

`Engine` is what the rest of jobwarden uses of a store; `Store` is the one engine, on SQLite
(a file path) or PostgreSQL (a postgresql:// URL), and reaches the database only through its
backend (backend.py: sqlite.py or postgres.py). On PostgreSQL a lost connection (the server
restarting) is a fault like a full disk: the probe's reconnect ends it, and a read whose
connection was lost waits for a new one, with backoff, instead of failing.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Hashable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Generic, Protocol, Self, TypeVar

import msgspec
import structlog
import trio

from jobwarden.clock import WallClock
from jobwarden.config import redacted_url
from jobwarden.errors import ConfigError, StartupError, StoreError
from jobwarden.hub import EventHub
from jobwarden.store import backend as backends
from jobwarden.store.jobs import set_setting
from jobwarden.store.rows import EventRow, Events, event_rows, insert_events
from jobwarden.store.schema import migrate
from jobwarden.store.sqlite import IN_MEMORY
from jobwarden.store.tail import EventTail
from jobwarden.store.webhooks import queue_deliveries
from jobwarden.wire.views import Event

log = structlog.get_logger("store")

T = TypeVar("T")

# A write: a function of the write connection and the event rows it adds.
Write = Callable[[Any, Events], T]
# A query: a function of the read connection.
Query = Callable[[Any], T]


# While the store takes no writes, it tries one of its own after this long, then twice as long
# each time, up to PROBE_MAX.
PROBE_FIRST = 1.0
PROBE_MAX = 30.0
# The settings row the probe writes. It holds PROBE_ROOM bytes: the room a probe finds must
# be enough for a batch of jobs, not for one small row that fits in a page already there, or
# the store would flap between taking writes and refusing them.
PROBE_SETTING = "store_probe"
PROBE_ROOM = 64 * 1024
# A read whose connection was lost tries a new one after this long, then twice as long each
# time, up to READ_RETRY_MAX, for as long as the database stays away (a caller's cancel scope
# ends the wait): an actor's read waits out a restart of the server instead of failing.
READ_RETRY_FIRST = 0.1
READ_RETRY_MAX = 5.0


class StoreFault(msgspec.Struct, frozen=True):
    """Why the store takes no writes: `STORAGE_FULL`, `STORAGE_UNAVAILABLE` (the database
    server cannot be reached) or `STORAGE_ERROR`, the database's own words, and since when
    (wall time)."""

    code: str
    message: str
    since: float


class StoreState(msgspec.Struct, frozen=True):
    """The store's health as it changed: the supervisor hands it to the actors that act on
    it. `fault` None: the store takes writes."""

    fault: StoreFault | None


class StoreHealth:
    """Whether the store takes writes. The engine changes it on the trio thread: a batch
    that fails for the database's sake starts a fault, the probe's write that commits ends it.
    Actors and listeners read `fault` and wait for changes."""

    def __init__(self, clock: WallClock) -> None:
        self._clock = clock
        self.fault: StoreFault | None = None
        # Counts changes, so a waiter that was busy meanwhile misses none.
        self.version = 0
        self._changed = trio.Event()
        # When the probe tries its next write (trio time), while there is a fault.
        self.next_probe_at: float | None = None

    def failed(self, error: StoreError) -> None:
        if self.fault is not None:
            # Still failing, maybe otherwise: the probe acts on what fails now.
            self.fault = msgspec.structs.replace(self.fault, code=error.code, message=str(error))
            return
        self.fault = StoreFault(code=error.code, message=str(error), since=self._clock.now())
        log.error("store takes no writes", code=error.code, error=str(error))
        self._change()

    def recovered(self) -> None:
        if self.fault is None:
            return
        down_for = round(self._clock.now() - self.fault.since, 3)
        self.fault = None
        log.warning("store takes writes again", down_for=down_for)
        self._change()

    def _change(self) -> None:
        self.version += 1
        self._changed.set()
        self._changed = trio.Event()

    async def wait_change(self, seen: int) -> int:
        """Return the version once it differs from `seen` (at once if it already does)."""
        while self.version == seen:
            await self._changed.wait()
        return self.version

    async def wait_faulted(self) -> None:
        while self.fault is None:
            await self._changed.wait()

    def retry_after(self) -> float:
        """Seconds until the store next tries a write of its own: when to try again."""
        if self.next_probe_at is None:
            return PROBE_FIRST
        return round(max(PROBE_FIRST, self.next_probe_at - trio.current_time()), 3)

    def error(self) -> StoreError | None:
        """The fault as the error a write would meet now; None while the store takes writes."""
        if self.fault is None:
            return None
        return StoreError.with_code(
            self.fault.code, self.fault.message, retry_after=self.retry_after()
        )

    def view(self) -> dict[str, Any]:
        """For /health and `jobwarden status`."""
        if self.fault is None:
            return {"writable": True}
        return {"writable": False, **msgspec.to_builtins(self.fault)}


@dataclass(slots=True)
class PendingWrite(Generic[T]):
    """A write handed to the writer: it commits after every write handed over before it."""

    apply: Write[T]
    # Runs after the batch's transaction, on its own (maintenance that cannot run inside one).
    solo: bool = False
    # Kept through a store fault, to be committed when the store takes writes again; a kept
    # write with a `key` replaces the one kept before it under the same key (the latest
    # heartbeat of a job is the one worth writing).
    keep: bool = False
    key: Hashable | None = None
    done: trio.Event = field(default_factory=trio.Event)
    result: Any = None
    error: BaseException | None = None
    events: list[Event] = field(default_factory=list)
    # The events encoded for insertion, once the write has run.
    rows: list[EventRow] = field(default_factory=list)

    async def committed(self) -> T:
        """The write's result once it is committed; raises what the write raised."""
        await self.done.wait()
        if self.error is not None:
            raise self.error
        return self.result


class Engine(Protocol):
    """What actors and listeners use of a store; every backend provides it."""

    health: StoreHealth

    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        hub: EventHub,
        synchronous: str = "NORMAL",
        max_batch: int = 1000,
        threaded: bool = True,
        clock: WallClock | None = None,
    ) -> AbstractAsyncContextManager[Self]:
        """The store, migrated to the newest schema, for as long as the context lasts."""
        ...

    async def write(self, apply: Write[T], *, solo: bool = False) -> T:
        """Run `apply` in a transaction; returns its result once it is committed. Raises
        StoreError when the database takes no writes."""
        ...

    def hand_over(
        self,
        apply: Write[T],
        *,
        solo: bool = False,
        keep: bool = False,
        key: Hashable | None = None,
    ) -> PendingWrite[T]:
        """Queue a write without waiting for its commit; `keep`: through a store fault."""
        ...

    async def write_or_keep(self, apply: Write[T], *, key: Hashable | None = None) -> T | None:
        """Write now and return its result, or keep the write for when the store takes
        writes again and return None."""
        ...

    async def probe_while_faulted(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Run for as long as the store is open: bring it back from each fault."""
        ...

    async def read(self, query: Query[T]) -> T:
        """Run `query` on a connection that never waits for the writer."""
        ...

    async def checkpoint_wal(self) -> None:
        """Fold the write-ahead log into the database while idle (SQLite keeps one)."""
        ...


_STOP = object()


class Store:
    """The engine, on SQLite or PostgreSQL. Open with `async with Store.open(...)`; all
    methods are called from trio."""

    def __init__(
        self,
        path: str,
        *,
        synchronous: str,
        max_batch: int,
        hub: EventHub,
        threaded: bool,
        clock: WallClock,
    ) -> None:
        # The database: a file path, or a postgresql:// URL.
        self.path = path
        self._backend = backends.backend_for(path)
        self._synchronous = synchronous
        self._max_batch = max_batch
        self._hub = hub
        # Where other daemons write the database too, its events reach the hub through the
        # tail, which reads theirs from the log (tail.py).
        self._tail = EventTail(self, hub, self._backend) if self._backend.SHARED else None
        self._threaded = threaded
        self._clock = clock
        self.health = StoreHealth(clock)
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._read_limiter = trio.CapacityLimiter(1)
        self._writer: Any = None
        self._reader: Any = None
        # Writes kept through a fault, oldest first; only the writer touches them.
        self._kept: list[PendingWrite[Any]] = []
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
        clock: WallClock | None = None,
    ):
        """`path`: a file (SQLite) or a postgresql:// URL. Threaded is the daemon's mode.
        Unthreaded runs each write inline on the trio thread: for tests on MockClock, where a
        write in flight on another thread would let autojump move time under it.

        Opening writes nothing unless the schema needs a migration, so a store on a full disk
        or in a read-only file opens (and reads); its first write finds the fault."""
        path = str(path)
        store = cls(
            path,
            synchronous=synchronous,
            max_batch=max_batch,
            hub=hub,
            threaded=threaded,
            clock=clock or WallClock(),
        )
        backend = store._backend
        try:
            store._writer = backend.connect(path, synchronous)
            migrate(store._writer)
            store._reader = backend.connect_reader(path, synchronous, store._writer)
        except BaseException as exc:
            store._close_connections()
            if not isinstance(exc, backend.DatabaseError | OSError):
                raise
            why = backends.redacted_error(exc, path)
            if backends.is_url(path):
                # A server that refuses the URL (its host, user, password or database): a
                # config to mend, which a restart does not (exit 2).
                raise ConfigError(
                    f"store.url: cannot open the database {redacted_url(path)}: {why}"
                ) from None
            raise StartupError(f"cannot open the database {path}: {why}") from None
        thread = None
        if threaded:
            token = trio.lowlevel.current_trio_token()
            thread = threading.Thread(
                target=store._write_loop, args=(token,), name="jobwarden-store", daemon=True
            )
            thread.start()
        try:
            if store._tail is None:
                yield store
            else:
                async with trio.open_nursery() as nursery:
                    await nursery.start(store._tail.run)
                    yield store
                    nursery.cancel_scope.cancel()
        finally:
            if thread is not None:
                store._queue.put(_STOP)
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(thread.join)
            store._give_up_kept()
            store._close_connections()

    def _close_connections(self) -> None:
        if self._reader is not None and self._reader is not self._writer:
            self._reader.close()
        if self._writer is not None:
            self._writer.close()

    def _give_up_kept(self) -> None:
        """Closing with writes still kept: the store never took writes again. Their waiters
        learn it; a job whose outcome is among them is recovered at the next start."""
        if not self._kept:
            return
        log.error("store closed with writes it could not commit", kept=len(self._kept))
        error = StoreError("the daemon stopped before the store took writes again", full=False)
        for write in self._kept:
            write.error = error
            write.done.set()
        self._kept = []

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
            done, fault = self._commit(batch)
            try:
                token.run_sync_soon(self._deliver, done, fault)
            except trio.RunFinishedError:
                return
            if stop:
                return

    def _commit(
        self, handed: list[PendingWrite[Any]]
    ) -> tuple[list[PendingWrite[Any]], StoreError | None]:
        """Run a batch: the kept writes first, then those handed over, in one transaction;
        then the solo ones. Returns the writes that are done, and the store error that failed
        the transaction, if one did."""
        grouped = self._kept + [write for write in handed if not write.solo]
        self._kept = []
        done: list[PendingWrite[Any]] = []
        fault = None
        while grouped:
            try:
                again = self._transact(grouped)
            except self._backend.DatabaseError as exc:
                fault = self._store_error("database write failed", exc)
                done += self._after_fault(grouped, fault)
                break
            done += [write for write in grouped if all(write is not late for late in again)]
            # Chosen as a deadlock's victim: run again once this commit has released what
            # the other transaction waited for.
            grouped = again
        for write in handed:
            if write.solo:
                try:
                    write.result = write.apply(self._writer, write.events)
                    if write.events:
                        # Its events in a transaction of their own, ordered as any other's,
                        # with what a final status owes: its webhook's delivery.
                        self._backend.begin_write(self._writer)
                        queue_deliveries(self._writer, write.events)
                        insert_events(self._writer, write.events, event_rows(write.events))
                        self._writer.execute("COMMIT")
                except self._backend.DatabaseError as exc:
                    write.error = self._store_error("database maintenance failed", exc)
                done.append(write)
        self.batches += 1
        self.writes += len(handed)
        return done, fault

    def _transact(self, grouped: list[PendingWrite[Any]]) -> list[PendingWrite[Any]]:
        """One transaction, each write in its own savepoint, so that one that raises fails
        alone; a database that fails fails them all. Returns the writes to run again in a
        transaction of their own: those the database gave up on to break a deadlock with
        another daemon's transaction (a lock wait in one write of a batch holding the
        locks of the others); they changed nothing here."""
        conn = self._writer
        assert conn is not None
        again = []
        self._backend.begin_write(conn)
        for write in grouped:
            conn.execute("SAVEPOINT w")
            try:
                write.result = write.apply(conn, write.events)
                write.rows = event_rows(write.events)
                # In the write's savepoint, beside the status it tells of; the events
                # themselves are numbered last, under the order lock (insert_events).
                queue_deliveries(conn, write.events)
            except Exception as exc:
                if self._backend.is_fault(exc):
                    raise
                conn.execute("ROLLBACK TO w")
                write.result, write.events, write.rows = None, [], []
                if self._backend.is_retryable(exc):
                    again.append(write)
                else:
                    write.error = exc
            conn.execute("RELEASE w")
        insert_events(
            conn,
            [event for write in grouped for event in write.events],
            [row for write in grouped for row in write.rows],
        )
        conn.execute("COMMIT")
        return again

    def _after_fault(
        self, grouped: list[PendingWrite[Any]], error: StoreError
    ) -> list[PendingWrite[Any]]:
        """The transaction failed: keep the writes that are to be kept (one per key), fail the
        others. Returns those that are done."""
        with contextlib.suppress(self._backend.DatabaseError):
            self._backend.roll_back(self._writer)
        done = []
        for write in grouped:
            write.result, write.error, write.events = None, None, []
            if not write.keep:
                write.error = error
                done.append(write)
                continue
            if write.key is not None:
                replaced = [kept for kept in self._kept if kept.key == write.key]
                self._kept = [kept for kept in self._kept if kept.key != write.key]
                done += replaced
            self._kept.append(write)
        return done

    def _store_error(self, what: str, exc: BaseException) -> StoreError:
        return StoreError.with_code(self._backend.fault_code(exc), f"{what}: {exc}")

    def _publish(self, events: list[Event]) -> None:
        """Committed events to the hub: at once where this daemon is the database's only
        writer; through the tail, in seq order among the other daemons', where it is not."""
        if self._tail is not None:
            self._tail.committed(events)
        else:
            self._hub.publish(events)

    def _deliver(self, done: list[PendingWrite[Any]], fault: StoreError | None) -> None:
        if fault is not None:
            self.health.failed(fault)
        retry_after = self.health.retry_after()
        for write in done:
            if isinstance(write.error, StoreError):
                write.error.retry_after = retry_after
            elif write.keep and write.error is not None:
                # Nobody may be waiting on a kept write: its own failure is said here.
                log.error(
                    "a kept write failed", error=f"{type(write.error).__name__}: {write.error}"
                )
            write.done.set()
        self._publish([event for write in done for event in write.events])

    async def write(self, apply: Write[T], *, solo: bool = False) -> T:
        """Run `apply(conn, events)` in a transaction; returns once it is committed.

        `apply` appends the Event rows it adds to `events`; they are inserted with it and
        published after the commit. A write that was handed over is committed even if the
        caller is cancelled while waiting. Raises StoreError when the database takes no
        writes (see `health`).
        """
        pending = self.hand_over(apply, solo=solo)
        if not self._threaded:
            await trio.lowlevel.checkpoint()
        return await pending.committed()

    def hand_over(
        self,
        apply: Write[T],
        *,
        solo: bool = False,
        keep: bool = False,
        key: Hashable | None = None,
    ) -> PendingWrite[T]:
        """Queue a write without waiting for it: whatever the caller does next (a message
        that leads to another write) is ordered after it.

        `keep`: a store fault does not fail the write; it is kept and committed first when the
        store takes writes again, and `committed()` waits for that. A kept write with a `key`
        is replaced by a later one kept under the same key (the earlier one then commits
        nothing, and its `committed()` returns None)."""
        assert not (solo and keep), "maintenance is not kept through a fault"
        pending = PendingWrite(apply, solo=solo, keep=keep, key=key)
        if self._threaded:
            self._queue.put(pending)
        else:
            self._deliver(*self._commit([pending]))
        return pending

    async def write_or_keep(self, apply: Write[T], *, key: Hashable | None = None) -> T | None:
        """Write now and return the write's result; or, when the database takes no writes,
        keep the write and commit it first when it does again, without waiting for that, and
        return None.

        For what already happened and must not be lost (a call's cost, a heartbeat, a
        breaker's state), where the caller cannot wait for the disk."""
        try:
            return await self.write(apply)
        except StoreError:
            self.hand_over(apply, keep=True, key=key)
            return None

    # -- health ---------------------------------------------------------------------------

    async def probe_while_faulted(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """While the store takes no writes, try one after PROBE_FIRST seconds, then twice as
        long each time up to PROBE_MAX (trio's clock): the first that commits ends the fault,
        with the kept writes ahead of it. Runs for as long as the store is open."""
        task_status.started()
        while True:
            await self.health.wait_faulted()
            delay = PROBE_FIRST
            while self.health.fault is not None:
                self.health.next_probe_at = trio.current_time() + delay
                await trio.sleep(delay)
                if await self._probe(self.health.fault):
                    self.health.recovered()
                delay = min(2 * delay, PROBE_MAX)
            self.health.next_probe_at = None

    async def _probe(self, fault: StoreFault) -> bool:
        """Whether a write with room in it commits now."""
        try:
            if fault.code == "STORAGE_FULL":
                # The write-ahead log may hold the space a write needs: folding it back into
                # the database (and truncating it) gives that space back when it can.
                await self.checkpoint_wal()
            elif self.path != IN_MEMORY:
                # A file that was read-only when SQLite opened it stays read-only for that
                # connection, however the file changes: a fresh one sees the file as it is.
                # A PostgreSQL connection lost in a restart is gone for good.
                await self.write(self._reconnect_writer, solo=True)
        except StoreError:
            pass  # the write below says whether the store takes writes
        probe = {"at": self._clock.now(), "room": "." * PROBE_ROOM}
        try:
            await self.write(partial(set_setting, key=PROBE_SETTING, value=probe))
        except StoreError:
            return False
        return True

    def _reconnect_writer(self, conn: Any, events: Events) -> None:
        self._writer = self._backend.connect(self.path, self._synchronous)
        with contextlib.suppress(self._backend.DatabaseError):
            conn.close()

    # -- the read path --------------------------------------------------------------------

    async def checkpoint_wal(self) -> None:
        """Fold the WAL back into the database file; done when idle, outside any transaction."""

        def apply(conn: Any, events: Events) -> None:
            self._backend.checkpoint_wal(conn)

        await self.write(apply, solo=True)

    async def read(self, query: Query[T]) -> T:
        delay = READ_RETRY_FIRST
        while True:
            try:
                if not self._threaded:
                    await trio.lowlevel.checkpoint()
                    return self._read_now(query)
                return await trio.to_thread.run_sync(
                    self._read_now, query, limiter=self._read_limiter
                )
            except self._backend.DatabaseError as exc:
                if not self._backend.is_disconnect(exc):
                    raise
                if delay == READ_RETRY_FIRST:
                    log.warning("store read waits for the database", error=str(exc))
            await trio.sleep(delay)
            delay = min(2 * delay, READ_RETRY_MAX)

    def _read_now(self, query: Query[T]) -> T:
        """Run `query`; a connection lost before is replaced first (one read at a time)."""
        if self._reader is None:
            self._reader = self._backend.connect_reader(self.path, self._synchronous, self._writer)
        try:
            return query(self._reader)
        except self._backend.DatabaseError as exc:
            if self._backend.is_disconnect(exc):
                lost, self._reader = self._reader, None
                with contextlib.suppress(self._backend.DatabaseError):
                    lost.close()
            raise
