"""PostgreSQL for the tests: the server .ci/postgres started, a fresh schema per test, and
clusters of a test's own.

`JOBWARDEN_TEST_POSTGRES` holds the URL of a database the tests may create schemas in
(`.ci/run` starts a throwaway server and sets it; a developer runs
`.ci/postgres start /tmp/jw-pg` and exports what it prints). Without it the PostgreSQL tests
skip, except in CI (CI=true), where a missing PostgreSQL fails them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

ENV = "JOBWARDEN_TEST_POSTGRES"
SCRIPT = Path(__file__).resolve().parent.parent / ".ci" / "postgres"

# The URL of the test's database while a test runs on PostgreSQL (see conftest's `database`
# fixture); None on SQLite. make_config and DaemonProcess put it in the [store] they write.
current_url: str | None = None


def _unavailable(why: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI needs PostgreSQL: {why}")
    pytest.skip(f"PostgreSQL not available: {why}")


def server_url() -> str:
    """The test server's URL; skips (fails in CI) when there is none."""
    url = os.environ.get(ENV)
    if not url:
        _unavailable(f"{ENV} is not set (start one with .ci/postgres start DIR)")
    return url  # type: ignore[return-value]


def in_schema(url: str, schema: str) -> str:
    """The URL with `schema` first on the search path: its tables are the store's."""
    separator = "&" if "?" in url else "?"
    return f"{url}{separator}options={quote(f'-csearch_path={schema}')}"


@contextlib.contextmanager
def fresh_schema(server: str | None = None) -> Iterator[str]:
    """An empty schema on the test server (or on `server`, a URL), dropped afterwards; yields
    its URL."""
    import psycopg

    url = server or server_url()
    schema = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    try:
        yield in_schema(url, schema)
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


class Cluster:
    """A PostgreSQL server of one test's own, on a directory of its own, which the test may
    stop and start without disturbing the others'."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.url = ""

    def _run(self, action: str) -> str:
        result = subprocess.run(
            [str(SCRIPT), action, str(self.directory)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if result.returncode == 3:
            _unavailable(result.stderr.strip())
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    def start(self) -> str:
        self.url = self._run("start")
        return self.url

    def stop(self) -> None:
        self._run("stop")


def own_cluster(directory: Path) -> Iterator[Cluster]:
    """The body of a fixture: a cluster started for the test and stopped after it."""
    server_url()  # where the tests have no PostgreSQL, this test has none either
    cluster = Cluster(directory)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


def own_cluster_in_temp() -> Iterator[Cluster]:
    """`own_cluster` on a directory of its own, removed after: not under pytest's tmp_path,
    where the server's user cannot reach and its socket's path would be too long."""
    directory = Path(tempfile.mkdtemp(prefix="jw-pg-"))
    try:
        yield from own_cluster(directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
