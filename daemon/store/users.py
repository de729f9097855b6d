"""Users: who may submit, their limits and credits, and the hash of their token.

Functions of a SQLite connection, like jobs.py: writes run in the store's writer
transaction (`store.write(partial(fn, ...))`), queries on the read connection. A token is
shown once, when it is made; the store keeps its SHA-256, which is enough for a random
256-bit secret (a slow password hash protects guessable secrets, and these are not).
"""

from __future__ import annotations

import hashlib
import secrets
import sqlite3
from typing import Any

import msgspec

from jobwarden.store.rows import USER_HELD, Events, placeholders

TOKEN_PREFIX = "jw_"
# The largest balance a user may hold: the largest INTEGER a column holds.
MAX_CREDITS = 2**63 - 1


class UserView(msgspec.Struct, omit_defaults=True):
    """A user as the admin commands show it. credits None: unlimited. daily_limit, rate and
    max_running None: the [limits] default applies."""

    name: str
    credits: int | None
    spent: int
    disabled: bool
    created_at: float
    has_token: bool
    daily_limit: int | None = None
    rate: str | None = None
    max_running: int | None = None
    jobs_today: int = 0
    day: str | None = None
    reserved: int = 0
    # Their queued jobs wait until released (`users hold`).
    held: bool = False


class UserLimits(msgspec.Struct, frozen=True):
    """Per-user overrides of the [limits] defaults; None keeps the default."""

    daily_limit: int | None = None
    rate: str | None = None
    max_running: int | None = None


_COLUMNS = (
    "name, credits, spent, disabled, created_at, token_hash, daily_limit, rate,"
    " max_running, day_count, day, held"
)


def _view(row: tuple[Any, ...]) -> UserView:
    # The hash itself, not `token_hash IS NOT NULL`: SQLite 3.40 gets that expression wrong
    # in the RETURNING clause of an UPDATE on a WITHOUT ROWID table.
    return UserView(
        name=row[0],
        credits=row[1],
        spent=row[2],
        disabled=bool(row[3]),
        created_at=row[4],
        has_token=bool(row[5]),
        daily_limit=row[6],
        rate=row[7],
        max_running=row[8],
        jobs_today=row[9],
        day=row[10],
        held=bool(row[11]),
    )


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create(
    conn: sqlite3.Connection,
    events: Events,
    *,
    name: str,
    credits: int | None,
    limits: UserLimits,
    token_hash: str | None,
    now: float,
) -> UserView | None:
    """A new user; None when the name is taken."""
    rows = conn.execute(
        "INSERT INTO users (name, token_hash, credits, daily_limit, rate, max_running,"
        f" created_at) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING RETURNING {_COLUMNS}",
        (name, token_hash, credits, limits.daily_limit, limits.rate, limits.max_running, now),
    ).fetchall()
    return _view(rows[0]) if rows else None


def update(
    conn: sqlite3.Connection,
    events: Events,
    *,
    name: str,
    credits_delta: int | None = None,
    credits: int | None = None,
    unlimited: bool = False,
    limits: UserLimits | None = None,
    disabled: bool | None = None,
    held: bool | None = None,
    token_hash: str | None = None,
) -> UserView | None:
    """Change a user; None when there is no such user. Credits go up or down by a delta, or
    are set outright; a balance never goes below zero nor above MAX_CREDITS."""
    sets: list[str] = []
    values: list[Any] = []
    if unlimited:
        sets.append("credits = NULL")
    elif credits is not None:
        sets.append("credits = ?")
        values.append(credits)
    elif credits_delta is not None:
        # The bound is checked on a sum that cannot overflow (REAL in SQLite, NUMERIC in
        # PostgreSQL): the balance stops at MAX_CREDITS, and at 0.
        sets.append(
            "credits = CASE WHEN credits IS NULL THEN NULL"
            f" WHEN credits + 0.0 + ? >= {MAX_CREDITS} THEN {MAX_CREDITS}"
            " WHEN credits + ? < 0 THEN 0 ELSE credits + ? END"
        )
        values.extend([credits_delta] * 3)
    if limits is not None:
        for column in ("daily_limit", "rate", "max_running"):
            value = getattr(limits, column)
            if value is not None:
                sets.append(f"{column} = ?")
                values.append(value)
    if disabled is not None:
        sets.append("disabled = ?")
        values.append(int(disabled))
    if held is not None:
        sets.append("held = ?")
        values.append(int(held))
    if token_hash is not None:
        sets.append("token_hash = ?")
        values.append(token_hash)
    if not sets:
        return get(conn, name)
    changed = conn.execute(f"UPDATE users SET {', '.join(sets)} WHERE name = ?", (*values, name))
    return get(conn, name) if changed.rowcount else None


# -- queries ---------------------------------------------------------------------------------


def get(conn: sqlite3.Connection, name: str) -> UserView | None:
    row = conn.execute(f"SELECT {_COLUMNS} FROM users WHERE name = ?", (name,)).fetchone()
    if row is None:
        return None
    user = _view(row)
    reserved = conn.execute(
        "SELECT COALESCE(SUM(credits), 0) FROM jobs WHERE user = ? "
        "AND status IN ('queued', 'running')",
        (name,),
    ).fetchone()[0]
    return msgspec.structs.replace(user, reserved=reserved)


def list_all(conn: sqlite3.Connection) -> list[UserView]:
    rows = conn.execute(f"SELECT {_COLUMNS} FROM users ORDER BY name").fetchall()
    return [_view(row) for row in rows]


def authenticate(conn: sqlite3.Connection, token: str) -> UserView | None:
    """The enabled user whose token this is, or None."""
    row = conn.execute(
        f"SELECT {_COLUMNS} FROM users WHERE token_hash = ? AND disabled = 0",
        (hash_token(token),),
    ).fetchone()
    return None if row is None else _view(row)


def running_limits(conn: sqlite3.Connection, names: list[str]) -> dict[str, int | None]:
    """Each named user's own running limit (None: the default applies)."""
    if not names:
        return {}
    rows = conn.execute(
        f"SELECT name, max_running FROM users WHERE name IN ({placeholders(names)})",
        names,
    ).fetchall()
    return dict(rows)


def hold(conn: sqlite3.Connection, events: Events, *, name: str, held: bool) -> UserView | None:
    """Hold a user's queued jobs, or release them; None when there is no such user. The user's
    row decides; a bit of each queued job's `held` copies it, which keeps them out of the
    dispatch order while held."""
    user = update(conn, events, name=name, held=held)
    if user is not None:
        change = f"held | {USER_HELD}" if held else f"held & ~{USER_HELD}"
        conn.execute(
            f"UPDATE jobs SET held = {change} WHERE \"user\" = ? AND status = 'queued'", (name,)
        )
    return user


def on_hold(conn: sqlite3.Connection, names: list[str]) -> set[str]:
    """Which of the named users are on hold."""
    if not names:
        return set()
    rows = conn.execute(
        f"SELECT name FROM users WHERE held = 1 AND name IN ({placeholders(names)})", names
    ).fetchall()
    return {row[0] for row in rows}
