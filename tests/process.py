"""Run the real daemon as a child process, the way an operator does, for integration tests.

`DaemonProcess` writes a config.toml into a directory, starts `jobwarden serve` on it and
waits for the "jobwarden ready" log line on stdout, never for a fixed time. Its JSON log
keeps being collected in a background thread, so the pipe never fills up and blocks the
daemon, and tests can assert on what it logged. `DaemonFactory` hands out daemons and kills
whatever is still running when a test ends, passed or failed.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from jobwarden.client import AdminClient
from tests import postgres

REPO_ROOT = Path(__file__).resolve().parent.parent
READY_EVENT = "jobwarden ready"
READY_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
LOG_TAIL_LINES = 60

# Tests of other things must not meet the per-user guards or pause for a busy test machine.
NO_LIMITS: dict[str, Any] = {
    "credits": "unlimited",
    "rate": "off",
    "daily_jobs": 0,
    "max_queued": 0,
    "max_memory_percent": 100,
    "max_cpu_percent": 100,
}

DEFAULT_CONFIG: dict[str, Any] = {
    "daemon": {"max_concurrent_jobs": 4, "shutdown_grace": "5s"},
    "store": {"path": "var/jw.db"},
    "admin": {"socket": "var/admin.sock"},
    "http": {"listen": "127.0.0.1:0"},
    "websocket": {"listen": "127.0.0.1:0"},
    "log": {"format": "json", "level": "info"},
    "limits": NO_LIMITS,
    "kinds": {"quick": {"handler": "tests.handlers:sleepy"}},
}


def free_port() -> int:
    """A TCP port on the loopback that nothing listens on now (for a daemon's listener or a
    receiver that must keep its port across a restart)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class DaemonStartError(Exception):
    """The daemon exited, or stayed silent, before saying it was ready."""


def merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Tables merge key by key; anything else in `override` replaces what `base` had."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def toml_text(config: Mapping[str, Any]) -> str:
    """Enough TOML for test configs: nested tables of strings, numbers, booleans and lists."""
    lines: list[str] = []

    def table(prefix: str, values: Mapping[str, Any]) -> None:
        scalars = {k: v for k, v in values.items() if not isinstance(v, Mapping)}
        tables = {k: v for k, v in values.items() if isinstance(v, Mapping)}
        if prefix and (scalars or not tables):
            lines.append(f"[{prefix}]")
        lines.extend(f"{key} = {json.dumps(value)}" for key, value in scalars.items())
        for key, value in tables.items():
            table(f"{prefix}.{key}" if prefix else key, value)

    table("", config)
    return "\n".join(lines) + "\n"


def daemon_env() -> dict[str, str]:
    """The test's environment, plus the repository on the path so `tests.handlers` imports."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    # Not under systemd: the daemon must not try to notify whatever manager runs the tests.
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "JOBWARDEN_CONFIG"):
        env.pop(name, None)
    return env


def jobwarden_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "jobwarden.cli", *args]


def run_jobwarden(
    *args: str, cwd: Path, timeout: float = 30.0, stdin: str | None = None
) -> subprocess.CompletedProcess:
    """Run one `jobwarden ...` command to completion, with `stdin` as its input, capturing
    its output as text."""
    return subprocess.run(
        jobwarden_command(*args),
        cwd=cwd,
        input=stdin,
        env=daemon_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


class DaemonProcess:
    """One daemon's directory and config; `start()` may be called again after it stopped.

    `DaemonProcess(directory, config)` writes `config`, over DEFAULT_CONFIG, into the
    directory's config.toml and serves it with --config. `DaemonProcess.in_place(directory)`
    serves the config.toml already there, as `jobwarden init` wrote it, the way an operator
    does: `jobwarden serve` run in that directory, with no --config.
    """

    def __init__(self, directory: Path, config: Mapping[str, Any] | None = None) -> None:
        merged = merge(DEFAULT_CONFIG, config or {})
        if "url" in merged["store"]:
            # A URL replaces the file: [store] takes one of them.
            merged["store"] = {k: v for k, v in merged["store"].items() if k != "path"}
        elif postgres.current_url is not None and merged["store"] == DEFAULT_CONFIG["store"]:
            # A test running on PostgreSQL: its schema instead of the file.
            merged["store"] = {"url": postgres.current_url}
        config_path = directory / "config.toml"
        config_path.write_text(toml_text(merged), encoding="utf-8")
        self._prepare(directory, merged, serve_options=["--config", str(config_path)])

    @classmethod
    def in_place(cls, directory: Path) -> DaemonProcess:
        daemon = cls.__new__(cls)
        config = tomllib.loads((directory / "config.toml").read_text(encoding="utf-8"))
        daemon._prepare(directory, config, serve_options=[])
        return daemon

    def _prepare(
        self, directory: Path, config: Mapping[str, Any], *, serve_options: list[str]
    ) -> None:
        self.directory = directory
        self.config = config
        self.config_path = directory / "config.toml"
        self.socket_path = directory / self.config["admin"]["socket"]
        # The SQLite file; None when the daemon runs on PostgreSQL.
        path = self.config["store"].get("path")
        self.db_path = directory / path if path else None
        # What the store is: the file, or the PostgreSQL URL.
        self.database = str(self.db_path) if path else self.config["store"]["url"]
        self.serve_options = serve_options
        self.process: subprocess.Popen[bytes] | None = None
        # Every log line of every run, in order; non-JSON lines are kept under "raw".
        self.log_lines: list[dict[str, Any]] = []
        # What those lines weighed, newlines included: how much the log grew.
        self.log_bytes = 0
        self.stderr_lines: list[str] = []
        self.starts = 0
        self._log_changed = threading.Condition()
        self._threads: list[threading.Thread] = []

    # -- lifecycle ------------------------------------------------------------------------

    def start(self, timeout: float = READY_TIMEOUT) -> DaemonProcess:
        """Start `jobwarden serve` and return once it logged that it is ready."""
        assert not self.running, "the daemon is already running"
        self.process = subprocess.Popen(
            jobwarden_command("serve", *self.serve_options),
            cwd=self.directory,
            env=daemon_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.starts += 1
        self._threads = [
            threading.Thread(target=self._collect_stderr, args=(self.process,), daemon=True)
        ]
        self._threads[0].start()
        leftover = self._read_until_ready(self.process, timeout)
        collector = threading.Thread(
            target=self._collect_stdout, args=(self.process, leftover), daemon=True
        )
        collector.start()
        self._threads.append(collector)
        return self

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def kill9(self) -> int:
        """SIGKILL: the daemon gets no chance to clean up, as in a crash or an OOM kill."""
        return self._signal_and_wait(signal.SIGKILL)

    def terminate(self) -> None:
        """SIGTERM, as systemd stops the service; `wait()` for the exit code."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)

    def wait(self, timeout: float = STOP_TIMEOUT) -> int:
        """The exit code, once the process has exited and its output is collected."""
        assert self.process is not None
        code = self.process.wait(timeout)
        for thread in self._threads:
            thread.join(timeout)
        return code

    def stop(self) -> int:
        """A clean stop (SIGTERM), for tests that only need the daemon gone."""
        self.terminate()
        return self.wait()

    def close(self) -> None:
        """Whatever state a test left it in: make sure no daemon outlives the test."""
        if self.running:
            self._signal_and_wait(signal.SIGKILL)

    def client(self, timeout: float = 10.0) -> AdminClient:
        return AdminClient(self.socket_path, timeout=timeout)

    # -- the log --------------------------------------------------------------------------

    def logs(self, event: str | None = None) -> list[dict[str, Any]]:
        with self._log_changed:
            return [line for line in self.log_lines if event is None or line.get("event") == event]

    def wait_for_log(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 10.0
    ) -> dict[str, Any]:
        """The first logged line (of any run) matching `predicate`, waiting for it if needed."""
        deadline = time.monotonic() + timeout
        with self._log_changed:
            while True:
                for line in self.log_lines:
                    if predicate(line):
                        return line
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no matching log line within {timeout:g}s")
                self._log_changed.wait(remaining)

    def output(self) -> str:
        """Everything the daemon printed, for assertion messages."""
        with self._log_changed:
            stdout = [line.get("raw") or json.dumps(line) for line in self.log_lines]
        return "\n".join([*stdout, "--- stderr ---", *self.stderr_lines])

    # -- internals ------------------------------------------------------------------------

    def _signal_and_wait(self, signum: signal.Signals) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signum)
        return self.wait()

    def _record(self, raw: bytes) -> dict[str, Any]:
        text = raw.decode("utf-8", "replace")
        try:
            line = json.loads(text)
        except ValueError:
            line = None
        if not isinstance(line, dict):
            line = {"raw": text}
        with self._log_changed:
            self.log_lines.append(line)
            self.log_bytes += len(raw) + 1
            self._log_changed.notify_all()
        return line

    def _read_until_ready(self, process: subprocess.Popen[bytes], timeout: float) -> bytes:
        """Read stdout lines with select until the ready line; returns bytes read past it."""
        assert process.stdout is not None
        deadline = time.monotonic() + timeout
        fd = process.stdout.fileno()
        buffer = b""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                process.kill()
                process.wait()
                raise DaemonStartError(f"not ready within {timeout:g}s:\n{self.output()}")
            readable, _, _ = select.select([fd], [], [], remaining)
            if not readable:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                code = process.wait()
                self._threads[0].join(STOP_TIMEOUT)
                raise DaemonStartError(f"exited with {code} before ready:\n{self.output()}")
            buffer += chunk
            while b"\n" in buffer:
                raw, buffer = buffer.split(b"\n", 1)
                if self._record(raw).get("event") == READY_EVENT:
                    return buffer

    def _collect_stdout(self, process: subprocess.Popen[bytes], leftover: bytes) -> None:
        assert process.stdout is not None
        fd = process.stdout.fileno()
        buffer = leftover
        while True:
            while b"\n" in buffer:
                raw, buffer = buffer.split(b"\n", 1)
                self._record(raw)
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            buffer += chunk
        if buffer:
            self._record(buffer)
        process.stdout.close()

    def _collect_stderr(self, process: subprocess.Popen[bytes]) -> None:
        assert process.stderr is not None
        with process.stderr:
            for raw in process.stderr:
                with self._log_changed:
                    self.stderr_lines.append(raw.decode("utf-8", "replace").rstrip("\n"))
                    self._log_changed.notify_all()


class DaemonFactory:
    """Makes daemons in subdirectories of one test directory; kills leftovers on exit."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._daemons: list[DaemonProcess] = []

    def __call__(
        self, config: Mapping[str, Any] | None = None, *, name: str = "d", start: bool = True
    ) -> DaemonProcess:
        directory = self.directory / name
        directory.mkdir(parents=True, exist_ok=True)
        daemon = DaemonProcess(directory, config)
        self._daemons.append(daemon)
        return daemon.start() if start else daemon

    def close(self) -> None:
        for daemon in self._daemons:
            daemon.close()
            # pytest shows a test's captured output only when it fails: then this log tail
            # tells what the daemon was doing.
            tail = daemon.output().splitlines()[-LOG_TAIL_LINES:]
            print(
                f"--- {daemon.directory} (started {daemon.starts}x), log tail ---", *tail, sep="\n"
            )

    def __enter__(self) -> DaemonFactory:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def daemon_factory(directory: Path) -> Iterator[DaemonFactory]:
    """The body of a pytest fixture: `yield from daemon_factory(tmp_path)`."""
    with DaemonFactory(directory) as factory:
        yield factory
