"""What the store asks of SQLite in particular, in one place: the same functions as
postgres.py (backend.py names them), so the engine and the migration runner name no statement
that only one database knows.

The queries and migrations are written in SQLite's dialect and run here as they are; what
postgres.py changes in their text is listed there. What stays SQLite's own:

- `INDEXED BY` hints in jobs.py pin the queue's partial indexes: without ANALYZE statistics
  SQLite's planner prefers an equality on status (PostgreSQL drops the hints);
- an INSERT's new ids come from `cursor.lastrowid` (`insert_ids`): the rows one INSERT adds to
  an AUTOINCREMENT table are numbered consecutively and this store's writer is the only one,
  and RETURNING would cost as much again as the INSERT in SQLite 3.40;
- the schema version is PRAGMA user_version; WAL mode, its checkpoint and the online backup;
- every read transaction is a snapshot (jobs.job_with_events relies on it).

Savepoints, ON CONFLICT, RETURNING, row values and partial indexes are spelled the same in
both, so the engine and the query modules use them as they are.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

NAME = "sqlite"
Connection = sqlite3.Connection
# What a statement raises when the database refuses it.
DatabaseError = sqlite3.Error
# A database that lives only as long as its one connection (tests).
IN_MEMORY = ":memory:"

# Result codes (the primary code, the low byte of an extended one) that say the database
# cannot take writes now, whatever the write: the file is busy, read-only, failing, damaged,
# gone or not a database, the disk is full, or memory ran out.
_FAULTS = frozenset(
    {
        sqlite3.SQLITE_BUSY,
        sqlite3.SQLITE_NOMEM,
        sqlite3.SQLITE_READONLY,
        sqlite3.SQLITE_IOERR,
        sqlite3.SQLITE_CORRUPT,
        sqlite3.SQLITE_CANTOPEN,
        sqlite3.SQLITE_FULL,
        sqlite3.SQLITE_PROTOCOL,
        sqlite3.SQLITE_NOTADB,
    }
)


def is_fault(exc: BaseException) -> bool:
    """The database, not the statement, failed: no write can succeed until it is mended."""
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and (code & 0xFF) in _FAULTS


def is_full(exc: BaseException) -> bool:
    """The disk (or the database's size limit) is full."""
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and (code & 0xFF) == sqlite3.SQLITE_FULL


def fault_code(exc: BaseException) -> str:
    return "STORAGE_FULL" if is_full(exc) else "STORAGE_ERROR"


def is_disconnect(exc: BaseException) -> bool:
    """A file has no connection to lose."""
    return False


def connect(path: str, synchronous: str) -> Connection:
    """A connection in autocommit mode: the engine says where each transaction begins."""
    if path != IN_MEMORY:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.execute("PRAGMA busy_timeout=5000")
    conn.execute("PRAGMA foreign_keys=ON")
    # Savepoints keep the pages they change in a statement journal: in memory, not a file.
    conn.execute("PRAGMA temp_store=MEMORY")
    # 32 MB of page cache (the default is 2 MB): the queue's index pages stay in memory.
    conn.execute("PRAGMA cache_size=-32768")
    return conn


def connect_reader(path: str, synchronous: str, writer: Connection) -> Connection:
    """In WAL mode a second connection reads without waiting for the writer; an in-memory
    database lives in its one connection."""
    return writer if path == IN_MEMORY else connect(path, synchronous)


def begin_write(conn: Connection) -> None:
    """Begin a transaction that holds the write lock from its first statement, so that no
    other connection can make it fail half-way with SQLITE_BUSY."""
    conn.execute("BEGIN IMMEDIATE")


def roll_back(conn: Connection) -> None:
    """Abandon the open transaction, if a failure left one open."""
    if conn.in_transaction:
        conn.execute("ROLLBACK")


SHARED = False


def order_events(conn: Connection) -> None:
    """One writer at a time: events are numbered in commit order already."""


def listen(target: str, notified: Callable[[], None], stopping: Any) -> None:
    """One daemon per file: there are no others to hear."""


def is_retryable(exc: BaseException) -> bool:
    """One writer holds the database: no transaction waits on another's locks."""
    return False


def try_lock(conn: Connection, name: str) -> bool:
    """One writer at a time: its write transaction holds the whole database already."""
    return True


def skip_locked(table: str) -> str:
    """One writer at a time: a write transaction holds the whole database already."""
    return ""


def checkpoint_wal(conn: Connection) -> None:
    """Fold the write-ahead log back into the database file; outside any transaction."""
    # Read the pragma's answer to the end: an open statement blocks the next batch.
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()


@contextlib.contextmanager
def migrating(conn: Connection) -> Iterator[None]:
    """One daemon per file: it holds the file's lock before it opens the store."""
    yield


def schema_version(conn: Connection) -> int:
    return conn.execute("PRAGMA user_version").fetchone()[0]


def migrate_to(conn: Connection, version: int, script: str) -> None:
    """Run one migration and record its version in one transaction: a crash mid-migration
    leaves the previous version intact."""
    try:
        conn.executescript(f"BEGIN IMMEDIATE; {script}; PRAGMA user_version={version}; COMMIT;")
    except DatabaseError:
        roll_back(conn)
        raise


def insert_ids(conn: Connection, sql: str, params: Sequence[Any], key: str, rows: int) -> list[int]:
    """The rows one INSERT adds to an AUTOINCREMENT table are numbered consecutively, and
    the store's writer is the only one: the last id says them all. (RETURNING would cost as
    much again as the INSERT, in SQLite 3.40.)"""
    last = conn.execute(sql, params).lastrowid
    assert last is not None
    return list(range(last - rows + 1, last + 1))


def table_names(conn: Connection) -> list[str]:
    rows = conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' "
        "ORDER BY name"
    )
    return [name for (name,) in rows]


def copy_database(source: str | Path, target: str | Path) -> None:
    """A consistent copy of the database as it is committed now, by SQLite's online backup:
    what a `kill -9` at this instant would leave on disk. The source is opened read-only, so a
    path with no database behind it is an error rather than a new, empty one."""
    with contextlib.closing(sqlite3.connect(target)) as copy:
        back_up_into(source, copy)


def back_up_into(source: str | Path, copy: Connection) -> None:
    """SQLite's online backup of the database at `source`, opened read-only, into `copy`."""
    read_only = f"{Path(source).resolve().as_uri()}?mode=ro"
    with contextlib.closing(sqlite3.connect(read_only, uri=True)) as origin:
        origin.backup(copy)


@contextlib.contextmanager
def opened(path: str | Path) -> Iterator[Connection]:
    """A connection of its own to the database at `path`, for a tool that reads it once."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        yield conn
