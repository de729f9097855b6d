"""`jobwarden store copy`: an SQLite database's rows into an empty PostgreSQL schema, so that a
user who outgrows one box keeps their history (jobs with their events, users, the ledger,
breakers, settings: every table the schema has).

The source is read from a snapshot (SQLite's online backup into memory), brought to the newest
schema there, never in its file: a running daemon may keep it, and the copy is what a
`kill -9` would have left at that instant. The target is migrated, filled in one transaction
with the same ids, and each identity sequence set past the ids copied, so the next job, event
or ledger row gets a fresh one.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from jobwarden.config import redacted_url
from jobwarden.errors import ConfigError
from jobwarden.store import postgres, sqlite
from jobwarden.store.backend import redacted_error
from jobwarden.store.rows import placeholders
from jobwarden.store.schema import migrate

# Rows read and written at a time: memory stays flat however large the history.
BATCH = 5000


def copy_to_postgres(source: str | Path, target: str) -> dict[str, int]:
    """Copy the SQLite database at `source` into the empty schema `target` (a URL) names;
    returns the rows copied per table. Raises ConfigError, naming what is wrong, for a
    source that is no database, a target that cannot be opened or is not empty."""
    with _snapshot(source) as origin, _opened(target) as copy:
        found = postgres.table_names(copy)
        if found:
            schema = copy.raw.execute("SELECT current_schema()").fetchone()[0]
            raise ConfigError(
                f"the schema {schema} of {redacted_url(target)} is not empty (it holds "
                f"{', '.join(found)}); copy into an empty schema"
            )
        migrate(copy)
        tables = [t for t in postgres.table_names(copy) if t in sqlite.table_names(origin)]
        copied = {}
        with copy.raw.transaction():
            for table in tables:
                copied[table] = _copy_table(origin, copy, table)
            for table, key in _identity_keys(copy):
                if table in tables:
                    _restart_identity(copy, table, key)
        return copied


def _identity_keys(copy: postgres.Connection) -> list[tuple[str, str]]:
    """Each table whose surrogate key is an identity column (the schema's AUTOINCREMENT
    keys), and that key: read from the schema, so a table a later migration adds is not
    forgotten."""
    rows = copy.raw.execute(
        "SELECT table_name, column_name FROM information_schema.columns"
        " WHERE table_schema = current_schema() AND is_identity = 'YES'"
    ).fetchall()
    return [(table, column) for table, column in rows]


@contextlib.contextmanager
def _snapshot(source: str | Path) -> Iterator[sqlite3.Connection]:
    """The source as committed now, in memory, at the newest schema."""
    memory = sqlite3.connect(sqlite.IN_MEMORY)
    try:
        try:
            sqlite.back_up_into(source, memory)
            migrate(memory)
        except sqlite.DatabaseError as exc:
            raise ConfigError(f"cannot read the SQLite database {source}: {exc}") from None
        yield memory
    finally:
        memory.close()


@contextlib.contextmanager
def _opened(target: str) -> Iterator[postgres.Connection]:
    try:
        conn = postgres.connect(target, "NORMAL")
    except postgres.DatabaseError as exc:
        raise ConfigError(
            f"cannot open the database {redacted_url(target)}: {redacted_error(exc, target)}"
        ) from None
    with contextlib.closing(conn):
        yield conn


def _copy_table(origin: sqlite3.Connection, copy: postgres.Connection, table: str) -> int:
    rows = origin.execute(f"SELECT * FROM {table}")
    columns = [column[0] for column in rows.description]
    # Every name quoted: "user" is one of them.
    names = ", ".join(f'"{name}"' for name in columns)
    insert = f"INSERT INTO {table} ({names}) VALUES ({placeholders(columns)})"
    count = 0
    while batch := rows.fetchmany(BATCH):
        copy.executemany(insert, batch)
        count += len(batch)
    return count


def _restart_identity(copy: postgres.Connection, table: str, key: str) -> None:
    highest: Any = copy.execute(f"SELECT MAX({key}) FROM {table}").fetchone()[0]
    if highest is not None:
        copy.execute(
            "SELECT setval(pg_get_serial_sequence(?, ?), ?)", (table, key, highest)
        ).fetchall()
