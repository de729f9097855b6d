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
import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from jobwarden.errors import AdminError
from tests import postgres
from tests.process import DaemonFactory, DaemonProcess, daemon_factory, merge, run_jobwarden
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
SLEEPY = {"handler": "tests.handlers:sleepy"}
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


def test_three_daemons_started_at_once_on_a_new_schema_all_serve(shared_url, daemons):
    on_url = merge(CLUSTER_CONFIG, {"store": {"url": shared_url, "path": ""}})
    cluster = [daemons(on_url, name=f"node{index}", start=False) for index in range(3)]
    # Each start returns once its daemon is ready, or raises if it exited before.
    with ThreadPoolExecutor(len(cluster)) as starting:
        list(starting.map(lambda daemon: daemon.start(), cluster))
    with cluster[0].client() as client:
        assert len(client.call("status")["nodes"]) == 3
    with database(shared_url) as conn:
        # Migrated once: the version row is written by each migration that runs.
        assert conn.execute("SELECT COUNT(*) FROM schema_version").fetchone()[0] == 1
    for daemon in cluster:
        assert daemon.stop() == 0
        assert errors_logged(daemon) == []


def test_a_job_running_on_another_daemon_is_canceled_over_the_http_api(shared_url, daemons):
    # node0 runs one job at a time and is kept busy by a kind only it knows: the job
    # submitted to it runs on node1.
    shared = {"store": {"url": shared_url, "path": ""}, "kinds": {"slow": SLEEPY}}
    busy_config = {"daemon": {"max_concurrent_jobs": 1}, "kinds": {"busy": SLEEPY}}
    entry = daemons(merge(CLUSTER_CONFIG, merge(shared, busy_config)), name="node0")
    runner = daemons(merge(CLUSTER_CONFIG, shared), name="node1")
    added = run_jobwarden(
        "tokens", "add", "--operator", "ci", "--config", str(entry.config_path), cwd=entry.directory
    )
    assert added.returncode == 0, added.stderr
    token = next(line.split()[-1] for line in added.stdout.splitlines() if line.startswith("token"))
    port = entry.logs("jobwarden ready")[-1]["http_port"]
    with httpx.Client(
        base_url=f"http://127.0.0.1:{port}",
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    ) as http:
        busy = http.post("/v1/jobs", json={"kind": "busy", "payload": {"seconds": 60}}).json()
        follow_jobs(entry, until=lambda progress: busy["id"] in progress.running)
        job = http.post("/v1/jobs", json={"kind": "slow", "payload": {"seconds": 60}}).json()
        follow_jobs(entry, until=lambda progress: job["id"] in progress.running)
        with runner.client() as client:
            runner_node = client.call("status")["node"]
        with database(shared_url) as conn:
            ran_on = conn.execute("SELECT node FROM jobs WHERE id = %s", (job["id"],)).fetchone()
        assert ran_on == (runner_node,)
        assert http.post(f"/v1/jobs/{job['id']}/cancel").status_code == 200
        final = http.get(f"/v1/jobs/{job['id']}/result?wait=20s")
        assert (final.status_code, final.json()["status"]) == (200, "canceled")
        assert http.post(f"/v1/jobs/{busy['id']}/cancel").status_code == 200
    for daemon in (entry, runner):
        assert daemon.stop() == 0
        assert errors_logged(daemon) == []


@pytest.fixture
def server() -> Iterator[postgres.Cluster]:
    """A PostgreSQL of the test's own, to stop and start."""
    yield from postgres.own_cluster_in_temp()


def test_postgresql_stopped_and_started_under_running_daemons_loses_nothing_acknowledged(
    server, daemons, tmp_path
):
    completions = tmp_path / "completions.log"
    cluster = start_cluster(daemons, server.url)
    payloads = [{"log": str(completions)}] * 300
    accepted = round_robin_submit(cluster, payloads, kind="recorded")
    server.stop()
    # Down until a daemon has met the outage (its node lease is renewed every third of it).
    cluster[0].wait_for_log(
        lambda line: line["event"] in ("node lease not renewed", "store takes no writes"),
        timeout=GENEROUS_DEADLINE,
    )
    server.start()
    # Refused (not acknowledged) until each daemon's store has reconnected, then taken.
    more: set[int] = set()
    deadline = time.monotonic() + GENEROUS_DEADLINE
    while len(more) < 60 and time.monotonic() < deadline:
        daemon = cluster[len(more) % len(cluster)]
        try:
            with daemon.client() as client:
                more.add(client.call("submit", kind="recorded", payload=payloads[0])["job"]["id"])
        except AdminError as refused:
            assert refused.error.code in ("STORAGE_UNAVAILABLE", "STORAGE_ERROR"), refused
            # Until this daemon has said its store takes writes again as often as it said
            # it took none (its log lines, not a sleep).
            daemon.wait_for_log(
                lambda _line, daemon=daemon: (
                    len(daemon.logs("store takes writes again"))
                    >= len(daemon.logs("store takes no writes"))
                ),
                timeout=GENEROUS_DEADLINE,
            )
    acknowledged = accepted | more
    progress = follow_jobs(cluster[0], until=lambda p: acknowledged <= p.finished)
    for daemon in cluster:
        assert daemon.stop() == 0
    with database(server.url) as conn:
        stored = dict(conn.execute("SELECT id, status FROM jobs"))
    assert acknowledged <= set(stored)
    assert acknowledged <= progress.finished
    assert {stored[job] for job in acknowledged} == {"done"}


def test_a_paused_daemon_cannot_finish_the_jobs_taken_from_it(shared_url, daemons):
    """SIGSTOP one daemon longer than its lease while it runs jobs: the others recover and
    finish them; resumed, it finds its node taken for dead, and what its handlers come to
    is written nowhere."""
    # Four slots a daemon for twelve jobs: every daemon runs some, the paused one included.
    slow = {
        "daemon": {"max_concurrent_jobs": 4},
        "kinds": {"slow": {"handler": "tests.handlers:sleepy", "max_attempts": 10}},
    }
    cluster = start_cluster(daemons, shared_url, slow)
    paused = cluster[2]
    with paused.client() as client:
        node = client.call("status")["node"]
    accepted = set(round_robin_submit(cluster, [{"seconds": 2.0}] * 12, kind="slow", chunk=4))
    follow_jobs(cluster[0], until=lambda progress: len(progress.running) >= 12)
    with database(shared_url) as conn:
        held = {
            job
            for (job,) in conn.execute(
                "SELECT id FROM jobs WHERE status = 'running' AND node = %s", (node,)
            )
        }
    assert held, "no job ran on the daemon about to be paused"
    os.kill(paused.pid, signal.SIGSTOP)
    try:
        time.sleep(LEASE * 4 / 3 + 1.0)
        progress = follow_jobs(cluster[0], until=lambda p: len(p.finished) == len(accepted))
    finally:
        os.kill(paused.pid, signal.SIGCONT)
    paused.wait_for_log(lambda line: line["event"].startswith("this node was taken for dead"))
    paused.wait_for_log(
        lambda _line: len(paused.logs("lost the job")) >= len(held), timeout=GENEROUS_DEADLINE
    )
    assert {line["job"] for line in paused.logs("lost the job")} == held
    for daemon in cluster:
        assert daemon.stop() == 0
    events = status_events(shared_url)
    terminal = collections.Counter(job for job, status, *_ in events if status == "done")
    assert progress.finished == accepted
    assert set(terminal) == accepted and set(terminal.values()) == {1}
    recovered = {job for job, _, reason, *_ in events if reason == "RECOVERED"}
    assert held <= recovered


def test_a_breaker_tripped_on_one_daemon_holds_its_kinds_on_all_three(shared_url, daemons):
    guarded = {
        "services": {"provider": {"breaker": {"failures": 3, "recovery": "1h"}}},
        "kinds": {"needs_provider": {"handler": "tests.handlers:sleepy", "services": ["provider"]}},
    }
    cluster = start_cluster(daemons, shared_url, guarded)
    with cluster[0].client() as client:
        client.call("breaker", service="provider", action="trip")
    held = set()
    for daemon in cluster:
        with daemon.client() as client:
            for _ in range(2):
                held.add(client.call("submit", kind="needs_provider")["job"]["id"])
    time.sleep(LEASE)
    with database(shared_url) as conn:
        statuses = {status for (status,) in conn.execute("SELECT status FROM jobs")}
    assert statuses == {"queued"}
    with cluster[2].client() as client:
        client.call("breaker", service="provider", action="reset")
    follow_jobs(cluster[1], until=lambda progress: held <= progress.finished)


def test_a_user_limited_to_10_a_minute_gets_10_of_30_across_three_daemons(shared_url, daemons):
    limited = {"limits": {"rate": "10/m", "burst": 10}}
    cluster = start_cluster(daemons, shared_url, limited)
    accepted, refused = 0, collections.Counter()
    for attempt in range(30):
        with cluster[attempt % 3].client() as client:
            try:
                client.call("submit", kind="recorded", user="carol", payload={"log": "/dev/null"})
                accepted += 1
            except AdminError as error:
                refused[error.error.code] += 1
    assert (accepted, refused) == (10, {"RATE_LIMITED": 20})
