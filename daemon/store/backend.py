"""Which database the store runs on: the few things a backend does its own way.

The statements are shared: the query modules and the migrations are written once, with `?`
parameters, SQLite's column types and the column "user" quoted. A backend is a module with the
functions of `Backend`; `sqlite` is the embedded default, `postgres` takes a
`postgresql://` URL. The engine reaches the database only through them, and a query function
that needs its backend (the ids an INSERT gave its rows, whether an error is the database's
fault) asks `backend_of(conn)`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol
from urllib.parse import parse_qs, unquote, urlsplit

from jobwarden.config import is_database_url
from jobwarden.store import sqlite


class Backend(Protocol):
    """What the engine, the migration runner and `store copy` ask of a database."""

    NAME: str
    # Several daemons may write the database at once: each follows the event log for the
    # others' events (tail.py).
    SHARED: bool
    # What a statement raises when the database refuses it.
    DatabaseError: type[Exception]

    def connect(self, target: str, synchronous: str) -> Any:
        """A connection in autocommit mode: the engine says where each transaction begins."""
        ...

    def connect_reader(self, target: str, synchronous: str, writer: Any) -> Any:
        """The read connection (the writer's own where the database lives in it alone)."""
        ...

    def begin_write(self, conn: Any) -> None: ...

    def roll_back(self, conn: Any) -> None:
        """Abandon the open transaction, if a failure left one open."""
        ...

    def is_fault(self, exc: BaseException) -> bool:
        """The database, not the statement, failed: no write can succeed until it is mended."""
        ...

    def is_retryable(self, exc: BaseException) -> bool:
        """The database gave up on the statement to let another transaction through (a
        deadlock's victim): the write succeeds if run again in a new transaction."""
        ...

    def fault_code(self, exc: BaseException) -> str:
        """STORAGE_FULL, STORAGE_UNAVAILABLE (the server cannot be reached) or STORAGE_ERROR."""
        ...

    def is_disconnect(self, exc: BaseException) -> bool:
        """The connection is lost, and a new one may work."""
        ...

    def checkpoint_wal(self, conn: Any) -> None: ...

    def migrating(self, conn: Any) -> AbstractContextManager[None]:
        """Held while the schema is read and brought up to date, so that daemons starting
        at once on a new database migrate it once (the others wait, then find it done)."""
        ...

    def schema_version(self, conn: Any) -> int: ...

    def migrate_to(self, conn: Any, version: int, script: str) -> None:
        """Run one migration and record its version, in one transaction."""
        ...

    def insert_ids(
        self, conn: Any, sql: str, params: Sequence[Any], key: str, rows: int
    ) -> list[int]:
        """Run an INSERT of `rows` rows and return the keys (column `key`) it gave them, in
        the order of its VALUES."""
        ...

    def order_events(self, conn: Any) -> None:
        """Called in a write transaction just before it numbers its events: makes the seq
        order the commit order until the transaction ends, and tells the daemons that listen
        that events come (at the commit)."""
        ...

    def listen(self, target: str, notified: Callable[[], None], stopping: Any) -> None:
        """Run on a thread of its own until `stopping` (a threading.Event) is set: call
        `notified` each time another daemon commits events."""
        ...

    def try_lock(self, conn: Any, name: str) -> bool:
        """Take the lock `name` until the transaction ends, if nobody holds it; never wait
        (True where one writer has the database)."""
        ...

    def skip_locked(self, table: str) -> str:
        """What a SELECT ends with to lock the rows of `table` it returns until the commit,
        passing over rows another transaction holds ("" where one writer has the database):
        the claims of several daemons then never wait on each other, nor take a row twice."""
        ...

    def table_names(self, conn: Any) -> list[str]:
        """The tables of the database (PostgreSQL: of the schema the connection uses)."""
        ...


def is_url(target: str | Any) -> bool:
    """A database URL rather than a file path."""
    return isinstance(target, str) and is_database_url(target)


def backend_for(target: str) -> Backend:
    """The backend for a file path (SQLite) or a postgresql:// URL."""
    if not is_url(target):
        return sqlite  # type: ignore[return-value]
    from jobwarden.store import postgres  # psycopg is an extra: imported only when used

    return postgres  # type: ignore[return-value]


def backend_of(conn: Any) -> Backend:
    """The backend of a connection: a PostgreSQL connection names its own; a plain
    sqlite3 connection (a tool's or a test's) is SQLite's."""
    return getattr(conn, "backend", sqlite)


def redacted_error(exc: BaseException, target: str) -> str:
    """An error's text without the URL's password, should the driver have quoted it."""
    text = str(exc).strip()
    if not is_url(target):
        return text
    parts = urlsplit(target)
    secrets = [parts.password or "", *parse_qs(parts.query).get("password", [])]
    for secret in {*secrets, *map(unquote, secrets)} - {""}:
        text = text.replace(secret, "***")
    return text
