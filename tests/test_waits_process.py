"""Delayed jobs, tags, holds and dependencies with the real daemon and the `jobwarden` CLI:
a delayed job survives kill -9 and still starts at its time, not before."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.process import DaemonFactory, DaemonProcess, daemon_factory, run_jobwarden
from tests.test_integration import follow_jobs


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[DaemonFactory]:
    yield from daemon_factory(tmp_path)


def jobwarden(daemon: DaemonProcess, *args: str) -> str:
    done = run_jobwarden("--config", str(daemon.config_path), *args, cwd=daemon.directory)
    assert done.returncode == 0, done
    return done.stdout


def submitted(daemon: DaemonProcess, *args: str) -> dict:
    return json.loads(jobwarden(daemon, "--json", "submit", "quick", "{}", *args))["job"]


def test_a_delayed_job_survives_kill9_and_starts_at_its_time(daemons):
    daemon = daemons()
    job = submitted(daemon, "--delay", "3s", "--tag", "nightly")
    assert job["run_at"] == pytest.approx(job["created_at"] + 3)
    shown = jobwarden(daemon, "show", str(job["id"]))
    assert "scheduled for" in shown and "starts" in shown and "nightly" in shown

    daemon.kill9()
    daemon.start()

    follow_jobs(daemon, until=lambda progress: job["id"] in progress.finished)
    with daemon.client() as client:
        final = client.call("show", job=job["id"])["job"]
    assert final["status"] == "done"
    assert final["started_at"] >= job["run_at"]


def test_holds_dependencies_and_tags_from_the_cli(daemons):
    daemon = daemons()
    jobwarden(daemon, "users", "add", "local")
    jobwarden(daemon, "users", "hold", "local")
    first = submitted(daemon, "--tag", "batch-1")
    second = submitted(daemon, "--after", str(first["id"]), "--tag", "batch-1")
    assert "user local on hold" in jobwarden(daemon, "show", str(first["id"]))
    jobwarden(daemon, "hold", str(second["id"]))
    jobwarden(daemon, "users", "release", "local")
    follow_jobs(daemon, until=lambda progress: first["id"] in progress.finished)
    assert "held by an operator" in jobwarden(daemon, "show", str(second["id"]))

    jobwarden(daemon, "release", str(second["id"]))

    follow_jobs(daemon, until=lambda progress: second["id"] in progress.finished)
    listed = json.loads(jobwarden(daemon, "--json", "jobs", "--tag", "batch-1"))
    assert [(job["id"], job["status"]) for job in listed] == [
        (second["id"], "done"),
        (first["id"], "done"),
    ]
