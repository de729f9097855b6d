"""Fixtures: an in-process daemon on MockClock, and ways to drive it like a client would."""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from jobwarden.actors.messages import Submit
from jobwarden.config import Config, load_config, load_config_text
from jobwarden.mailbox import ReplySlot
from jobwarden.process.admin import Stop
from jobwarden.process.commands import Commands
from jobwarden.process.supervisor import DaemonHandle, Supervisor
from jobwarden.process.systemd import SystemdNotifier
from jobwarden.store import jobs
from jobwarden.store.backend import backend_for
from jobwarden.system import SystemLoad
from jobwarden.wire.views import TERMINAL_STATUSES, Event, JobView
from tests import postgres

EPOCH = 1_800_000_000.0
GB = 1024**3


def machine_load(**figures: float) -> SystemLoad:
    """A reading of the machine a test imagines: 32 GB, lightly used, but for `figures`."""
    idle = {
        "memory_percent": 20.0,
        "memory_available": 16 * GB,
        "memory_total": 32 * GB,
        "cpu_percent": 5.0,
        "daemon_rss": 100 * 1024**2,
    }
    return SystemLoad(**{**idle, **figures})  # type: ignore[arg-type]


def idle_machine() -> SystemLoad:
    return machine_load()


WEBSOCKET = """
[websocket]
listen = "127.0.0.1:0"
"""

BASE_CONFIG = (
    """
[daemon]
max_concurrent_jobs = {max_concurrent_jobs}
shutdown_grace = "30s"

[store]
path = "var/jw.db"

[admin]
socket = "var/admin.sock"

[http]
listen = "127.0.0.1:0"
"""
    + WEBSOCKET
    + """
[retry]
max_attempts = 4
backoff = ["0s", "30s", "120s"]
jitter = 0.0
"""
)

# Tests of other things must not meet the per-user guards; a test of the guards brings its
# own [limits] table, which replaces this one.
NO_LIMITS = """
[limits]
credits = "unlimited"
rate = "off"
daily_jobs = 0
max_queued = 0
max_memory_percent = 100
max_cpu_percent = 100
"""


STORES = ["sqlite", "postgresql"]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A test marked `both_stores` (or in a module marked so) runs once on each store."""
    if metafunc.definition.get_closest_marker("both_stores") is not None:
        if "database" not in metafunc.fixturenames:
            metafunc.fixturenames.append("database")
        metafunc.parametrize("database", STORES, indirect=True)


@pytest.fixture(autouse=True)
def database(request: pytest.FixtureRequest) -> Iterator[str]:
    """The store the test runs on: SQLite, or for a `both_stores` test also PostgreSQL, in a
    fresh schema of its own that make_config and DaemonProcess put in the [store] they
    write. A test marked `sqlite_only` skips its PostgreSQL run (say why in the marker)."""
    store = getattr(request, "param", "sqlite")
    if store == "sqlite":
        yield store
        return
    only = request.node.get_closest_marker("sqlite_only")
    if only is not None:
        pytest.skip(f"SQLite only: {only.args[0] if only.args else ''}")
    with postgres.fresh_schema() as url:
        postgres.current_url = url
        try:
            yield store
        finally:
            postgres.current_url = None


@pytest.fixture
def store_target(tmp_path: Path) -> str:
    """The database a test opens a Store on: a file, or the PostgreSQL schema of a
    `both_stores` test's PostgreSQL run."""
    return postgres.current_url or str(tmp_path / "jw.db")


def make_config(tmp_path: Path, extra: str, *, max_concurrent_jobs: int = 2) -> Config:
    base = BASE_CONFIG.format(max_concurrent_jobs=max_concurrent_jobs)
    if postgres.current_url is not None and "[store]" not in extra:
        base = base.replace('path = "var/jw.db"', f"url = {json.dumps(postgres.current_url)}")
    if "[limits]" not in extra:
        base += NO_LIMITS
    if "[websocket]" in extra:
        # A test of the WebSocket's settings brings its own table, listen address included.
        base = base.replace(WEBSOCKET, "")
    return load_config_text(base + extra, base_dir=tmp_path)


@contextlib.contextmanager
def opened_database(target: str) -> Iterator[Any]:
    """A connection of the test's own to a store's database (a file or a URL), as the next
    start would read it."""
    with contextlib.closing(backend_for(target).connect(target, "NORMAL")) as conn:
        yield conn


class Daemon:
    """An in-process daemon with an inline store (no threads), so virtual time is exact."""

    def __init__(self, handle: DaemonHandle, done: trio.Event, admin_socket: str = "") -> None:
        self.handle = handle
        self.stopped = done
        self.admin_socket = admin_socket

    @property
    def now(self) -> float:
        return self.handle.clock.now()

    @functools.cached_property
    def commands(self) -> Commands:
        """A command layer over the daemon's store, hub and actors, as its listeners have
        one."""
        handle = self.handle
        return Commands(
            config=None,  # only the operator's commands read it
            clock=handle.clock,
            store=handle.store,
            hub=handle.hub,
            job_logs=handle.job_logs,
            admission=handle.admission,
            scheduler=handle.scheduler,
            pool=handle.pool,
            monitor=handle.monitor,
            breaker=handle.breaker,
            ledger=handle.ledger,
        )

    async def submit(self, kind: str, payload: object = None, **options: object) -> JobView:
        reply: ReplySlot[tuple[JobView, bool]] = ReplySlot()
        await self.handle.admission.send(
            Submit(
                kind=kind,
                payload={} if payload is None else payload,
                user=str(options.pop("user", "alice")),
                reply=reply,
                **options,  # type: ignore[arg-type]
            )
        )
        job, _ = await reply.wait()
        return job

    async def job(self, job_id: int) -> JobView:
        if self.stopped.is_set():
            # The daemon closed its store: read the database as the next start would.
            with opened_database(self.handle.store.path) as conn:
                job = jobs.get_job(conn, job_id)
        else:
            job = await self.handle.store.read(partial(jobs.get_job, job_id=job_id))
        assert job is not None
        return job

    async def events(self, job_id: int) -> list[Event]:
        return await self.handle.store.read(
            partial(jobs.events_since, since=0, job=job_id, limit=1_000_000)
        )

    async def wait_status(self, job_id: int, statuses: set[str] | frozenset[str]) -> JobView:
        with self.handle.hub.subscribe(job=job_id, buffer=10_000) as sub:
            job = await self.job(job_id)
            while job.status not in statuses:
                await sub.events.receive()
                job = await self.job(job_id)
        return job

    async def wait_done(self, job_id: int) -> JobView:
        return await self.wait_status(job_id, TERMINAL_STATUSES)

    async def stop(self, grace: float | None = None) -> None:
        await self.handle.control.send(Stop(grace=grace))
        await self.stopped.wait()


@pytest.fixture
def start_daemon(nursery: trio.Nursery, tmp_path: Path):
    """Start an in-process daemon for a config snippet; returns a `Daemon`."""

    async def start(
        extra: str = "",
        *,
        max_concurrent_jobs: int = 2,
        config_path: Path | None = None,
        notifier: SystemdNotifier | None = None,
        sample_system: Callable[[], SystemLoad] | None = None,
        clock_epoch: float = EPOCH,
        config: Config | None = None,
    ) -> Daemon:
        if config is None and config_path is not None:
            config = load_config(config_path)
        elif config is None:
            config = make_config(tmp_path, extra, max_concurrent_jobs=max_concurrent_jobs)
        supervisor = Supervisor(
            config,
            config_path=config_path,
            notifier=notifier,
            threaded_store=False,
            clock_epoch=clock_epoch,
            # The machine running the tests is not the one the test imagines.
            sample_system=sample_system or idle_machine,
        )
        done = trio.Event()

        async def run(task_status: trio.TaskStatus[DaemonHandle]) -> None:
            try:
                await supervisor.run(task_status=task_status)
            finally:
                done.set()

        handle = await nursery.start(run)
        return Daemon(handle, done, str(config.path(config.admin.socket)))

    return start
