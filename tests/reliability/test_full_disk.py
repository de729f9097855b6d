"""A full disk, and a database file that refuses writes: the daemon stays up, refuses what it
cannot store with a retryable code (STORAGE_FULL, STORAGE_ERROR) and a `retry_after`, answers
every read, shows the fault in `status` and `/health`, is not ready (`/readyz` 503), holds
dispatch, keeps every job it accepted and every outcome of a job that ran, and resumes by
itself once the store takes writes again: no restart.

Real daemons, their database on a small tmpfs filled up by a filler file (deleting it gives
the space back). Mounting needs root, as CI has; elsewhere these tests skip and say why.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from jobwarden.client import AdminClient
from jobwarden.errors import AdminError
from jobwarden.wire.views import ErrorBody
from tests.process import DaemonFactory, DaemonProcess, daemon_factory

DISK_SIZE = "16m"
# Long enough for a job to be running while the disk fills and to end while it is full.
SHORT_JOB = 0.5
CONFIG = {
    "daemon": {"max_concurrent_jobs": 1},
    "kinds": {"quick": {"handler": "tests.handlers:sleepy"}},
}


# -- the small disk ---------------------------------------------------------------------------


def mount_small_disk(directory: Path) -> None:
    directory.mkdir(parents=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (CI runs as root)")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={DISK_SIZE},mode=0755", "tmpfs", str(directory)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"mount refused a tmpfs: {mounted.stderr.strip()}")


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    """The daemon's var/ directory (database and admin socket) on a small tmpfs of its own."""
    var = tmp_path / "d" / "var"
    mount_small_disk(var)
    yield var
    for path in var.iterdir():
        subprocess.run(["chattr", "-i", str(path)], capture_output=True, check=False)
    subprocess.run(["umount", str(var)], check=True)


@pytest.fixture
def daemons(disk: Path, tmp_path: Path) -> Iterator[DaemonFactory]:
    # After `disk`, so that every daemon is gone before the disk is unmounted.
    yield from daemon_factory(tmp_path)


@pytest.fixture
def disk_daemons(tmp_path: Path) -> Iterator[DaemonFactory]:
    """Daemons on the machine's own file system (one that checks a file's immutable flag on
    every write, as tmpfs does not)."""
    factory = DaemonFactory(tmp_path)
    try:
        yield factory
    finally:
        factory.close()
        for path in (tmp_path / "d" / "var").glob("*"):
            subprocess.run(["chattr", "-i", str(path)], capture_output=True, check=False)


def fill(disk: Path) -> Path:
    """Take every byte left on the disk; deleting the file returned gives them back."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for chunk in (bytes(1 << 20), bytes(1 << 12)):
            while True:
                try:
                    os.write(fd, chunk)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
    finally:
        os.close(fd)
    return filler


def immutable(path: Path, on: bool) -> None:
    flag = "+i" if on else "-i"
    changed = subprocess.run(["chattr", flag, str(path)], capture_output=True, text=True)
    if changed.returncode != 0:
        pytest.skip(f"chattr {flag} refused: {changed.stderr.strip()}")


# -- talking to the daemon --------------------------------------------------------------------


def http_get(daemon: DaemonProcess, path: str) -> tuple[int, bytes]:
    port = daemon.logs("jobwarden ready")[-1]["http_port"]
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as refused:
        return refused.code, refused.read()


def wait_until_ready(daemon: DaemonProcess, timeout: float = 20.0) -> None:
    """Ready now, or once the store says it takes writes again (its log line, an event)."""
    recoveries = len(daemon.logs("store takes writes again"))
    if http_get(daemon, "/readyz")[0] != 200:
        daemon.wait_for_log(
            lambda _line: len(daemon.logs("store takes writes again")) > recoveries,
            timeout=timeout,
        )
    assert http_get(daemon, "/readyz")[0] == 200


def submit(client: AdminClient, seconds: float = 0.0, pad: int = 0) -> int:
    payload = {"seconds": seconds, "pad": "." * pad}
    return client.call("submit", kind="quick", payload=payload)["job"]["id"]


def submit_before_the_fault(client: AdminClient, count: int) -> list[int]:
    """Jobs accepted just before the disk fills, big enough that their rows need pages the
    database file does not have yet: the store cannot fold its write-ahead log back into the
    file (and so free its space) until space is given back."""
    return [submit(client, pad=8192) for _ in range(count)]


def refusal(call: Any) -> ErrorBody:
    with pytest.raises(AdminError) as refused:
        call()
    return refused.value.error


def job(client: AdminClient, job_id: int) -> dict[str, Any]:
    return client.call("show", job=job_id)["job"]


def wait_for(daemon: DaemonProcess, job_ids: list[int], statuses: set[str], timeout=20.0) -> None:
    """Wait until each job's status is one of `statuses`: its status now, or the first status
    event into one of them after the job's newest event (a watch of the job, not a poll)."""
    deadline = time.monotonic() + timeout
    for job_id in job_ids:
        with daemon.client() as client:
            shown = client.call("show", job=job_id)
        if shown["job"]["status"] in statuses:
            continue
        newest = max(event["seq"] for event in shown["events"])
        reached = threading.Event()

        def follow(
            job_id: int = job_id, newest: int = newest, reached: threading.Event = reached
        ) -> None:
            # Left waiting if the status never comes: the test fails, and the daemon's end at
            # teardown ends the watch.
            with contextlib.suppress(OSError, AdminError), daemon.client() as watcher:
                for event in watcher.watch(job=job_id, since=newest):
                    if event["type"] == "status" and event["data"]["status"] in statuses:
                        reached.set()
                        return

        threading.Thread(target=follow, daemon=True).start()
        left = deadline - time.monotonic()
        assert reached.wait(max(0.0, left)), f"job {job_id} never became {statuses}"


def assert_store_fault(daemon: DaemonProcess, client: AdminClient, code: str) -> None:
    """`status` and /health show the fault, /readyz says not ready, and why."""
    store = client.call("status")["store"]
    assert (store["writable"], store["code"]) == (False, code)
    assert store["since"] <= time.time()
    status, health = http_get(daemon, "/health")
    assert status == 200
    assert json.loads(health)["store"] == store
    status, ready = http_get(daemon, "/readyz")
    assert status == 503
    assert any(code in problem for problem in json.loads(ready)["problems"]), ready
    assert b"\njobwarden_store_writable 0.0\n" in http_get(daemon, "/metrics")[1]


def assert_refused_until_space(error: ErrorBody, code: str) -> None:
    assert (error.code, error.retryable) == (code, True)
    assert error.retry_after is not None and error.retry_after > 0


# -- the tests --------------------------------------------------------------------------------


def test_a_full_disk_refuses_new_jobs_keeps_the_accepted_and_resumes_by_itself(disk, daemons):
    daemon = daemons(CONFIG)
    with daemon.client() as client:
        ran = submit(client, SHORT_JOB)
        wait_for(daemon, [ran], {"running"})
        # Behind it in the queue (one slot): accepted, and waiting through the fault.
        queued = submit_before_the_fault(client, 10)
        filler = fill(disk)

        # Jobs submitted until full: here the first after the disk filled.
        error = refusal(lambda: [submit(client) for _ in range(1000)])
        assert_refused_until_space(error, "STORAGE_FULL")
        assert "disk is full" in error.message
        assert refusal(lambda: client.call("pause")).code == "STORAGE_FULL"
        assert refusal(lambda: client.call("cancel", job=queued[-1])).code == "STORAGE_FULL"
        assert_store_fault(daemon, client, "STORAGE_FULL")
        listed = client.call("jobs", limit=100)["jobs"]
        assert {j["id"] for j in listed} == {ran, *queued}
        waiting = client.call("show", job=queued[0])["waiting"]
        assert waiting["reason"].startswith("the store takes no writes (STORAGE_FULL)")
        # The running job ends while the disk is full: its outcome waits to be written.
        time.sleep(SHORT_JOB + 0.2)
        assert job(client, ran)["status"] == "running"

        filler.unlink()
        wait_until_ready(daemon)

        wait_for(daemon, [ran, *queued], {"done", "failed", "canceled"})
        assert [job(client, j)["status"] for j in [ran, *queued]] == ["done"] * 11
        # It ran once: its outcome was kept, not lost and run again.
        assert (job(client, ran)["attempt"], job(client, ran)["result"]) == (1, {"slept": 0.5})
        again = submit(client)
        wait_for(daemon, [again], {"done"})
        assert client.call("status")["store"] == {"writable": True}
    assert daemon.running


def test_a_restart_on_a_full_disk_starts_read_only_and_recovers_when_space_returns(disk, daemons):
    daemon = daemons(CONFIG)
    with daemon.client() as client:
        crashed = submit(client, 30)
        wait_for(daemon, [crashed], {"running"})
        queued = submit_before_the_fault(client, 5)
        filler = fill(disk)
        assert refusal(lambda: submit(client)).code == "STORAGE_FULL"
    daemon.kill9()

    daemon.start()

    assert daemon.logs("start-up recovery waits for the store to take writes; starting read-only")
    with daemon.client() as client:
        assert_store_fault(daemon, client, "STORAGE_FULL")
        assert_refused_until_space(refusal(lambda: submit(client)), "STORAGE_FULL")
        # Left `running` by the crash, and not run again until its recovery is written.
        assert job(client, crashed)["status"] == "running"
        assert [job(client, j)["status"] for j in queued] == ["queued"] * 5

        filler.unlink()
        wait_until_ready(daemon)

        # Recovered first, then run again: the one slot is its.
        wait_for(daemon, [crashed], {"running"})
        assert job(client, crashed)["attempt"] == 2
        client.call("cancel", job=crashed)
        wait_for(daemon, [*queued, submit(client)], {"done"})


def test_a_read_only_database_file_starts_read_only_and_resumes_once_writable(disk, daemons):
    daemon = daemons(CONFIG)
    with daemon.client() as client:
        before = [submit(client) for _ in range(3)]
        wait_for(daemon, before, {"done"})
    assert daemon.stop() == 0
    immutable(daemon.db_path, True)

    daemon.start()

    with daemon.client() as client:
        error = refusal(lambda: submit(client))
        assert_refused_until_space(error, "STORAGE_ERROR")
        assert "refuses writes" in error.message
        assert_store_fault(daemon, client, "STORAGE_ERROR")
        assert [job(client, j)["status"] for j in before] == ["done"] * 3

        immutable(daemon.db_path, False)
        wait_until_ready(daemon)

        wait_for(daemon, [submit(client)], {"done"})


def test_a_database_file_that_fails_writes_while_running_is_survived(disk_daemons):
    daemon = disk_daemons({**CONFIG, "daemon": {"max_concurrent_jobs": 4}})
    wal = daemon.db_path.with_name(daemon.db_path.name + "-wal")
    with daemon.client() as client:
        wait_for(daemon, [submit(client)], {"done"})
        immutable(wal, True)
        answers: dict[int | str, int] = {}
        accepted = []
        for _ in range(20):
            try:
                accepted.append(submit(client, 0.05))
            except AdminError as refused:
                answers[refused.error.code] = answers.get(refused.error.code, 0) + 1
            else:
                answers[200] = answers.get(200, 0) + 1
        if set(answers) == {200}:
            with contextlib.suppress(Exception):
                immutable(wal, False)
            pytest.skip("this SQLite went on writing to an immutable WAL: no fault to survive")
        assert set(answers) <= {200, "STORAGE_ERROR"}, answers
        assert_store_fault(daemon, client, "STORAGE_ERROR")

        immutable(wal, False)
        wait_until_ready(daemon)

        wait_for(daemon, [*accepted, submit(client)], {"done"})
    assert daemon.running


@pytest.mark.slow
def test_the_disk_fills_and_frees_again_and_again_and_nothing_is_lost(disk, daemons):
    rounds = 20
    daemon = daemons({**CONFIG, "daemon": {"max_concurrent_jobs": 4}})
    accepted: list[int] = []
    refused = 0
    back_after: list[float] = []
    with daemon.client() as client:
        for _ in range(rounds):
            accepted += submit_before_the_fault(client, 50)
            filler = fill(disk)
            while True:
                try:
                    accepted.append(submit(client, 0.02))
                except AdminError as refusal:
                    assert_refused_until_space(refusal.error, "STORAGE_FULL")
                    refused += 1
                    break
            filler.unlink()
            freed = time.monotonic()
            wait_until_ready(daemon, timeout=60)
            back_after.append(time.monotonic() - freed)
        wait_for(daemon, accepted, {"done", "failed", "canceled"}, timeout=120)
        assert {job(client, j)["status"] for j in accepted} == {"done"}
    assert daemon.running
    print(
        f"\nfull disk, {rounds} rounds: {len(accepted)} jobs accepted, all done; "
        f"{refused} refused STORAGE_FULL; ready again after space returned in "
        f"{min(back_after):.2f}-{max(back_after):.2f}s"
    )
