"""The monitor in a real daemon process, on compressed thresholds: hung jobs recovered,
probes and metrics served over HTTP, `jobwarden stuck --dry-run` changing nothing."""

from __future__ import annotations

import json
import os
import select
import signal
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import opened_database
from tests.process import DaemonFactory, daemon_factory, run_jobwarden

pytestmark = pytest.mark.both_stores

HANG_WITH_A_CHILD = """
import subprocess, sys, time
child = subprocess.Popen(["sleep", "300"])
open(sys.argv[1], "w").write(str(child.pid))
time.sleep(300)
"""


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[DaemonFactory]:
    yield from daemon_factory(tmp_path)


def final_status(daemon, job_id: int) -> dict:
    with daemon.client(timeout=30) as client:
        for event in client.watch(job=job_id):
            if event["type"] == "status" and event["data"]["status"] in ("done", "failed"):
                return event["data"]
    raise AssertionError("the watch ended before the job did")


def assert_exits(pid: int) -> None:
    """The process is gone within a few seconds: a pidfd turns readable when it exits."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        readable, _, _ = select.select([pidfd], [], [], 10)
        assert readable, f"process {pid} outlived its job"
    finally:
        os.close(pidfd)


def http_get(port: int, path: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        return response.status, response.read()


def test_hung_jobs_are_recovered_and_probes_answer(daemons, tmp_path):
    pidfile = tmp_path / "grandchild.pid"
    daemon = daemons(
        {
            "daemon": {"max_concurrent_jobs": 4},
            "monitor": {"interval": "200ms", "stuck_after": "1s"},
            "kinds": {
                "hang": {"handler": "tests.handlers:hang", "max_attempts": 1},
                "hang_cmd": {
                    "command": [sys.executable, "-c", HANG_WITH_A_CHILD, "{payload.pidfile}"],
                    "max_attempts": 1,
                },
            },
        }
    )
    with daemon.client() as client:
        python_job = client.call("submit", kind="hang", payload={})["job"]["id"]
        command_job = client.call("submit", kind="hang_cmd", payload={"pidfile": str(pidfile)})
        command_job = command_job["job"]["id"]

    for job_id in (python_job, command_job):
        outcome = final_status(daemon, job_id)
        assert (outcome["status"], outcome["error"]["code"]) == ("failed", "STUCK_TIMEOUT")
    assert_exits(int(pidfile.read_text()))

    port = daemon.logs("jobwarden ready")[-1]["http_port"]
    status, body = http_get(port, "/health")
    health = json.loads(body)
    assert status == 200
    assert health["jobs"]["failed"] == 2
    assert health["stuck"]["recovered"] == {"stuck": 2}
    status, body = http_get(port, "/metrics")
    families = {family.name: family for family in text_string_to_metric_families(body.decode())}
    recovered = {
        sample.labels["rule"]: sample.value
        for sample in families["jobwarden_stuck_recovered"].samples
        if sample.name.endswith("_total")
    }
    assert recovered == {"stuck": 2.0, "stall": 0.0, "sla": 0.0, "queued_timeout": 0.0}
    assert http_get(port, "/readyz")[0] == 200


def test_stuck_dry_run_changes_nothing(daemons):
    daemon = daemons({"kinds": {"hang": {"handler": "tests.handlers:hang"}}})
    with daemon.client() as client:
        job = client.call("submit", kind="hang", payload={})["job"]["id"]

    def snapshot() -> list[tuple]:
        with opened_database(daemon.database) as conn:
            return (
                conn.execute("SELECT * FROM jobs").fetchall()
                + conn.execute("SELECT seq FROM events").fetchall()
            )

    with daemon.client() as client:
        for event in client.watch(job=job):
            if event["data"].get("status") == "running":
                break
    before = snapshot()
    result = run_jobwarden(
        "--config", str(daemon.config_path), "stuck", "--dry-run", cwd=daemon.directory
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "no job breaks a rule"
    assert snapshot() == before
    with daemon.client() as client:
        assert client.call("show", job=job)["job"]["status"] in ("queued", "running")


def test_a_stopped_daemon_does_not_blame_its_running_jobs(daemons):
    daemon = daemons(
        {
            "monitor": {"interval": "200ms", "stuck_after": "1500ms", "stall_after": "1500ms"},
            "kinds": {
                "stepper": {"handler": "tests.handlers:stepper", "max_attempts": 3},
            },
        }
    )
    steps = {"steps": 15, "step_seconds": 0.2}
    with daemon.client() as client:
        submitted = [client.call("submit", kind="stepper", payload=steps)["job"]["id"]]
        submitted += [
            client.call("submit", kind="stepper", payload=steps)["job"]["id"] for _ in range(3)
        ]
        reported: set[int] = set()
        for event in client.watch():
            if event["type"] == "progress":
                reported.add(event["job"])
            if reported == set(submitted):
                break
    # As a VM pause or a swap storm would: the daemon stops for twice `stuck_after`.
    os.kill(daemon.pid, signal.SIGSTOP)
    time.sleep(3)
    os.kill(daemon.pid, signal.SIGCONT)
    for job_id in submitted:
        outcome = final_status(daemon, job_id)
        assert (outcome["status"], outcome["attempt"]) == ("done", 1), daemon.output()
    assert daemon.logs("rule fired") == []
    # Logged once: the 3 s stop, measured to within the probe's 1 s period.
    pauses = daemon.logs("the daemon was not running; running jobs get the time back")
    assert [3 <= pause["seconds"] <= 8 for pause in pauses].count(True) == 1
