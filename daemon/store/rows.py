"""What the query modules share: job rows to views, JSON columns, event rows, and writes that
fail one item at a time."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import msgspec

from jobwarden.store.backend import backend_of
from jobwarden.store.sqlite import Connection
from jobwarden.wire.views import ErrorBody, Event, JobView

T = TypeVar("T")
X = TypeVar("X")
# The event rows a write adds; the engine inserts them when the write returns.
Events = list[Event]

_json = msgspec.json.Encoder()
_decode_error = msgspec.json.Decoder(ErrorBody)


def dump_json(value: Any) -> str | None:
    return None if value is None else _json.encode(value).decode()


def load_json(text: str | None) -> Any:
    return None if text is None else msgspec.json.decode(text)


JOB_COLUMNS = (
    'id, kind, "user", status, priority, attempt, max_attempts, created_at, updated_at, '
    "available_at, started_at, finished_at, progress, message, reason, idempotency_key, "
    "result, error, run_at, after_ids, after_any, held, tags, schedule, payload, checkpoint"
)
# The bits of jobs.held: an operator's hold of the job, and a copy of its user's hold.
JOB_HELD = 1
USER_HELD = 2
LIST_COLUMNS = JOB_COLUMNS.replace(", payload, checkpoint", "")
_LIST_WIDTH = len(LIST_COLUMNS.split(","))


def job_from_row(row: Sequence[Any]) -> JobView:
    full = len(row) > _LIST_WIDTH
    job = JobView(
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
        result=load_json(row[16]),
        error=None if row[17] is None else _decode_error.decode(row[17]),
        schedule=row[23],
        payload=load_json(row[24]) if full else None,
        checkpoint=load_json(row[25]) if full else None,
    )
    # Most jobs have none of these: setting them only when given keeps dispatch's cost per
    # job where it was.
    # run_at, after_ids (after_any goes with it), held, tags.
    if row[18] is not None or row[19] is not None or row[21] or row[22] is not None:
        job.run_at = row[18]
        job.after = load_json(row[19]) or []
        job.after_any = bool(row[20])
        # The user's hold is shown with the user.
        job.held = bool(row[21] & JOB_HELD)
        job.tags = load_json(row[22]) or []
    return job


def row_lock(conn: Connection) -> str:
    """The phrase that ends a SELECT to lock the rows it reads until the transaction ends, so
    that two daemons cannot both decide on the same guard row: none on SQLite, whose one
    writer holds the whole database for its transaction; ` FOR UPDATE` on PostgreSQL."""
    return " FOR UPDATE" if backend_of(conn).NAME == "postgresql" else ""


def placeholders(values: Iterable[Any]) -> str:
    """The `?`s of an IN list. An empty list is `NULL`, which no value is IN: PostgreSQL
    refuses `IN ()`, which SQLite takes. (A NOT IN must not be built from an empty list:
    NOT IN (NULL) is true of no row.)"""
    return ", ".join("?" for _ in values) or "NULL"


def each(
    applies: Sequence[Callable[[Connection, Events], T]],
) -> Callable[[Connection, Events], list[T | Exception]]:
    """Several writes as one, each isolated: one that fails comes back as its exception, in
    its place, and the others land."""

    def apply(conn: Connection, events: Events) -> list[T | Exception]:
        return apply_each(conn, events, applies, lambda one: one(conn, events))

    return apply


def apply_each(
    conn: Connection,
    events: Events,
    items: Sequence[X],
    apply_one: Callable[[X], T],
    *,
    reset: Callable[[], None] | None = None,
) -> list[T | Exception]:
    """`apply_one(item)` for each item, where one that raises fails alone.

    All items go in one savepoint first. If one raises, all are rolled back (and `reset`
    called, to forget what they left in memory), then applied again in a savepoint each, so
    that only the failing ones fail. A savepoint per item from the start would cost more than
    the items: SQLite copies every page a savepoint changes first. A database that fails
    (disk full, I/O error) fails every item alike, and a deadlock's victim is the whole
    write's to run again: those are raised, for the engine to handle.
    """
    backend = backend_of(conn)

    def for_the_engine(exc: Exception) -> bool:
        return backend.is_fault(exc) or backend.is_retryable(exc)

    mark = len(events)
    conn.execute("SAVEPOINT batch")
    try:
        results: list[T | Exception] = [apply_one(item) for item in items]
    except Exception as exc:
        if for_the_engine(exc):
            raise
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
            if for_the_engine(exc):
                raise
            conn.execute("ROLLBACK TO item")
            del events[mark:]
            results.append(exc)
        conn.execute("RELEASE item")
    return results


def add_event(
    events: Events,
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


EventRow = tuple[int, str, str, str, float, str | None]


def event_rows(events: Events) -> list[EventRow]:
    """A write's events as the rows to insert: encoded while the write can still fail alone
    (data that is not JSON fails its write, not the transaction)."""
    return [
        (event.job, event.user, event.kind, event.type, event.at, dump_json(event.data))
        for event in events
    ]


def insert_events(conn: Connection, events: Events, rows: list[EventRow]) -> None:
    """Insert a transaction's event rows, last before its commit, in multi-row statements,
    and give each its seq.

    The seq order must be the commit order, so that a reader resuming after seq N never
    misses one below N committed later; the backend sees to it (`order_events`): SQLite has
    one writer; PostgreSQL numbers under a lock held to the commit. Inserting them last keeps
    that lock short. One statement per event would cost a SQLite step each, and each step
    gives the GIL away and waits to get it back from the trio thread.
    """
    if not events:
        return
    backend = backend_of(conn)
    backend.order_events(conn)
    for start in range(0, len(events), EVENT_ROWS_PER_INSERT):
        chunk = events[start : start + EVENT_ROWS_PER_INSERT]
        seqs = backend.insert_ids(
            conn,
            'INSERT INTO events (job_id, "user", kind, type, at, data) VALUES '
            + ", ".join(["(?, ?, ?, ?, ?, ?)"] * len(chunk)),
            [value for row in rows[start : start + EVENT_ROWS_PER_INSERT] for value in row],
            "seq",
            len(chunk),
        )
        for event, seq in zip(chunk, seqs, strict=True):
            event.seq = seq
