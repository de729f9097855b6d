"""The ledger's rows: one per external call, what it cost and to whom, and what it cost beyond
its reservation (`overrun_usd`), kept when finished jobs are pruned; totals by budget day and
month, and reports by service, user or kind."""

from __future__ import annotations

import sqlite3
from typing import Any

from jobwarden.store.rows import Events, add_event


def record_entry(conn: sqlite3.Connection, events: Events, *, entry: tuple) -> None:
    """A ledger row and, for a job's call, a `cost` event with the job's running total, so
    its watchers see what it spends as it spends it."""
    conn.execute(
        'INSERT INTO ledger (job_id, "user", kind, service, units, usd, ok, at, day, month, '
        "overrun_usd) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        entry,
    )
    job_id, user, kind, service, units, usd, ok, at, _, _, overrun_usd = entry
    if job_id:
        job_usd = job_spend(conn, job_id=job_id)
        data = {
            "service": service,
            "units": units,
            "usd": usd,
            "ok": bool(ok),
            "job_usd": job_usd,
            "overrun_usd": overrun_usd,
        }
        add_event(events, (job_id, user, kind), "cost", at, data)


def spent(conn: sqlite3.Connection, *, day: str, month: str) -> tuple[float, float]:
    today = conn.execute("SELECT COALESCE(SUM(usd), 0) FROM ledger WHERE day = ?", (day,))
    this_month = conn.execute("SELECT COALESCE(SUM(usd), 0) FROM ledger WHERE month = ?", (month,))
    return today.fetchone()[0], this_month.fetchone()[0]


def job_spend(conn: sqlite3.Connection, *, job_id: int) -> float:
    """What a job's calls have cost so far, over all its attempts."""
    row = conn.execute("SELECT COALESCE(SUM(usd), 0) FROM ledger WHERE job_id = ?", (job_id,))
    return row.fetchone()[0]


def report(conn: sqlite3.Connection, *, period: str, by: str) -> dict[str, Any]:
    """A day's (YYYY-MM-DD) or a month's (YYYY-MM) calls and spend, grouped `by` service,
    user or kind, the costliest group first."""
    column = {"service": "service", "user": '"user"', "kind": "kind"}[by]
    where = "day = ?" if len(period) == 10 else "month = ?"
    groups = conn.execute(
        f"SELECT {column}, COUNT(*), SUM(1 - ok), SUM(units), SUM(usd) FROM ledger "
        f"WHERE {where} GROUP BY {column} ORDER BY SUM(usd) DESC",
        (period,),
    ).fetchall()
    calls, failed, usd, job_count, overruns, overrun_usd = conn.execute(
        f"SELECT COUNT(*), COALESCE(SUM(1 - ok), 0), COALESCE(SUM(usd), 0), "
        f"COUNT(DISTINCT job_id), COUNT(CASE WHEN overrun_usd > 0 THEN 1 END), "
        f"COALESCE(SUM(overrun_usd), 0) FROM ledger WHERE {where}",
        (period,),
    ).fetchone()
    return {
        "period": period,
        "by": by,
        "groups": [
            {by: name, "calls": n, "failed": f, "units": u, "usd": round(cost, 6)}
            for name, n, f, u, cost in groups
        ],
        "calls": calls,
        "failed_calls": failed,
        "usd": round(usd, 6),
        "jobs": job_count,
        "usd_per_job": round(usd / job_count, 6) if job_count else None,
        # Calls that cost more than they reserved, and by how much in all.
        "overruns": overruns,
        "overrun_usd": round(overrun_usd, 6),
    }
