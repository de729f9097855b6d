"""Circuit breakers' rows: each service's circuit as the daemons on the database left it, so
that a restart does not hammer a provider that was down, a circuit one daemon opens holds on
every daemon, and exactly one daemon sends the probes of a half-open circuit (`take_probe`)."""

from __future__ import annotations

import sqlite3
from typing import NamedTuple

from jobwarden.store.rows import Events, add_event


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
