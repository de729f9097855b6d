"""Circuit breakers' rows: each service's last state, so that a restart does not hammer a
provider that was down."""

from __future__ import annotations

import sqlite3

from jobwarden.store.rows import Events, add_event


def save_breaker(
    conn: sqlite3.Connection,
    events: Events,
    *,
    service: str,
    state: str,
    open_until: float | None,
    now: float,
) -> None:
    """Store the circuit's state and add a "breaker" event, so `watch` shows the change."""
    add_event(
        events,
        (0, "", service),
        "breaker",
        now,
        {"service": service, "state": state, "open_until": open_until},
    )
    conn.execute(
        "INSERT INTO breakers (service, state, open_until, changed_at) VALUES (?, ?, ?, ?) "
        "ON CONFLICT(service) DO UPDATE SET state = excluded.state, "
        "open_until = excluded.open_until, changed_at = excluded.changed_at",
        (service, state, open_until, now),
    )


def load_breakers(conn: sqlite3.Connection) -> dict[str, tuple[str, float | None]]:
    rows = conn.execute("SELECT service, state, open_until FROM breakers").fetchall()
    return {service: (state, open_until) for service, state, open_until in rows}
