"""Circuit breakers' rows: each service's circuit as the daemons on the database left it, so
that a restart does not hammer a provider that was down, a circuit one daemon opens holds on
every daemon, and exactly one daemon sends the probes of a half-open circuit (`take_probe`).

And each service's limits for every daemon together (a provider's limit is per API key, not
per daemon): a call in flight holds a row of `service_calls` until it ends or its lease runs
out (its daemon died), and the service's rate bucket is kept in `service_limits`, whose row a
call locks while it takes its place (`take_call_slot`).
"""

from __future__ import annotations

import sqlite3
from typing import NamedTuple, Protocol

from jobwarden.store.jobs import TakesTokens
from jobwarden.store.rows import Events, add_event, row_lock


class StoredCircuit(NamedTuple):
    state: str
    open_until: float | None
    # Counts the changes written: a daemon takes up one newer than the last it wrote or read
    # (a count, not a time: the daemons' clocks may differ a little).
    version: int


def save_breaker(
    conn: sqlite3.Connection,
    events: Events,
    *,
    service: str,
    state: str,
    open_until: float | None,
    now: float,
) -> int:
    """Store the circuit's state (returns its version) and add a "breaker" event, so `watch`
    shows the change. An open or closed circuit ends any probe (its verdict is in); turning
    half-open, as every daemon's circuit does when the recovery time passes, keeps the probe
    one of them took."""
    add_event(
        events,
        (0, "", service),
        "breaker",
        now,
        {"service": service, "state": state, "open_until": open_until},
    )
    return conn.execute(
        "INSERT INTO breakers (service, state, open_until, changed_at, version) "
        "VALUES (?, ?, ?, ?, 1) "
        "ON CONFLICT(service) DO UPDATE SET state = excluded.state, "
        "open_until = excluded.open_until, changed_at = excluded.changed_at, "
        "version = breakers.version + 1, "
        "probe_holder = CASE WHEN excluded.state = 'half_open' THEN breakers.probe_holder END, "
        "probe_until = CASE WHEN excluded.state = 'half_open' THEN breakers.probe_until END "
        "RETURNING version",
        (service, state, open_until, now),
    ).fetchone()[0]


def take_probe(
    conn: sqlite3.Connection,
    events: Events,
    *,
    service: str,
    holder: str,
    until: float,
    now: float,
) -> bool:
    """Whether `holder` may probe the service's half-open circuit: one daemon at a time, until
    its probes' verdict or `until` (a daemon that died with the probe frees it then). One
    UPDATE decides it, so two daemons cannot both take it."""
    taken = conn.execute(
        "UPDATE breakers SET probe_holder = ?, probe_until = ? WHERE service = ? "
        "AND state <> 'closed' AND (probe_holder IS NULL OR probe_holder = ? OR probe_until <= ?)",
        (holder, until, service, holder, now),
    ).rowcount
    return taken == 1


def load_breakers(conn: sqlite3.Connection) -> dict[str, StoredCircuit]:
    rows = conn.execute("SELECT service, state, open_until, version FROM breakers").fetchall()
    return {service: StoredCircuit(*circuit) for service, *circuit in rows}


class Limits(Protocol):
    """A service's concurrency and rate limit (actors/bucket.py's `Gate`): the policy the
    store applies to the calls in flight and the bucket as stored."""

    in_flight: int
    bucket: TakesTokens | None

    def try_take(self, now: float) -> float | None: ...


class CallSlot(NamedTuple):
    """A call's place under its service's limits: the slot's id once taken; else the wall
    time at which to try again (inf: when a call in flight ends)."""

    id: int | None
    retry_at: float | None = None


def take_call_slot(
    conn: sqlite3.Connection,
    events: Events,
    *,
    service: str,
    limits: Limits,
    holder: str,
    now: float,
    expires_at: float,
) -> CallSlot:
    """Take a place for one call under the service's limits, counting every daemon's calls in
    flight and taking from the one rate bucket, the service's row locked meanwhile."""
    conn.execute(
        "INSERT INTO service_limits (service) VALUES (?) ON CONFLICT DO NOTHING", (service,)
    )
    tokens, updated_at = conn.execute(
        f"SELECT tokens, updated_at FROM service_limits WHERE service = ?{row_lock(conn)}",
        (service,),
    ).fetchone()
    # Calls whose daemon died hold their place until their lease runs out, and no longer.
    conn.execute("DELETE FROM service_calls WHERE service = ? AND expires_at <= ?", (service, now))
    limits.in_flight = conn.execute(
        "SELECT COUNT(*) FROM service_calls WHERE service = ?", (service,)
    ).fetchone()[0]
    bucket = limits.bucket
    if bucket is not None and updated_at is not None:
        bucket.tokens, bucket.updated = tokens, updated_at
    retry_at = limits.try_take(now)
    if bucket is not None:
        conn.execute(
            "UPDATE service_limits SET tokens = ?, updated_at = ? WHERE service = ?",
            (bucket.tokens, bucket.updated, service),
        )
    if retry_at is not None:
        return CallSlot(None, retry_at)
    slot = conn.execute(
        "INSERT INTO service_calls (service, holder, expires_at) VALUES (?, ?, ?) RETURNING id",
        (service, holder, expires_at),
    ).fetchone()[0]
    return CallSlot(slot)


def release_call_slot(conn: sqlite3.Connection, events: Events, *, slot: int) -> None:
    """A call ended: its place is free for any daemon's next call."""
    conn.execute("DELETE FROM service_calls WHERE id = ?", (slot,))
