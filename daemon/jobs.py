"""Job transitions and queries, as functions of a SQLite connection.

Each transition changes a job row and adds one event row; it runs inside the store's writer
transaction via `store.write(partial(fn, ...))`. Transitions check the status they expect in
their WHERE clause, so a late or duplicate request (cancel after done, a second finish) changes
nothing and says so, instead of corrupting a job's history.
"""

from __future__ import annotations

import sqlite3
from typing import Any

import msgspec

from daemon.errors import new_error_id
from daemon.protocol import ErrorBody, Event, JobView
from daemon.store import (
    JOB_COLUMNS,
    LIST_COLUMNS,
    add_event,
    dump_json,
    fetch_job,
    job_from_row,
    placeholders,
)

Events = list[Event]
STATUSES = ("queued", "running", "done", "failed", "canceled")


class SQL(str):
    """A column expression, written into an UPDATE as is (never user input)."""


class ClaimResult(msgspec.Struct):
    jobs: list[JobView]
    # The earliest time a queued job (in an allowed kind) becomes available, if any waits.
    next_available_at: float | None


class NewJob(msgspec.Struct, frozen=True):
    kind: str
    user: str
    payload_json: str
    priority: int
    idempotency_key: str | None
    max_attempts: int


def insert(
    conn: sqlite3.Connection, events: Events, *, new: NewJob, now: float
) -> tuple[JobView, bool]:
    """Insert a queued job; with an idempotency key already used by this user, return that job."""
    if new.idempotency_key is not None:
        row = conn.execute(
            f"SELECT {JOB_COLUMNS} FROM jobs WHERE user = ? AND idempotency_key = ?",
            (new.user, new.idempotency_key),
        ).fetchone()
        if row is not None:
            return job_from_row(row), True
    row = conn.execute(
        "INSERT INTO jobs (kind, user, status, priority, payload, idempotency_key, max_attempts,"
        " created_at, updated_at, available_at) VALUES (?, ?, 'queued', ?, ?, ?, ?, ?, ?, ?)"
        f" RETURNING {JOB_COLUMNS}",
        (
            new.kind,
            new.user,
            new.priority,
            new.payload_json,
            new.idempotency_key,
            new.max_attempts,
            now,
            now,
            now,
        ),
    ).fetchall()[0]
    job = job_from_row(row)
    add_event(conn, events, job, "status", now, {"status": "queued", "attempt": 0})
    return job, False


def insert_many(
    conn: sqlite3.Connection, events: Events, *, batch: list[NewJob], now: float
) -> list[tuple[JobView, bool] | Exception]:
    """Insert a batch of submissions in one write; each in its own savepoint, so one that the
    database refuses is answered with its error while the others are accepted."""
    results: list[tuple[JobView, bool] | Exception] = []
    for new in batch:
        conn.execute("SAVEPOINT submission")
        mark = len(events)
        try:
            results.append(insert(conn, events, new=new, now=now))
        except sqlite3.Error as exc:
            conn.execute("ROLLBACK TO submission")
            del events[mark:]
            results.append(exc)
        conn.execute("RELEASE submission")
    return results


def claim(
    conn: sqlite3.Connection,
    events: Events,
    *,
    capacity: dict[str, int],
    total: int,
    now: float,
) -> ClaimResult:
    """Mark up to `total` due jobs running: priority first, then oldest, within each kind's
    free capacity. Kinds missing from `capacity` (paused, unknown, full) are not touched."""
    allowed = {kind for kind, free in capacity.items() if free > 0}
    free = dict(capacity)
    claimed: list[JobView] = []
    while total > 0 and allowed:
        kinds = sorted(allowed)
        # Walk the dispatch order and stop at `total` rows. Left to itself, SQLite picks the
        # (status, available_at) index and sorts every due row: 17 ms a round at 100k queued.
        rows = conn.execute(
            f"SELECT {JOB_COLUMNS} FROM jobs INDEXED BY jobs_order "
            f"WHERE status = 'queued' AND available_at <= ? "
            f"AND kind IN ({placeholders(kinds)}) ORDER BY priority DESC, id LIMIT ?",
            (now, *kinds, total),
        ).fetchall()
        skipped = False
        for row in rows:
            job = job_from_row(row)
            if free[job.kind] <= 0:
                # Its kind filled up earlier in this pass; the next query leaves it out.
                skipped = True
                continue
            attempt = job.attempt + 1
            # progress_at restarts with the attempt, so an old report cannot look like a stall.
            conn.execute(
                "UPDATE jobs SET status = 'running', attempt = ?, started_at = ?, updated_at = ?,"
                " heartbeat_at = ?, progress_at = NULL, reason = NULL WHERE id = ?",
                (attempt, now, now, now, job.id),
            )
            add_event(conn, events, job, "status", now, {"status": "running", "attempt": attempt})
            claimed.append(
                msgspec.structs.replace(
                    job, status="running", attempt=attempt, started_at=now, updated_at=now
                )
            )
            free[job.kind] -= 1
            total -= 1
            if free[job.kind] <= 0:
                allowed.discard(job.kind)
        if not skipped:
            break
    waiting = sorted(k for k, n in capacity.items() if n > 0)
    next_at = None
    if waiting:
        next_at = conn.execute(
            f"SELECT MIN(available_at) FROM jobs WHERE status = 'queued' AND available_at > ? "
            f"AND kind IN ({placeholders(waiting)})",
            (now, *waiting),
        ).fetchone()[0]
    return ClaimResult(jobs=claimed, next_available_at=next_at)


def _transition(
    conn: sqlite3.Connection,
    events: Events,
    job_id: int,
    *,
    expect: tuple[str, ...],
    status: str,
    reason: str | None,
    now: float,
    sets: dict[str, Any] | None = None,
    detail: dict[str, Any] | None = None,
) -> JobView | None:
    """Move a job to `status` if it is in one of the `expect` statuses; None if it is not.

    The event carries the new status, the reason, the attempt and any `detail`.
    """
    columns = {"status": status, "reason": reason, **(sets or {})}
    assignments = ", ".join(
        f"{column} = {value}" if isinstance(value, SQL) else f"{column} = ?"
        for column, value in columns.items()
    )
    values = [value for value in columns.values() if not isinstance(value, SQL)]
    rows = conn.execute(
        f"UPDATE jobs SET {assignments}, updated_at = ? "
        f"WHERE id = ? AND status IN ({placeholders(expect)}) RETURNING {JOB_COLUMNS}",
        (*values, now, job_id, *expect),
    ).fetchall()
    if not rows:
        return None
    job = job_from_row(rows[0])
    data = {"status": status, "attempt": job.attempt, **(detail or {})}
    if reason is not None:
        data["reason"] = reason
    add_event(conn, events, job, "status", now, data)
    return job


def finish(
    conn: sqlite3.Connection, events: Events, job_id: int, *, result: Any, now: float
) -> JobView | None:
    return _transition(
        conn,
        events,
        job_id,
        expect=("running",),
        status="done",
        reason=None,
        now=now,
        sets={"finished_at": now, "result": dump_json(result), "error": None},
        detail={"result": result},
    )


def fail(
    conn: sqlite3.Connection,
    events: Events,
    job_id: int,
    *,
    error: ErrorBody,
    now: float,
    expect: tuple[str, ...] = ("running",),
) -> JobView | None:
    return _transition(
        conn,
        events,
        job_id,
        expect=expect,
        status="failed",
        reason=error.code,
        now=now,
        sets={"finished_at": now, "error": dump_json(error)},
        detail={"error": msgspec.to_builtins(error)},
    )


def retry_later(
    conn: sqlite3.Connection,
    events: Events,
    job_id: int,
    *,
    error: ErrorBody,
    available_at: float,
    now: float,
) -> JobView | None:
    return _transition(
        conn,
        events,
        job_id,
        expect=("running",),
        status="queued",
        reason="RETRY",
        now=now,
        sets={"available_at": available_at, "error": dump_json(error)},
        detail={"available_at": available_at, "error": msgspec.to_builtins(error)},
    )


def cancel(
    conn: sqlite3.Connection,
    events: Events,
    job_id: int,
    *,
    now: float,
    expect: tuple[str, ...] = ("queued", "running"),
) -> JobView | None:
    return _transition(
        conn,
        events,
        job_id,
        expect=expect,
        status="canceled",
        reason="CANCELED",
        now=now,
        sets={"finished_at": now},
    )


def requeue_unspent(
    conn: sqlite3.Connection, events: Events, job_id: int, *, reason: str, now: float
) -> JobView | None:
    """Back to the queue without spending the attempt that was cut short: by a shutdown
    (INTERRUPTED) or by a call refused for budget (BUDGET_WAIT). The checkpoint stays."""
    return _transition(
        conn,
        events,
        job_id,
        expect=("running",),
        status="queued",
        reason=reason,
        now=now,
        sets={"available_at": now, "attempt": SQL("attempt - 1")},
    )


def requeue_manual(
    conn: sqlite3.Connection, events: Events, job_id: int, *, max_attempts: int, now: float
) -> JobView | None:
    """An operator's retry of a finished job: a fresh set of attempts, checkpoint kept."""
    return _transition(
        conn,
        events,
        job_id,
        expect=("failed", "canceled"),
        status="queued",
        reason="MANUAL_RETRY",
        now=now,
        sets={
            "available_at": now,
            "attempt": 0,
            "recoveries": 0,
            "max_attempts": max_attempts,
            "finished_at": None,
            "error": None,
        },
    )


def report_progress(
    conn: sqlite3.Connection,
    events: Events,
    job_id: int,
    *,
    fraction: float,
    message: str | None,
    now: float,
) -> bool:
    cursor = conn.execute(
        "UPDATE jobs SET progress = ?, message = ?, heartbeat_at = ?, updated_at = ?, "
        "progress_at = CASE WHEN progress IS ? AND progress_at IS NOT NULL "
        "THEN progress_at ELSE ? END "
        "WHERE id = ? AND status = 'running' RETURNING user, kind",
        (fraction, message, now, now, fraction, now, job_id),
    )
    # Step a RETURNING statement to its end, or it stays open and blocks the next savepoint.
    rows = cursor.fetchall()
    if not rows:
        return False
    row = rows[0]
    data: dict[str, Any] = {"fraction": fraction}
    if message is not None:
        data["message"] = message
    add_event(conn, events, (job_id, row[0], row[1]), "progress", now, data)
    return True


def heartbeat(conn: sqlite3.Connection, events: Events, job_id: int, *, now: float) -> bool:
    cursor = conn.execute(
        "UPDATE jobs SET heartbeat_at = ? WHERE id = ? AND status = 'running'", (now, job_id)
    )
    return cursor.rowcount > 0


def prune_finished(conn: sqlite3.Connection, events: Events, *, before: float, batch: int) -> int:
    """Delete up to `batch` jobs that finished before `before`, with their events."""
    ids = [
        row[0]
        for row in conn.execute(
            "SELECT id FROM jobs WHERE status IN ('done', 'failed', 'canceled') "
            "AND finished_at < ? LIMIT ?",
            (before, batch),
        )
    ]
    if ids:
        conn.execute(f"DELETE FROM events WHERE job_id IN ({placeholders(ids)})", ids)
        conn.execute(f"DELETE FROM jobs WHERE id IN ({placeholders(ids)})", ids)
    return len(ids)


def save_checkpoint(
    conn: sqlite3.Connection, events: Events, job_id: int, *, checkpoint: Any, now: float
) -> bool:
    cursor = conn.execute(
        "UPDATE jobs SET checkpoint = ?, heartbeat_at = ?, updated_at = ? "
        "WHERE id = ? AND status = 'running'",
        (dump_json(checkpoint), now, now, job_id),
    )
    return cursor.rowcount > 0


def recover_running(
    conn: sqlite3.Connection, events: Events, *, now: float, crash_loop_after: int
) -> dict[str, int]:
    """At start-up: jobs left `running` by a crash go back to the queue (RECOVERED); one that
    has now been running at `crash_loop_after` crashes fails CRASH_LOOP."""
    rows = conn.execute(
        "SELECT id, user, kind, recoveries, attempt FROM jobs WHERE status = 'running'"
    ).fetchall()
    counts = {"recovered": 0, "crash_loop": 0}
    for job_id, user, kind, recoveries, attempt in rows:
        recoveries += 1
        if recoveries >= crash_loop_after:
            error = ErrorBody(
                code="CRASH_LOOP",
                message=f"the daemon stopped {recoveries} times while this job was running",
                retryable=False,
                error_id=new_error_id(),
            )
            conn.execute(
                "UPDATE jobs SET status = 'failed', recoveries = ?, finished_at = ?,"
                " updated_at = ?, error = ?, reason = 'CRASH_LOOP' WHERE id = ?",
                (recoveries, now, now, dump_json(error), job_id),
            )
            add_event(
                conn,
                events,
                (job_id, user, kind),
                "status",
                now,
                {"status": "failed", "reason": "CRASH_LOOP", "error": msgspec.to_builtins(error)},
            )
            counts["crash_loop"] += 1
            continue
        conn.execute(
            "UPDATE jobs SET status = 'queued', recoveries = ?, available_at = ?, updated_at = ?,"
            " reason = 'RECOVERED' WHERE id = ?",
            (recoveries, now, now, job_id),
        )
        add_event(
            conn,
            events,
            (job_id, user, kind),
            "status",
            now,
            {"status": "queued", "reason": "RECOVERED", "attempt": attempt},
        )
        counts["recovered"] += 1
    return counts


def set_setting(conn: sqlite3.Connection, events: Events, key: str, value: Any) -> None:
    conn.execute(
        "INSERT INTO settings (key, value) VALUES (?, ?) "
        "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        (key, dump_json(value)),
    )


# -- queries (read connection) --------------------------------------------------------------


def get_setting(conn: sqlite3.Connection, key: str, default: Any = None) -> Any:
    row = conn.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
    return default if row is None else msgspec.json.decode(row[0])


def get_job(conn: sqlite3.Connection, job_id: int) -> JobView | None:
    return fetch_job(conn, job_id)


def list_jobs(
    conn: sqlite3.Connection,
    *,
    statuses: list[str] | None,
    kind: str | None,
    user: str | None,
    limit: int,
) -> list[JobView]:
    clauses, params = [], []
    if statuses:
        clauses.append(f"status IN ({placeholders(statuses)})")
        params.extend(statuses)
    if kind is not None:
        clauses.append("kind = ?")
        params.append(kind)
    if user is not None:
        clauses.append("user = ?")
        params.append(user)
    where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
    rows = conn.execute(
        f"SELECT {LIST_COLUMNS} FROM jobs {where} ORDER BY id DESC LIMIT ?", (*params, limit)
    ).fetchall()
    return [job_from_row(row) for row in rows]


def events_since(
    conn: sqlite3.Connection,
    *,
    since: int,
    job: int | None = None,
    user: str | None = None,
    limit: int = 1000,
) -> list[Event]:
    clauses, params = ["seq > ?"], [since]
    if job is not None:
        clauses.append("job_id = ?")
        params.append(job)
    if user is not None:
        clauses.append("user = ?")
        params.append(user)
    rows = conn.execute(
        f"SELECT seq, job_id, user, kind, type, at, data FROM events "
        f"WHERE {' AND '.join(clauses)} ORDER BY seq LIMIT ?",
        (*params, limit),
    ).fetchall()
    return [
        Event(seq=r[0], job=r[1], user=r[2], kind=r[3], type=r[4], at=r[5], data=_loads(r[6]))
        for r in rows
    ]


def job_with_events(
    conn: sqlite3.Connection, job_id: int, limit: int
) -> tuple[JobView | None, list[Event]]:
    """A job and its latest events from one snapshot: a job that finishes between two
    separate reads would otherwise look running beside its own terminal event."""
    conn.execute("BEGIN")
    try:
        return get_job(conn, job_id), recent_events(conn, job_id, limit)
    finally:
        conn.execute("COMMIT")


def last_seq(conn: sqlite3.Connection) -> int:
    return conn.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()[0]


def recent_events(conn: sqlite3.Connection, job_id: int, limit: int) -> list[Event]:
    rows = conn.execute(
        "SELECT seq, job_id, user, kind, type, at, data FROM events WHERE job_id = ? "
        "ORDER BY seq DESC LIMIT ?",
        (job_id, limit),
    ).fetchall()
    return [
        Event(seq=r[0], job=r[1], user=r[2], kind=r[3], type=r[4], at=r[5], data=_loads(r[6]))
        for r in reversed(rows)
    ]


def _loads(text: str) -> dict[str, Any]:
    return msgspec.json.decode(text)


def counts_by_status(conn: sqlite3.Connection) -> dict[str, int]:
    rows = conn.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall()
    return {status: n for status, n in rows}


def queued_by_kind(conn: sqlite3.Connection) -> dict[str, int]:
    rows = conn.execute(
        "SELECT kind, COUNT(*) FROM jobs WHERE status = 'queued' GROUP BY kind"
    ).fetchall()
    return {kind: n for kind, n in rows}


def counts_by_status_and_kind(conn: sqlite3.Connection) -> dict[tuple[str, str], int]:
    rows = conn.execute("SELECT status, kind, COUNT(*) FROM jobs GROUP BY status, kind")
    return {(status, kind): n for status, kind, n in rows}


def oldest_queued_created_at(conn: sqlite3.Connection) -> float | None:
    return conn.execute("SELECT MIN(created_at) FROM jobs WHERE status = 'queued'").fetchone()[0]
