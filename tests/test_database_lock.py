"""One daemon per database file: a second daemon is refused, whatever path leads it to the file
(the same path, a hard link, a symlink), and the first goes on undisturbed. Real processes."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.process import DaemonFactory, DaemonProcess, DaemonStartError, daemon_factory


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[DaemonFactory]:
    yield from daemon_factory(tmp_path)


def path_to(database: Path, how: str, directory: Path) -> Path:
    """Another way to reach `database`: itself, a hard link or a symlink in `directory`."""
    if how == "same path":
        return database
    directory.mkdir()
    other = directory / "other-name.db"
    if how == "hard link":
        os.link(database, other)
    else:
        other.symlink_to(database)
    return other


def run_one_job(daemon: DaemonProcess) -> str:
    with daemon.client() as client:
        job = client.call("submit", kind="quick", payload={"seconds": 0})["job"]["id"]
        for event in client.watch(job=job):
            if event["type"] == "status" and event["data"]["status"] not in ("queued", "running"):
                return event["data"]["status"]
    raise AssertionError("the watch ended before the job did")


@pytest.mark.parametrize("how", ["same path", "hard link", "symlink"])
def test_a_second_daemon_is_refused_through_any_path_to_the_database(daemons, tmp_path, how):
    first = daemons(name="first")
    database = path_to(first.db_path, how, tmp_path / "elsewhere")
    second = daemons({"store": {"path": str(database)}}, name="second", start=False)

    with pytest.raises(DaemonStartError) as refused:
        second.start()

    assert second.process is not None and second.process.returncode == 1
    assert "another jobwarden is already using the database" in str(refused.value)
    assert f"(pid {first.pid})" in str(refused.value)
    assert first.running
    assert run_one_job(first) == "done"
