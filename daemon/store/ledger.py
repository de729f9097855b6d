"""The ledger's rows: one per external call, what it cost and to whom, and what it cost beyond
its reservation (`overrun_usd`), kept when finished jobs are pruned; totals by budget day and
month, and reports by service, user or kind.

The budget is decided here for every daemon on the database. `budget_spend` keeps the spend of
each budget day and month beside the rows; a reservation locks its day's and month's rows
(`lock_spend`), sums the open reservations and inserts its own in one transaction, and a
booking deletes its reservation and adds to both totals in one transaction. A reservation is
held by one daemon (`holder`) under a lease that daemon renews; one whose daemon died stops
counting when its lease runs out.
"""

from __future__ import annotations

import sqlite3
from typing import Any

from jobwarden.store.rows import Events, add_event, row_lock


def lock_spend(conn: sqlite3.Connection, *, day: str, month: str) -> tuple[float, float]:
    """The spend of `day` and `month`, their rows locked until the transaction ends: every
    reservation and booking takes them in this one order (the month's name sorts first)."""
    conn.execute(
        "INSERT INTO budget_spend (period, usd) VALUES (?, 0), (?, 0) ON CONFLICT DO NOTHING",
        (month, day),
    )
    rows = dict(
        conn.execute(
            "SELECT period, usd FROM budget_spend WHERE period IN (?, ?) "
            f"ORDER BY period{row_lock(conn)}",
            (month, day),
        ).fetchall()
    )
    return rows[day], rows[month]


def reserved(conn: sqlite3.Connection, *, now: float) -> float:
    """What the open reservations hold, those whose lease has not run out."""
    return conn.execute(
        "SELECT COALESCE(SUM(usd), 0) FROM budget_reservations WHERE expires_at > ?", (now,)
    ).fetchone()[0]


def add_reservation(
    conn: sqlite3.Connection,
    *,
    holder: str,
    job_id: int | None,
    service: str,
    usd: float,
    now: float,
    expires_at: float,
) -> int:
    """A reservation's row; its id. Reservations whose lease ran out go first."""
    conn.execute("DELETE FROM budget_reservations WHERE expires_at <= ?", (now,))
    return conn.execute(
        "INSERT INTO budget_reservations (holder, job_id, service, usd, expires_at) "
        "VALUES (?, ?, ?, ?, ?) RETURNING id",
        (holder, job_id, service, usd, expires_at),
    ).fetchone()[0]


def release(conn: sqlite3.Connection, events: Events, *, reservation_id: int) -> None:
    """A reservation whose call was never made."""
    conn.execute("DELETE FROM budget_reservations WHERE id = ?", (reservation_id,))


def renew(conn: sqlite3.Connection, events: Events, *, holder: str, expires_at: float) -> None:
    """The lease of every reservation `holder` still holds, renewed: its daemon is alive."""
    conn.execute(
        "UPDATE budget_reservations SET expires_at = ? WHERE holder = ?", (expires_at, holder)
    )


def book(
    conn: sqlite3.Connection, events: Events, *, entry: tuple, reservation_id: int | None
) -> tuple[float, float]:
    """A call booked as it happened, in one transaction: its reservation (if any) ends, its
    row is written, and the day's and month's spend grow by its cost. Returns those totals,
    with every daemon's bookings in them."""
    day, month, usd = entry[8], entry[9], entry[5]
    lock_spend(conn, day=day, month=month)
    if reservation_id is not None:
        conn.execute("DELETE FROM budget_reservations WHERE id = ?", (reservation_id,))
    record_entry(conn, events, entry=entry)
    conn.execute("UPDATE budget_spend SET usd = usd + ? WHERE period IN (?, ?)", (usd, day, month))
    return spent(conn, day=day, month=month)


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
    """What `day` and `month` have spent, every daemon's bookings counted."""
    rows = dict(
        conn.execute(
            "SELECT period, usd FROM budget_spend WHERE period IN (?, ?)", (day, month)
        ).fetchall()
    )
    return rows.get(day, 0.0), rows.get(month, 0.0)


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
