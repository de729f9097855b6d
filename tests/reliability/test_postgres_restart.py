"""PostgreSQL restarting under a running daemon: while the server is away the daemon refuses
new jobs with STORAGE_UNAVAILABLE (retryable, 503) and says it is not ready; it reconnects by
itself with backoff, keeps the outcome of the job that ended meanwhile, and runs every job it
accepted. A real daemon on a PostgreSQL server of the test's own, stopped and started for real.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from jobwarden.client import AdminClient
from jobwarden.errors import AdminError
from tests.postgres import Cluster, own_cluster_in_temp
from tests.process import DaemonFactory, DaemonProcess, daemon_factory

# Long enough to be running when the server stops, short enough to end while it is away.
RUNNING_THROUGH = 1.0


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    yield from own_cluster_in_temp()


@pytest.fixture
def daemons(cluster: Cluster, tmp_path: Path) -> Iterator[DaemonFactory]:
    # After `cluster`, so that every daemon is gone before the server is.
    yield from daemon_factory(tmp_path)


def submit(client: AdminClient, seconds: float = 0.0) -> int:
    return client.call("submit", kind="quick", payload={"seconds": seconds})["job"]["id"]


def readyz(daemon: DaemonProcess) -> tuple[int, dict]:
    import urllib.error
    import urllib.request

    port = daemon.logs("jobwarden ready")[-1]["http_port"]
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as refused:
        return refused.code, json.loads(refused.read())


def test_postgresql_restarting_refuses_new_jobs_meanwhile_and_loses_nothing(cluster, daemons):
    daemon = daemons(
        {
            "daemon": {"max_concurrent_jobs": 1},
            "store": {"url": cluster.url},
            "kinds": {"quick": {"handler": "tests.handlers:sleepy"}},
        }
    )
    with daemon.client() as client:
        running = submit(client, RUNNING_THROUGH)
        deadline = time.monotonic() + 10
        while client.call("show", job=running)["job"]["status"] != "running":
            assert time.monotonic() < deadline, "the first job never started"
            time.sleep(0.02)
        # Behind it (one slot): accepted before the server goes, run after it is back.
        queued = [submit(client) for _ in range(5)]

    cluster.stop()
    with daemon.client() as client, pytest.raises(AdminError) as refused:
        submit(client)
    error = refused.value.error
    assert (error.code, error.retryable) == ("STORAGE_UNAVAILABLE", True)
    assert error.retry_after is not None and error.retry_after > 0
    status, ready = readyz(daemon)
    assert status == 503 and "STORAGE_UNAVAILABLE" in " ".join(ready["problems"])
    # Away for longer than the running job takes: its outcome is kept meanwhile.
    time.sleep(RUNNING_THROUGH + 0.5)
    cluster.start()

    deadline = time.monotonic() + 60
    while readyz(daemon)[0] != 200:
        assert time.monotonic() < deadline, "the daemon never reconnected"
        time.sleep(0.2)
    with daemon.client() as client:
        after = submit(client)
        jobs = [running, *queued, after]
        while {client.call("show", job=j)["job"]["status"] for j in jobs} != {"done"}:
            assert time.monotonic() < deadline, "accepted jobs did not all finish"
            time.sleep(0.05)
        first = client.call("show", job=running)["job"]
        assert (first["status"], first["attempt"]) == ("done", 1)
        assert client.call("status")["store"] == {"writable": True}
    assert daemon.running
    assert daemon.stop() == 0
