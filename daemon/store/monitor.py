"""The rows the monitor's rules look at: running jobs, queued jobs that may be late, and what
became of jobs found stuck."""

from __future__ import annotations

import sqlite3
from typing import NamedTuple

import msgspec

from jobwarden.store.rows import placeholders


class Row(NamedTuple):
    id: int
    kind: str
    status: str
    created_at: float
    started_at: float | None
    heartbeat_at: float | None
    progress_at: float | None
    progress: float | None
    attempt: int
    max_attempts: int
    available_at: float
    # When it was submitted to start (None: at once): its SLA counts from then.
    run_at: float | None = None
    # Held by an operator, its user on hold, or waiting for jobs it runs after: not late.
    held_back: bool = False

    @property
    def asked_for(self) -> float:
        """When the submitter wanted it to start: the SLA's clock."""
        return self.created_at if self.run_at is None else self.run_at


class Candidates(msgspec.Struct):
    running: list[Row]
    queued: list[Row]
    oldest_available_at: float | None
    oldest_created_at: float | None


_ROW_COLUMNS = ", ".join(f"jobs.{field}" for field in Row._fields[:-1]) + (
    ", jobs.held != 0 OR jobs.after_pending > 0 OR COALESCE(users.held, 0) = 1"
)
_ROWS = f'SELECT {_ROW_COLUMNS} FROM jobs LEFT JOIN users ON users.name = jobs."user"'


def find_candidates(
    conn: sqlite3.Connection,
    *,
    node: int,
    queued: bool,
    queued_before: float,
    created_before: float,
) -> Candidates:
    """The jobs running on `node`, and, if `queued`, the queued jobs that may have passed a
    queued or SLA limit (those are the maintenance role's)."""
    running = conn.execute(f"{_ROWS} WHERE jobs.status = 'running' AND jobs.node = ?", (node,))
    running_rows = [Row(*r[:-1], bool(r[-1])) for r in running]
    if not queued:
        return Candidates(running_rows, [], None, None)
    rows = conn.execute(
        f"{_ROWS} WHERE jobs.status = 'queued' "
        "AND (jobs.available_at <= ? OR COALESCE(jobs.run_at, jobs.created_at) <= ?)",
        (queued_before, created_before),
    )
    queued_rows = [Row(*r[:-1], bool(r[-1])) for r in rows]
    oldest_available, oldest_created = conn.execute(
        "SELECT MIN(available_at), MIN(COALESCE(run_at, created_at)) FROM jobs "
        "WHERE status = 'queued'"
    ).fetchone()
    return Candidates(running_rows, queued_rows, oldest_available, oldest_created)


class StuckRow(NamedTuple):
    id: int
    status: str
    attempt: int
    started_at: float | None
    heartbeat_at: float | None


def stuck_rows(conn: sqlite3.Connection, job_ids: list[int]) -> list[StuckRow]:
    """What became of jobs the rules found stuck: enough to tell whether they still are."""
    if not job_ids:
        return []
    rows = conn.execute(
        f"SELECT {', '.join(StuckRow._fields)} FROM jobs WHERE id IN ({placeholders(job_ids)})",
        job_ids,
    )
    return [StuckRow(*row) for row in rows]
