"""Three real daemons on one PostgreSQL database act as one jobwarden.

Each test starts `jobwarden serve` three times on a schema of its own (skipped without a
test PostgreSQL, see tests/postgres.py) and checks what a user of the cluster would notice:
every accepted job ends exactly once however a daemon dies, a watcher on one daemon sees
every event of a job another runs, and nothing acknowledged is lost when the database
itself goes away and comes back.
"""

from __future__ import annotations

import collections
import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import postgres
from tests.process import DaemonFactory, DaemonProcess, daemon_factory, merge
from tests.test_integration import (
    GENEROUS_DEADLINE,
    Connection,
    errors_logged,
    follow_jobs,
    pipelined_submit,
)

# The shortest lease a config takes: a dead daemon's jobs are back in the queue within it
# and a third (the maintenance role looks every third of a lease).
LEASE = 3.0
CLUSTER_CONFIG: dict[str, Any] = {
    "daemon": {"max_concurrent_jobs": 8, "crash_loop_after": 1000},
    "cluster": {"lease": f"{LEASE:g}s"},
    "kinds": {"recorded": {"handler": "tests.handlers:records_completion", "max_attempts": 50}},
}


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[DaemonFactory]:
    yield from daemon_factory(tmp_path)


@pytest.fixture
def shared_url() -> Iterator[str]:
    with postgres.fresh_schema() as url:
        yield url


def start_cluster(
    daemons: DaemonFactory, url: str, config: dict[str, Any] | None = None, count: int = 3
) -> list[DaemonProcess]:
    on_url = merge(merge(CLUSTER_CONFIG, config or {}), {"store": {"url": url, "path": ""}})
    return [daemons(on_url, name=f"node{index}") for index in range(count)]


@contextlib.contextmanager
def database(url: str) -> Iterator[Any]:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        yield conn


def status_events(url: str) -> list[tuple[int, str, str | None, int, float]]:
    """Every status event: (job, status, reason, attempt, at), in seq order."""
    with database(url) as conn:
        rows = conn.execute(
            "SELECT job_id, data, at FROM events WHERE type = 'status' ORDER BY seq"
        ).fetchall()
    events = []
    for job_id, data, at in rows:
        fields = json.loads(data)
        events.append((job_id, fields["status"], fields.get("reason"), fields["attempt"], at))
    return events


def round_robin_submit(
    cluster: list[DaemonProcess], payloads: list[dict[str, Any]], *, kind: str, chunk: int = 100
) -> set[int]:
    """Submit in chunks, each to the next daemon in turn; returns the accepted job ids."""
    accepted: set[int] = set()
    for start in range(0, len(payloads), chunk):
        daemon = cluster[(start // chunk) % len(cluster)]
        accepted |= set(pipelined_submit(daemon, payloads[start : start + chunk], kind=kind))
    return accepted


@pytest.mark.parametrize(
    "jobs",
    [
        pytest.param(900, id="900-jobs"),
        pytest.param(10_000, id="10000-jobs", marks=pytest.mark.slow),
    ],
)
def test_a_daemon_killed_mid_run_loses_nothing_and_no_job_ends_twice(
    shared_url, daemons, tmp_path, jobs
):
    completions = tmp_path / "completions.log"
    cluster = start_cluster(daemons, shared_url)
    accepted = round_robin_submit(cluster, [{"log": str(completions)}] * jobs, kind="recorded")
    assert len(accepted) == jobs
    victim = cluster[1]
    # Kill it while jobs run everywhere, as a client of another daemon sees it.
    follow_jobs(cluster[0], until=lambda progress: len(progress.finished) >= jobs // 4)
    victim.kill9()
    killed_at = time.time()
    # The other two finish everything, the dead daemon's jobs included once recovered.
    progress = follow_jobs(cluster[0], until=lambda p: len(p.finished) == jobs)
    victim.start()
    for daemon in cluster:
        assert daemon.stop() == 0
        assert errors_logged(daemon) == []

    events = status_events(shared_url)
    terminal = collections.Counter(
        job for job, status, *_ in events if status != "queued" and status != "running"
    )
    recovered = [(job, at) for job, _, reason, _, at in events if reason == "RECOVERED"]
    runs = collections.Counter(
        tuple(map(int, line.split())) for line in completions.read_text().splitlines()
    )
    assert progress.finished == accepted
    assert set(terminal) == accepted and set(terminal.values()) == {1}
    with database(shared_url) as conn:
        assert dict(conn.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status")) == {
            "done": jobs
        }
    # No attempt was run to completion by two daemons: each (job, attempt) once.
    assert set(runs.values()) == {1}
    assert recovered, "the kill landed while no job ran there, so recovery went untested"
    # Recovered within the lease and a third of it, give or take a loaded machine's second.
    assert max(at for _, at in recovered) - killed_at < LEASE * 4 / 3 + 2.0


def test_a_watcher_on_one_daemon_sees_every_event_of_a_job_another_runs(shared_url, daemons):
    # Only node1 knows the kind, so only node1 runs the job; the watcher is on node0.
    steps = {"kinds": {"steps": {"handler": "tests.handlers:stepper"}}}
    runner_config = merge(CLUSTER_CONFIG, merge(steps, {"store": {"url": shared_url, "path": ""}}))
    watcher_side = daemons(
        merge(CLUSTER_CONFIG, {"store": {"url": shared_url, "path": ""}}), name="node0"
    )
    runner = daemons(runner_config, name="node1")
    with runner.client() as client:
        job = client.call("submit", kind="steps", payload={"steps": 12, "step_seconds": 0.1})[
            "job"
        ]["id"]
    seen: list[int] = []
    deadline = time.monotonic() + GENEROUS_DEADLINE
    # Half the events on one connection, then the rest on another from the last seq.
    with Connection(watcher_side.socket_path) as first:
        assert first.request("watch", job=job, since=0)["ok"]
        while len(seen) < 8:
            message = first.read(deadline)
            assert message is not None
            seen.append(message["event"]["seq"])
    with Connection(watcher_side.socket_path) as second:
        assert second.request("watch", job=job, since=seen[-1])["ok"]
        while True:
            message = second.read(deadline)
            assert message is not None
            event = message["event"]
            seen.append(event["seq"])
            if event["type"] == "status" and event["data"]["status"] == "done":
                break
    with database(shared_url) as conn:
        stored = [
            seq
            for (seq,) in conn.execute(
                "SELECT seq FROM events WHERE job_id = %s ORDER BY seq", (job,)
            )
        ]
    assert seen == stored
    assert len(stored) > 12  # queued, running, 12 progress, done


def test_postgresql_stopped_and_started_under_running_daemons_loses_nothing_acknowledged(
    daemons, tmp_path
):
    cluster_dir = tmp_path / "pg"
    with contextlib.ExitStack() as stack:
        server = postgres.Cluster(cluster_dir)
        url = server.start()
        stack.callback(server.stop)
        completions = tmp_path / "completions.log"
        nodes = start_cluster(daemons, url)
        accepted = round_robin_submit(nodes, [{"log": str(completions)}] * 300, kind="recorded")
        server.stop()
        time.sleep(1.0)
        server.start()
        # Submissions after the restart are taken again once the daemons have reconnected.
        more = round_robin_submit(nodes, [{"log": str(completions)}] * 60, kind="recorded")
        progress = follow_jobs(nodes[0], until=lambda p: p.finished >= accepted | more)
        for daemon in nodes:
            assert daemon.stop() == 0
        with database(url) as conn:
            stored = dict(conn.execute("SELECT id, status FROM jobs"))
    assert accepted | more <= set(stored)
    assert progress.finished >= accepted | more
    assert set(stored.values()) == {"done"}
