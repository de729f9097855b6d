"""What the benchmarks share: the daemon's config, a `jobwarden serve` child, the SQLite file.

`ServeProcess` runs the real daemon with its log going to a file (never a pipe that could fill
and stall it), and knows when it is ready either from the "jobwarden ready" log line (start-up
timing, log level info) or from the admin socket answering a ping (any log level).
"""

from __future__ import annotations

import contextlib
import math
import signal
import sqlite3
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import psutil

from jobwarden.client import AdminClient, DaemonUnreachable
from jobwarden.store.schema import migrate
from tests.process import NO_LIMITS, daemon_env, jobwarden_command, toml_text

NOOP_KIND = "noop"
MAX_CONCURRENT_JOBS = 64
READY_EVENT = "jobwarden ready"
READY_TIMEOUT = 60.0
STOP_TIMEOUT = 60.0
POLL_INTERVAL = 0.002


def daemon_config(
    *, synchronous: str = "NORMAL", log_level: str = "warning", url: str = ""
) -> dict[str, Any]:
    """The config every benchmark daemon runs: one no-op python kind, 64 slots, no HTTP or
    WebSocket listener (so that no port is taken); its SQLite file, or the PostgreSQL `url`."""
    store = {"url": url} if url else {"path": "jw.db"}
    return {
        "daemon": {"max_concurrent_jobs": MAX_CONCURRENT_JOBS, "shutdown_grace": "30s"},
        "store": {**store, "synchronous": synchronous},
        "admin": {"socket": "admin.sock"},
        "log": {"format": "json", "level": log_level},
        "http": {"listen": ""},
        "websocket": {"listen": ""},
        "limits": NO_LIMITS,
        "kinds": {NOOP_KIND: {"handler": "tests.bench.kinds:noop"}},
    }


def config_text(**options: Any) -> str:
    return toml_text(daemon_config(**options))


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile: the smallest value with at least `fraction` of them at or below."""
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def shares(total: int, parts: int) -> list[int]:
    """`total` split into `parts` counts that differ by at most one."""
    base, extra = divmod(total, parts)
    return [base + (1 if index < extra else 0) for index in range(parts)]


# -- the SQLite file ---------------------------------------------------------------------------


@contextlib.contextmanager
def open_database(path: Path) -> Iterator[sqlite3.Connection]:
    """A connection of our own to a daemon's database (WAL: it never blocks the daemon)."""
    conn = sqlite3.connect(path, isolation_level=None, timeout=30.0)
    try:
        yield conn
    finally:
        conn.close()


def any_unfinished(conn: sqlite3.Connection) -> bool:
    """Whether a job is still queued or running: one index probe, where a count would take
    CPU from the daemon being measured every time it is polled."""
    return (
        conn.execute("SELECT 1 FROM jobs WHERE status IN ('queued', 'running') LIMIT 1").fetchone()
        is not None
    )


def done_jobs(conn: sqlite3.Connection) -> int:
    return conn.execute("SELECT COUNT(*) FROM jobs WHERE status = 'done'").fetchone()[0]


def last_finished_at(conn: sqlite3.Connection) -> float:
    return conn.execute("SELECT MAX(finished_at) FROM jobs").fetchone()[0]


def prefill(path: Path, *, queued: int, running: int = 0) -> None:
    """Write jobs straight into a fresh database, in one transaction: `queued` jobs due now,
    and `running` jobs as a `kill -9` leaves them (attempt 1, started, never finished)."""
    now = time.time()
    with open_database(path) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=OFF")
        migrate(conn)
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO jobs (kind, user, status, priority, payload, attempt, max_attempts,"
            " created_at, updated_at, available_at, started_at, heartbeat_at)"
            " VALUES (?, 'bench', ?, 0, '{}', ?, 4, ?, ?, ?, ?, ?)",
            (
                (NOOP_KIND, "queued", 0, now, now, now, None, None)
                if index < queued
                else (NOOP_KIND, "running", 1, now, now, now, now, now)
                for index in range(queued + running)
            ),
        )
        conn.execute("COMMIT")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")


# -- the daemon as a child process -------------------------------------------------------------


class ServeProcess:
    """`jobwarden serve` on a directory holding config.toml, logging to serve.log."""

    def __init__(
        self, directory: Path, *, synchronous: str = "NORMAL", log_level: str, url: str = ""
    ) -> None:
        self.directory = directory
        self.config_path = directory / "config.toml"
        self.config_path.write_text(
            config_text(synchronous=synchronous, log_level=log_level, url=url), encoding="utf-8"
        )
        self.socket_path = directory / "admin.sock"
        self.db_path = directory / "jw.db"
        self.log_path = directory / "serve.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.spawned_at = 0.0

    def start(self) -> ServeProcess:
        with self.log_path.open("ab") as log:
            self.spawned_at = time.monotonic()
            self.process = subprocess.Popen(
                jobwarden_command("serve", "--config", str(self.config_path)),
                cwd=self.directory,
                env=daemon_env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def wait_ready_line(self) -> float:
        """Seconds from the spawn until the "jobwarden ready" line was logged (log level info)."""
        with self.log_path.open("rb") as log:
            buffer = b""
            while True:
                self._check_alive()
                chunk = log.read()
                if not chunk:
                    if time.monotonic() - self.spawned_at > READY_TIMEOUT:
                        raise TimeoutError(f"no ready line within {READY_TIMEOUT:g}s")
                    time.sleep(POLL_INTERVAL)
                    continue
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                if any(_event_of(raw) == READY_EVENT for raw in lines):
                    return time.monotonic() - self.spawned_at

    def logged(self, event: str) -> dict[str, Any]:
        """The first log line with this event."""
        with self.log_path.open("rb") as log:
            for raw in log:
                if _event_of(raw) == event:
                    return msgspec.json.decode(raw)
        raise LookupError(f"{event!r} is not in {self.log_path}")

    def wait_serving(self) -> None:
        """Wait until the admin socket answers a ping (at any log level)."""
        while True:
            self._check_alive()
            with contextlib.suppress(DaemonUnreachable), AdminClient(self.socket_path) as client:
                client.call("ping")
                return
            if time.monotonic() - self.spawned_at > READY_TIMEOUT:
                raise TimeoutError(f"admin socket silent for {READY_TIMEOUT:g}s")
            time.sleep(POLL_INTERVAL)

    def rss_bytes(self) -> int:
        return psutil.Process(self.pid).memory_info().rss

    def stop(self) -> None:
        """SIGTERM: the daemon drains (no-op jobs finish at once) and exits 0."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(STOP_TIMEOUT)
        if code != 0:
            raise RuntimeError(f"jobwarden serve exited {code}; see {self.log_path}")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> ServeProcess:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.kill()

    def _check_alive(self) -> None:
        assert self.process is not None
        if self.process.poll() is not None:
            tail = self.log_path.read_text(errors="replace").splitlines()[-20:]
            raise RuntimeError(
                f"jobwarden serve exited {self.process.returncode}:\n" + "\n".join(tail)
            )


@contextlib.contextmanager
def serving(**options: str) -> Iterator[ServeProcess]:
    """A daemon on a fresh temporary directory, once it serves; killed if still running after."""
    with (
        tempfile.TemporaryDirectory(prefix="jobwarden-bench-") as directory,
        ServeProcess(Path(directory), **options) as daemon,
    ):
        daemon.wait_serving()
        yield daemon


def _event_of(raw: bytes) -> str | None:
    try:
        line = msgspec.json.decode(raw)
    except msgspec.DecodeError:
        return None
    return line.get("event") if isinstance(line, dict) else None
