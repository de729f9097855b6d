"""A command kind's processes across a kill -9 of the real daemon: its own process dies with
the daemon, what it started is ended at the restart before the job runs again, and a pid
that now belongs to another process is never touched."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from jobwarden.actors.processes import JOB_ID_VARIABLE, end_leftover_groups, identity
from jobwarden.store.jobs import ProcessGroup
from tests.process import DaemonFactory, daemon_factory
from tests.test_integration import Connection

pytestmark = pytest.mark.both_stores

# The command starts a child of its own, as `sleep 600 & ...` would, and says where both are.
STARTS_A_CHILD = """
import json, os, subprocess, sys, time
from pathlib import Path
directory, attempt = Path(sys.argv[1]), sys.argv[2]
child = subprocess.Popen(["sleep", "600"], stdout=subprocess.DEVNULL)
pids = json.dumps({"leader": os.getpid(), "child": child.pid})
(directory / f"attempt-{attempt}.tmp").write_text(pids)
(directory / f"attempt-{attempt}.tmp").rename(directory / f"attempt-{attempt}.json")
print(json.dumps({"progress": 0.1, "message": "child started"}), flush=True)
time.sleep(600)
"""
DEADLINE = 20.0


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[DaemonFactory]:
    yield from daemon_factory(tmp_path)


def running(pid: int) -> bool:
    """Alive and not a zombie waiting to be reaped."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def wait_gone(pid: int, timeout: float = 10.0) -> None:
    """Returns once `pid` has exited: a pidfd turns readable when it does."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        readable, _, _ = select.select([pidfd], [], [], timeout)
        assert readable, f"process {pid} is still running"
    finally:
        os.close(pidfd)


def wait_for_attempt(daemon, job_id: int, attempt: int) -> None:
    """Until the job's `attempt` has reported progress: its command is up."""
    deadline = time.monotonic() + DEADLINE
    with Connection(daemon.socket_path, timeout=DEADLINE) as connection:
        assert connection.request("watch", job=job_id, since=0)["ok"]
        current = 0
        while True:
            message = connection.read(deadline)
            assert message is not None, "the daemon ended the watch"
            event = message["event"]
            if event["type"] == "status" and event["data"]["status"] == "running":
                current = event["data"]["attempt"]
            elif event["type"] == "progress" and current == attempt:
                return


def test_a_command_and_its_child_do_not_run_on_beside_the_recovered_job(daemons, tmp_path):
    daemon = daemons(
        {
            "kinds": {
                "spawns": {
                    "command": [sys.executable, "-c", STARTS_A_CHILD, "{payload.dir}", "{attempt}"],
                    "max_attempts": 3,
                    "timeout": "1h",
                }
            }
        }
    )
    with daemon.client() as client:
        job = client.call("submit", kind="spawns", payload={"dir": str(tmp_path)})["job"]["id"]
    wait_for_attempt(daemon, job, 1)
    first = json.loads((tmp_path / "attempt-1.json").read_text())

    daemon.kill9()
    # The command's own process dies with the daemon; its child is an orphan, still running.
    wait_gone(first["leader"])
    assert running(first["child"])

    daemon.start()
    # Ended at start-up, before attempt 2 could start.
    recovery = daemon.logs("start-up recovery done")[-1]
    assert (recovery["recovered"], recovery["leftover_processes_ended"]) == (1, 1)
    wait_gone(first["child"])
    wait_for_attempt(daemon, job, 2)
    second = json.loads((tmp_path / "attempt-2.json").read_text())
    assert running(second["leader"]) and running(second["child"])

    with daemon.client() as client:
        assert client.call("cancel", job=job)["job"]["status"] == "canceled"
    wait_gone(second["leader"])
    wait_gone(second["child"])


# -- which leftover processes are ended, run on processes of the test's own ----------------

HOLDS_A_CHILD = """
import subprocess, time
print(subprocess.Popen(["sleep", "600"]).pid, flush=True)
time.sleep(600)
"""


@pytest.fixture
def group() -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """A process group like a command's: a leader in its own session and its child, both
    carrying job 7's id in their environment. Yields the leader and the child's pid."""
    leader = subprocess.Popen(
        [sys.executable, "-c", HOLDS_A_CHILD],
        start_new_session=True,
        stdout=subprocess.PIPE,
        env={**os.environ, JOB_ID_VARIABLE: "7"},
    )
    assert leader.stdout is not None
    child = int(leader.stdout.readline())
    yield leader, child
    with contextlib.suppress(ProcessLookupError):
        os.killpg(leader.pid, signal.SIGKILL)
    leader.wait()
    leader.stdout.close()


async def test_a_group_whose_leader_is_someone_else_now_is_left_alone(group):
    leader, child = group
    boot, _, started = identity(leader.pid).partition(":")
    # The same pid, started at another time: a reused pid, not the command recorded.
    reused = ProcessGroup(job_id=7, pgid=leader.pid, identity=f"{boot}:{int(started) - 1}")
    assert await end_leftover_groups([reused]) == 0
    other_boot = ProcessGroup(job_id=7, pgid=leader.pid, identity=f"another-boot:{started}")
    assert await end_leftover_groups([other_boot]) == 0
    assert running(leader.pid) and running(child)


async def test_a_group_whose_leader_is_the_one_recorded_is_ended_whole(group):
    leader, child = group
    recorded = ProcessGroup(job_id=7, pgid=leader.pid, identity=identity(leader.pid))
    assert await end_leftover_groups([recorded]) == 2
    assert leader.wait(timeout=10) == -signal.SIGTERM
    wait_gone(child)


@pytest.mark.parametrize(("job_id", "ended"), [(7, 1), (8, 0)], ids=["same-job", "other-job"])
async def test_without_its_leader_a_group_is_known_by_the_job_in_its_environment(
    group, job_id, ended
):
    leader, child = group
    recorded = ProcessGroup(job_id=job_id, pgid=leader.pid, identity=identity(leader.pid))
    # As PR_SET_PDEATHSIG does when the daemon dies: the leader goes, its child stays.
    leader.kill()
    leader.wait()
    assert await end_leftover_groups([recorded]) == ended
    if ended:
        wait_gone(child)
    else:
        assert running(child)
