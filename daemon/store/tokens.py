"""Operator tokens: named Bearer tokens that act as the operator on the HTTP API.

Kept as users' tokens are (users.py): made here, shown once, stored as their SHA-256 only.
"""

from __future__ import annotations

import secrets
import sqlite3

import msgspec

from jobwarden.store.rows import Events
from jobwarden.store.users import hash_token

# Unlike a user's "jw_", so a token found in a log says at once what it unlocks.
OPERATOR_TOKEN_PREFIX = "jwo_"


class OperatorToken(msgspec.Struct):
    """An operator token as `tokens list` shows it: never the token itself."""

    name: str
    created_at: float


def new_operator_token() -> str:
    return OPERATOR_TOKEN_PREFIX + secrets.token_urlsafe(32)


def add(
    conn: sqlite3.Connection, events: Events, *, name: str, token_hash: str, now: float
) -> OperatorToken | None:
    """A new operator token named `name`; None when the name is taken."""
    rows = conn.execute(
        "INSERT INTO operator_tokens (name, token_hash, created_at) VALUES (?, ?, ?)"
        " ON CONFLICT DO NOTHING RETURNING name, created_at",
        (name, token_hash, now),
    ).fetchall()
    return OperatorToken(*rows[0]) if rows else None


def revoke(conn: sqlite3.Connection, events: Events, *, name: str) -> bool:
    """Whether there was a token named `name` (it works no more)."""
    return conn.execute("DELETE FROM operator_tokens WHERE name = ?", (name,)).rowcount > 0


def list_all(conn: sqlite3.Connection) -> list[OperatorToken]:
    rows = conn.execute("SELECT name, created_at FROM operator_tokens ORDER BY name").fetchall()
    return [OperatorToken(*row) for row in rows]


def authenticate(conn: sqlite3.Connection, token: str) -> str | None:
    """The name of the operator token `token` is, or None."""
    row = conn.execute(
        "SELECT name FROM operator_tokens WHERE token_hash = ?", (hash_token(token),)
    ).fetchone()
    return None if row is None else row[0]
