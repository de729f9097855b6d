"""Which database the store runs on: the few things a backend does its own way.

The statements are shared: the query modules and the migrations are written once, with `?`
parameters, SQLite's column types and the column "user" quoted. A backend is a module with the
functions of `Backend`; `sqlite` is the embedded default, `postgres` takes a
`postgresql://` URL. The engine reaches the database only through them, and a query function
that needs its backend (the ids an INSERT gave its rows, whether an error is the database's
fault) asks `backend_of(conn)`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol
from urllib.parse import parse_qs, unquote, urlsplit

from jobwarden.config import is_database_url
from jobwarden.store import sqlite


class Backend(Protocol):
    """What the engine, the migration runner and `store copy` ask of a database."""

    NAME: str
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

    def fault_code(self, exc: BaseException) -> str:
        """STORAGE_FULL, STORAGE_UNAVAILABLE (the server cannot be reached) or STORAGE_ERROR."""
        ...

    def is_disconnect(self, exc: BaseException) -> bool:
        """The connection is lost, and a new one may work."""
        ...

    def checkpoint_wal(self, conn: Any) -> None: ...

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
