"""The load test's queries: every row its report reads from the jobs, events and ledger after a
run (daemon/tools/report.py turns them into figures and renders them)."""

from __future__ import annotations

import sqlite3
from typing import Any, NamedTuple

from jobwarden.store import ledger


class StatusEvent(NamedTuple):
    job_id: int
    at: float
    status: str
    reason: str | None
    error_code: str | None
    error_message: str | None


class BreakerChange(NamedTuple):
    at: float
    service: str
    state: str


class ServiceTotals(NamedTuple):
    service: str
    calls: int
    failed: int
    units: float
    usd: float


def spend_so_far(conn: sqlite3.Connection) -> tuple[int, float]:
    """Calls booked and what they cost, over the whole ledger."""
    return conn.execute("SELECT COUNT(*), COALESCE(SUM(usd), 0) FROM ledger").fetchone()


_JOB_ROW_KEYS = (
    "id",
    "user",
    "status",
    "created_at",
    "started_at",
    "finished_at",
    "attempt",
    "reason",
    "degraded",
    "placeholders",
    "code",
)


def job_rows(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    """Every job, oldest first: its times, and from its result whether it was degraded (and
    by how many placeholders), from its error the code."""
    rows = conn.execute(
        "SELECT id, user, status, created_at, started_at, finished_at, attempt, reason, "
        "json_extract(result, '$.degraded'), json_extract(result, '$.placeholders'), "
        "json_extract(error, '$.code') FROM jobs ORDER BY id"
    ).fetchall()
    return [dict(zip(_JOB_ROW_KEYS, row, strict=True)) for row in rows]


def cost_by_job(conn: sqlite3.Connection) -> dict[int, float]:
    rows = conn.execute(
        "SELECT job_id, SUM(usd) FROM ledger WHERE job_id IS NOT NULL GROUP BY job_id"
    ).fetchall()
    return dict(rows)


def status_events(
    conn: sqlite3.Connection, *, reason: str | None = None, error_code: str | None = None
) -> list[StatusEvent]:
    """Every status event in order, or only those with this reason or this error code."""
    clauses, params = ["type = 'status'"], []
    if reason is not None:
        clauses.append("json_extract(data, '$.reason') = ?")
        params.append(reason)
    if error_code is not None:
        clauses.append("json_extract(data, '$.error.code') = ?")
        params.append(error_code)
    rows = conn.execute(
        "SELECT job_id, at, json_extract(data, '$.status'), json_extract(data, '$.reason'), "
        "json_extract(data, '$.error.code'), json_extract(data, '$.error.message') "
        f"FROM events WHERE {' AND '.join(clauses)} ORDER BY seq",
        params,
    ).fetchall()
    return [StatusEvent(*row) for row in rows]


class CallTry(NamedTuple):
    job_id: int | None
    service: str
    ok: bool
    at: float


def call_tries(conn: sqlite3.Connection) -> list[CallTry]:
    """Every try of a provider call, as the ledger booked it, in booking order."""
    rows = conn.execute("SELECT job_id, service, ok, at FROM ledger ORDER BY id").fetchall()
    return [CallTry(job, service, bool(ok), at) for job, service, ok, at in rows]


def service_totals(conn: sqlite3.Connection) -> list[ServiceTotals]:
    rows = conn.execute(
        "SELECT service, COUNT(*), SUM(1 - ok), SUM(units), SUM(usd) FROM ledger "
        "GROUP BY service ORDER BY service"
    ).fetchall()
    return [ServiceTotals(*row) for row in rows]


def ledger_days(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    """Each budget day's totals by the same query `jobwarden ledger --day` answers with."""
    days = [day for (day,) in conn.execute("SELECT DISTINCT day FROM ledger ORDER BY day")]
    return [ledger.report(conn, period=day, by="service") for day in days]


def breaker_changes(conn: sqlite3.Connection) -> list[BreakerChange]:
    rows = conn.execute(
        "SELECT at, json_extract(data, '$.service'), json_extract(data, '$.state') "
        "FROM events WHERE type = 'breaker' ORDER BY seq"
    ).fetchall()
    return [BreakerChange(*row) for row in rows]


def spend_by_call(conn: sqlite3.Connection) -> list[tuple[float, float]]:
    """When each call was booked and what it cost, in booking order."""
    return conn.execute("SELECT at, usd FROM ledger ORDER BY id").fetchall()
