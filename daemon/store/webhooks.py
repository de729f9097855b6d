"""Webhook deliveries: a job's URL, one delivery per final status, and their sending state.

A delivery row is added in the same transaction as the final status it tells of (the engine
calls `queue_deliveries` with every write's events), so a status the store has committed is
never left untold, even after `kill -9`. A delivery is due while next_at is set; sending it
first moves next_at past the send's timeout (a lease: a daemon that dies mid-send leaves the
delivery due again, so delivery is at least once); an answer either ends it (delivered_at, or
given up after the last attempt: next_at NULL and no delivered_at) or sets the next try.
"""

from __future__ import annotations

import msgspec

from jobwarden.store.backend import backend_of
from jobwarden.store.rows import Events, placeholders
from jobwarden.store.sqlite import Connection
from jobwarden.wire.views import TERMINAL_STATUSES


class Delivery(msgspec.Struct, frozen=True):
    id: int
    job_id: int
    url: str
    status: str
    created_at: float
    attempts: int
    next_at: float | None = None
    delivered_at: float | None = None
    # The receiver's last answer ("HTTP 500", "timed out", …) while it is not delivered.
    answer: str | None = None


_COLUMNS = "id, job_id, url, status, created_at, attempts, next_at, delivered_at, answer"


def remember(conn: Connection, job_id: int, url: str) -> None:
    """Keep a new job's webhook URL (in the transaction that inserts the job)."""
    conn.execute("INSERT INTO job_webhooks (job_id, url) VALUES (?, ?)", (job_id, url))


def queue_deliveries(conn: Connection, events: Events) -> None:
    """A delivery for each final status among a write's events whose job has a webhook."""
    final = {
        event.job: (event.data["status"], event.at)
        for event in events
        if event.type == "status" and event.data.get("status") in TERMINAL_STATUSES
    }
    if not final:
        return
    ids = list(final)
    rows = conn.execute(
        f"SELECT job_id, url FROM job_webhooks WHERE job_id IN ({placeholders(ids)})", ids
    ).fetchall()
    for job_id, url in rows:
        status, at = final[job_id]
        conn.execute(
            "INSERT INTO webhook_deliveries (job_id, url, status, created_at, next_at)"
            " VALUES (?, ?, ?, ?, ?)",
            (job_id, url, status, at, at),
        )


def take_due(
    conn: Connection, _events: Events, *, now: float, lease: float, limit: int
) -> list[Delivery]:
    """Up to `limit` deliveries due by `now`, leased for `lease` seconds to this sender.

    Where several daemons share the database, each passes over the deliveries another's
    sender is leasing at that moment (`skip_locked`): neither waits for the other, and once
    that lease commits its next_at is no longer due, so no delivery is sent twice."""
    due = [
        row[0]
        for row in conn.execute(
            "SELECT id FROM webhook_deliveries WHERE next_at IS NOT NULL AND next_at <= ?"
            " ORDER BY next_at LIMIT ?" + backend_of(conn).skip_locked("webhook_deliveries"),
            (now, limit),
        )
    ]
    if not due:
        return []
    rows = conn.execute(
        f"UPDATE webhook_deliveries SET next_at = ?, attempts = attempts + 1"
        f" WHERE id IN ({placeholders(due)}) AND next_at <= ? RETURNING {_COLUMNS}",
        [now + lease, *due, now],
    ).fetchall()
    return sorted((Delivery(*row) for row in rows), key=lambda delivery: delivery.id)


def settle(
    conn: Connection,
    _events: Events,
    *,
    delivery_id: int,
    attempts: int,
    now: float,
    delivered: bool,
    answer: str,
    retry_at: float | None,
) -> None:
    """Record how a send went: delivered, due again at `retry_at`, or given up (None). Only
    the sender whose lease it still is may (the attempt count it took fences the write)."""
    conn.execute(
        "UPDATE webhook_deliveries SET delivered_at = ?, next_at = ?, answer = ?"
        " WHERE id = ? AND attempts = ? AND delivered_at IS NULL",
        (
            now if delivered else None,
            None if delivered else retry_at,
            answer,
            delivery_id,
            attempts,
        ),
    )


def next_due(conn: Connection) -> float | None:
    """When the earliest delivery is due (None: none is)."""
    return conn.execute("SELECT MIN(next_at) FROM webhook_deliveries").fetchone()[0]


def list_deliveries(
    conn: Connection, *, job_id: int | None, pending: bool, limit: int
) -> list[Delivery]:
    """Newest first: a job's deliveries, or every one not yet delivered (`pending`), or all."""
    where, params = [], []
    if job_id is not None:
        where.append("job_id = ?")
        params.append(job_id)
    if pending:
        where.append("delivered_at IS NULL")
    clause = f" WHERE {' AND '.join(where)}" if where else ""
    rows = conn.execute(
        f"SELECT {_COLUMNS} FROM webhook_deliveries{clause} ORDER BY id DESC LIMIT ?",
        [*params, limit],
    ).fetchall()
    return [Delivery(*row) for row in rows]
