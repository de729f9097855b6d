"""`jobwarden store copy`: a daemon's SQLite history moved into PostgreSQL, where a daemon shows
it as it was and goes on numbering after it; a schema that is not empty is refused."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import postgres
from tests.process import DaemonFactory, DaemonProcess, daemon_factory, run_jobwarden

CONFIG = {
    "services": {"paid": {"price_usd": 0.5}},
    "kinds": {
        "quick": {"handler": "tests.handlers:sleepy"},
        "caller": {"handler": "tests.handlers:call_service"},
    },
}


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[DaemonFactory]:
    yield from daemon_factory(tmp_path)


def cli(daemon: DaemonProcess, *args: str) -> dict:
    result = run_jobwarden(
        "--config", str(daemon.config_path), "--json", *args, cwd=daemon.directory
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def history(daemon: DaemonProcess) -> dict:
    """Everything a user sees of what happened: jobs, each with its events, the ledger,
    users, what is paused, the breakers."""
    with daemon.client() as client:
        listed = client.call("jobs", limit=100)["jobs"]
        shown = {job["id"]: client.call("show", job=job["id"]) for job in listed}
        paused = client.call("status")["paused"]
        breakers = {name: view["state"] for name, view in client.call("breakers").items()}
    for job in listed:
        # Why a queued job waits is about the daemon showing it, not the history.
        job.pop("waiting", None)
    return {
        "jobs": listed,
        "shown": shown,
        "ledger": cli(daemon, "ledger", "--by", "user"),
        "carol": cli(daemon, "users", "show", "carol"),
        "paused": paused,
        "breakers": breakers,
    }


def test_a_copied_history_shows_on_postgresql_as_it_was_and_numbering_goes_on(daemons):
    with postgres.fresh_schema() as url:
        on_sqlite = daemons(CONFIG, name="sqlite")
        cli(on_sqlite, "users", "add", "carol", "--credits", "5")
        with on_sqlite.client() as client:
            submitted = [
                client.call("submit", kind="quick", payload={})["job"]["id"],
                client.call("submit", kind="quick", payload={"fail": True})["job"]["id"],
                client.call("submit", kind="caller", payload={"service": "paid", "seconds": 0})[
                    "job"
                ]["id"],
            ]
            deadline = time.monotonic() + 20
            while {client.call("show", job=j)["job"]["status"] for j in submitted} - {
                "done",
                "failed",
            }:
                assert time.monotonic() < deadline, "the jobs did not finish"
                time.sleep(0.05)
        cli(on_sqlite, "pause", "quick")
        cli(on_sqlite, "breaker", "trip", "paid")
        before = history(on_sqlite)
        assert before["ledger"]["calls"] == 1 and before["paused"] == ["quick"]
        assert before["breakers"] == {"paid": "open"}
        assert on_sqlite.stop() == 0

        copied = run_jobwarden(
            "store",
            "copy",
            "--to",
            url,
            "--config",
            str(on_sqlite.config_path),
            cwd=on_sqlite.directory,
        )
        assert copied.returncode == 0, copied.stderr
        for rows in ("3 jobs", "11 events", "1 ledger", "1 breakers", "2 users"):
            assert rows in copied.stdout

        on_postgresql = daemons({**CONFIG, "store": {"url": url}}, name="postgresql")
        assert history(on_postgresql) == before
        with on_postgresql.client() as client:
            new = client.call("submit", kind="caller", payload={"service": "paid", "seconds": 0})
            shown = client.call("show", job=new["job"]["id"])
        assert new["job"]["id"] == max(submitted) + 1
        last_seq = max(event["seq"] for job in before["shown"].values() for event in job["events"])
        assert shown["events"][0]["seq"] > last_seq
        assert on_postgresql.stop() == 0

        again = run_jobwarden(
            "store", "copy", "--to", url, "--from", str(on_sqlite.db_path), cwd=on_sqlite.directory
        )
        assert again.returncode == 2
        schema = url.rsplit("search_path%3D", 1)[1]
        assert f"the schema {schema} of " in again.stderr and "is not empty" in again.stderr


def test_a_source_that_is_no_database_is_refused_naming_it(tmp_path):
    url = postgres.server_url()
    missing = tmp_path / "nothing.db"

    copied = run_jobwarden("store", "copy", "--to", url, "--from", str(missing), cwd=tmp_path)

    assert copied.returncode == 2
    assert f"cannot read the SQLite database {missing}" in copied.stderr
