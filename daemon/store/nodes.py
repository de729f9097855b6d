"""The daemons sharing a database (nodes), their leases, and the roles one of them holds.

Each daemon registers a node row at start-up and renews its lease (`lease_until`, wall time
from jobwarden.clock) while it lives. A node whose lease has run out is dead to the others:
the daemon elected for maintenance recovers its running jobs (`recover_expired`) and deletes
its row. A node that finds its own row gone was declared dead while it could not renew (a
pause, a lost connection): every job it was running has been taken from it, and each of its
writes for them is fenced off (see jobs.Fence).

A role ("maintenance") is a lease row taken with one conditional upsert: granted when nobody
holds it, when the caller holds it already, or when the holder's lease has run out. Leases
compare wall times written by different hosts, so the hosts' clocks must agree to well within
a lease (NTP does).
"""

from __future__ import annotations

import sqlite3
from typing import NamedTuple

import msgspec

from jobwarden.store.jobs import recover_running
from jobwarden.store.rows import Events, placeholders

MAINTENANCE = "maintenance"


class NodeView(msgspec.Struct, frozen=True):
    """A live node as `jobwarden status` lists it."""

    id: int
    host: str
    pid: int
    started_at: float
    heartbeat_at: float
    lease_until: float
    leader: bool


class Recovered(NamedTuple):
    """What the recovery of dead nodes did: the nodes, their jobs requeued or failed, and the
    kinds of those requeued (for the scheduler to look at)."""

    nodes: list[int]
    recovered: int
    crash_loop: int
    kinds: list[str]


def register(
    conn: sqlite3.Connection, events: Events, *, host: str, pid: int, now: float, lease: float
) -> int:
    """A new node row for this daemon; returns its id."""
    return conn.execute(
        "INSERT INTO nodes (host, pid, started_at, heartbeat_at, lease_until) "
        "VALUES (?, ?, ?, ?, ?) RETURNING id",
        (host, pid, now, now, now + lease),
    ).fetchall()[0][0]


def renew(conn: sqlite3.Connection, events: Events, *, node: int, now: float, lease: float) -> bool:
    """Extend the node's lease; False when its row is gone: it was declared dead, and its
    running jobs were taken from it."""
    cursor = conn.execute(
        "UPDATE nodes SET heartbeat_at = ?, lease_until = ? WHERE id = ?",
        (now, now + lease, node),
    )
    return cursor.rowcount > 0


def rejoin(
    conn: sqlite3.Connection,
    events: Events,
    *,
    node: int,
    host: str,
    pid: int,
    started_at: float,
    now: float,
    lease: float,
) -> None:
    """A node declared dead while it lived comes back under its own id. Its old jobs are
    fenced off by their attempt: a job it claims again runs a later attempt."""
    conn.execute(
        "INSERT INTO nodes (id, host, pid, started_at, heartbeat_at, lease_until) "
        "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING",
        (node, host, pid, started_at, now, now + lease),
    )


def take_role(
    conn: sqlite3.Connection, events: Events, *, role: str, node: int, now: float, lease: float
) -> bool:
    """Take or keep `role` until `now + lease`: granted when free, already ours, or when its
    holder's lease has run out. True: this node holds it now."""
    rows = conn.execute(
        "INSERT INTO leases (name, node, until) VALUES (?, ?, ?) "
        "ON CONFLICT (name) DO UPDATE SET node = excluded.node, until = excluded.until "
        "WHERE leases.node = excluded.node OR leases.until < ? RETURNING node",
        (role, node, now + lease, now),
    ).fetchall()
    return bool(rows)


def leave(conn: sqlite3.Connection, events: Events, *, node: int) -> None:
    """A clean stop: the node's row and its roles go, so another daemon takes the roles at
    once instead of when the lease runs out. Its jobs were interrupted and requeued first."""
    conn.execute("DELETE FROM leases WHERE node = ?", (node,))
    conn.execute("DELETE FROM nodes WHERE id = ?", (node,))


def recover_expired(
    conn: sqlite3.Connection, events: Events, *, now: float, crash_loop_after: int
) -> Recovered:
    """The maintenance role's recovery. The nodes whose lease ran out are dead: their rows are
    deleted. Then the running jobs of every node without a row (dead now, or gone before its
    jobs were requeued) go back to the queue (RECOVERED) or fail CRASH_LOOP."""
    conn.execute("DELETE FROM nodes WHERE lease_until < ?", (now,))
    orphaned = conn.execute(
        "SELECT DISTINCT node, kind FROM jobs WHERE status = 'running' AND node IS NOT NULL "
        "AND NOT EXISTS (SELECT 1 FROM nodes WHERE nodes.id = jobs.node)"
    ).fetchall()
    if not orphaned:
        return Recovered([], 0, 0, [])
    dead = sorted({node for node, _ in orphaned})
    counts = recover_running(conn, events, now=now, crash_loop_after=crash_loop_after, nodes=dead)
    kinds = sorted({kind for _, kind in orphaned})
    return Recovered(dead, counts["recovered"], counts["crash_loop"], kinds)


def recover_nodes(
    conn: sqlite3.Connection,
    events: Events,
    *,
    nodes: list[int],
    now: float,
    crash_loop_after: int,
) -> dict[str, int]:
    """Nodes known dead (a daemon of this host whose process is gone): their running jobs
    go back to the queue, as recover_expired does, without waiting for their leases."""
    counts = recover_running(conn, events, now=now, crash_loop_after=crash_loop_after, nodes=nodes)
    conn.execute(f"DELETE FROM nodes WHERE id IN ({placeholders(nodes)})", nodes)
    return counts


def forget_others(conn: sqlite3.Connection, events: Events, *, node: int) -> None:
    """On a store only one daemon can open (SQLite): every other node row is a daemon that
    has stopped, whose jobs the start-up recovery has just requeued."""
    conn.execute("DELETE FROM nodes WHERE id <> ?", (node,))
    conn.execute("DELETE FROM leases WHERE node <> ?", (node,))


# -- queries (read connection) --------------------------------------------------------------


def on_host(conn: sqlite3.Connection, *, host: str) -> list[tuple[int, int]]:
    """The nodes registered from `host`: (id, pid) each."""
    return [
        (node, pid)
        for node, pid in conn.execute("SELECT id, pid FROM nodes WHERE host = ?", (host,))
    ]


def next_id(conn: sqlite3.Connection) -> int:
    """An id no node has: for a daemon that starts while the store takes no writes, whose
    node row is written (`rejoin`) once it does. Only where one daemon opens the store."""
    return conn.execute("SELECT COALESCE(MAX(id), 0) + 1 FROM nodes").fetchone()[0]


def live_nodes(conn: sqlite3.Connection, *, now: float) -> list[NodeView]:
    """The nodes whose lease holds, oldest first, and which of them holds maintenance."""
    rows = conn.execute(
        "SELECT nodes.id, nodes.host, nodes.pid, nodes.started_at, nodes.heartbeat_at, "
        "nodes.lease_until, leases.node IS NOT NULL FROM nodes "
        "LEFT JOIN leases ON leases.node = nodes.id AND leases.name = ? AND leases.until >= ? "
        "WHERE nodes.lease_until >= ? ORDER BY nodes.id",
        (MAINTENANCE, now, now),
    ).fetchall()
    return [NodeView(*row[:6], leader=bool(row[6])) for row in rows]
