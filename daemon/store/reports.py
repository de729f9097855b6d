"""The load test's queries: every row its report reads from the jobs, events and ledger after a
run (daemon/tools/report.py turns them into figures and renders them)."""

from __future__ import annotations

import sqlite3
from typing import Any, NamedTuple

from jobwarden.store import ledger
from jobwarden.store.rows import load_json


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
        'SELECT id, "user", status, created_at, started_at, finished_at, attempt, reason, '
        "result, error FROM jobs ORDER BY id"
    ).fetchall()
    found = []
    for *columns, result_text, error_text in rows:
        result, error = _fields(result_text), _fields(error_text)
        values = (*columns, result.get("degraded"), result.get("placeholders"), error.get("code"))
        found.append(dict(zip(_JOB_ROW_KEYS, values, strict=True)))
    return found


def _fields(text: str | None) -> dict[str, Any]:
    """A JSON column's object (read here, not by a JSON function: each backend has its own);
    empty for NULL or a value that is not an object."""
    value = load_json(text)
    return value if isinstance(value, dict) else {}


def cost_by_job(conn: sqlite3.Connection) -> dict[int, float]:
    rows = conn.execute(
        "SELECT job_id, SUM(usd) FROM ledger WHERE job_id IS NOT NULL GROUP BY job_id"
    ).fetchall()
    return dict(rows)


def status_events(
    conn: sqlite3.Connection, *, reason: str | None = None, error_code: str | None = None
) -> list[StatusEvent]:
    """Every status event in order, or only those with this reason or this error code."""
    rows = conn.execute(
        "SELECT job_id, at, data FROM events WHERE type = 'status' ORDER BY seq"
    ).fetchall()
    found = []
    for job_id, at, text in rows:
        data = _fields(text)
        error = data.get("error") if isinstance(data.get("error"), dict) else {}
        event = StatusEvent(
            job_id,
            at,
            data.get("status"),
            data.get("reason"),
            error.get("code"),
            error.get("message"),
        )
        if (reason is None or event.reason == reason) and (
            error_code is None or event.error_code == error_code
        ):
            found.append(event)
    return found


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
    rows = conn.execute("SELECT at, data FROM events WHERE type = 'breaker' ORDER BY seq")
    changes = []
    for at, text in rows:
        data = _fields(text)
        changes.append(BreakerChange(at, data.get("service"), data.get("state")))
    return changes


def spend_by_call(conn: sqlite3.Connection) -> list[tuple[float, float]]:
    """When each call was booked and what it cost, in booking order."""
    return conn.execute("SELECT at, usd FROM ledger ORDER BY id").fetchall()
