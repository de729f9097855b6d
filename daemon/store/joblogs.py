"""Jobs' own output, kept per job within a size: appending a flush's lines, reading them.

A job's row counts the bytes its lines hold (`log_bytes`) and how many older lines were
dropped to stay within the size (`log_dropped`); the lines go when the job is pruned.
"""

from __future__ import annotations

import sqlite3
from itertools import groupby

import msgspec

from jobwarden.store.rows import Events
from jobwarden.wire.views import JobLog, LogLine

# Old lines read at a time while making room.
DROP_PAGE = 256


class NewLine(msgspec.Struct, frozen=True, array_like=True):
    """A line to keep, as the pool collected it (already clipped and made printable)."""

    job_id: int
    attempt: int
    at: float
    stream: str
    line: str


def _size(line: NewLine) -> int:
    return len(line.line.encode()) + 1


def append(
    conn: sqlite3.Connection, events: Events, *, lines: list[NewLine], max_bytes: int
) -> int:
    """Keep `lines` (in order) with their jobs, each job's within `max_bytes`: past it its
    oldest lines are dropped and counted. Lines of a job that is gone (pruned) are not kept.
    Returns how many lines were kept."""
    kept = 0
    for job_id, group in groupby(lines, key=lambda line: line.job_id):
        batch = list(group)
        added = sum(_size(line) for line in batch)
        row = conn.execute(
            "UPDATE jobs SET log_bytes = log_bytes + ? WHERE id = ? RETURNING log_bytes",
            (added, job_id),
        ).fetchall()
        if not row:
            continue
        conn.executemany(
            "INSERT INTO job_logs (job_id, attempt, at, stream, line, size) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            [(job_id, x.attempt, x.at, x.stream, x.line, _size(x)) for x in batch],
        )
        kept += len(batch)
        excess = row[0][0] - max_bytes
        if excess > 0:
            _drop_oldest(conn, job_id, excess)
    return kept


def _drop_oldest(conn: sqlite3.Connection, job_id: int, excess: int) -> None:
    """Drop a job's oldest lines until `excess` bytes are freed, reading only as many."""
    freed, dropped, last_id = 0, 0, 0
    while freed < excess:
        rows = conn.execute(
            "SELECT id, size FROM job_logs WHERE job_id = ? AND id > ? ORDER BY id LIMIT ?",
            (job_id, last_id, DROP_PAGE),
        ).fetchall()
        if not rows:
            break
        for line_id, size in rows:
            freed += size
            dropped += 1
            last_id = line_id
            if freed >= excess:
                break
    conn.execute("DELETE FROM job_logs WHERE job_id = ? AND id <= ?", (job_id, last_id))
    conn.execute(
        "UPDATE jobs SET log_bytes = log_bytes - ?, log_dropped = log_dropped + ? WHERE id = ?",
        (freed, dropped, job_id),
    )


def read(conn: sqlite3.Connection, *, job_id: int, after: int, limit: int) -> JobLog | None:
    """Up to `limit` of a job's lines after line id `after`, oldest first; None: no such job."""
    conn.execute("BEGIN")
    try:
        row = conn.execute("SELECT log_dropped FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            return None
        lines = conn.execute(
            "SELECT id, attempt, at, stream, line FROM job_logs "
            "WHERE job_id = ? AND id > ? ORDER BY id LIMIT ?",
            (job_id, after, limit),
        ).fetchall()
    finally:
        conn.execute("COMMIT")
    return JobLog(row[0], [LogLine(*line) for line in lines])
