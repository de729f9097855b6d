"""A schedule's slot fires once across kill -9 and a restart within its minute: the real
daemon, its real clock, its admin socket and CLI."""

from __future__ import annotations

import contextlib
import json
import math
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from jobwarden.actors.schedules import spec_of
from jobwarden.config import ScheduleSection
from jobwarden.store import schedules
from jobwarden.store.schema import migrate
from tests.process import DaemonFactory, daemon_factory, run_jobwarden

TICK = ScheduleSection(cron="* * * * *", kind="quick")
CONFIG = {"schedules": {"tick": {"cron": TICK.cron, "kind": TICK.kind}}}
# What a start, a kill and a second start take at most, with room for a loaded machine.
ROOM = 20.0


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[DaemonFactory]:
    yield from daemon_factory(tmp_path)


def register_since_long_ago(db_path: Path) -> None:
    """Register the schedule as a daemon did long ago, so the slot of the current minute is
    its to fire at once (a schedule first seen now would start from the next minute)."""
    db_path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.closing(sqlite3.connect(db_path)) as conn:
        migrate(conn)
        with conn:
            schedules.sync(conn, [], specs={"tick": spec_of(TICK)}, now=0.0)


def wait_for_a_fresh_minute() -> float:
    """The current minute's slot, once at least ROOM seconds of that minute are left."""
    if time.time() % 60 > 60 - ROOM:
        time.sleep(60 - time.time() % 60 + 0.5)
    return math.floor(time.time() / 60) * 60.0


def wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "not within the time allowed"
        time.sleep(0.05)


def scheduled_jobs(directory: Path) -> list[dict]:
    done = run_jobwarden("jobs", "--json", cwd=directory)
    assert done.returncode == 0, done.stderr
    return [job for job in json.loads(done.stdout) if job.get("schedule") == "tick"]


def test_a_slot_is_not_fired_twice_after_kill_9_and_a_restart_within_its_minute(daemons):
    daemon = daemons(CONFIG, start=False)
    register_since_long_ago(daemon.db_path)
    slot = wait_for_a_fresh_minute()
    daemon.start()
    fired = daemon.wait_for_log(lambda line: line.get("event") == "schedule fired")
    assert fired["slot"] == slot
    daemon.kill9()
    # The first run may have been killed before it said its schedules were running.
    before = len(daemon.logs("schedules running"))
    daemon.start()
    wait_until(lambda: len(daemon.logs("schedules running")) > before, timeout=ROOM)
    slots = [line["slot"] for line in daemon.logs("schedule fired")]
    # The property: no slot fires twice. On a machine slow enough that the restart ended
    # after the minute, the next slot fires too, once; otherwise the first is the only one.
    assert len(slots) == len(set(slots)), f"a slot fired twice: {slots}"
    if time.time() < slot + 60:
        assert slots == [slot]
    runs = scheduled_jobs(daemon.directory)
    assert sorted(job["id"] for job in runs if job["id"] == fired["job"]) == [fired["job"]]
    assert len(runs) == len(slots)

    listed = run_jobwarden("schedules", "--json", cwd=daemon.directory)
    assert listed.returncode == 0, listed.stderr
    [tick] = json.loads(listed.stdout)["schedules"]
    assert tick["last"]["slot"] == max(slots)
    assert tick["next"] == max(slots) + 60


def test_the_cli_pauses_resumes_and_triggers_a_schedule(daemons):
    daemon = daemons(CONFIG)
    paused = run_jobwarden("schedules", "pause", "tick", cwd=daemon.directory)
    assert paused.returncode == 0, paused.stderr
    assert "state     paused" in paused.stdout
    listed = run_jobwarden("schedules", cwd=daemon.directory)
    assert listed.stdout.splitlines()[1].split() == [
        "tick",
        "*",
        "*",
        "*",
        "*",
        "*",
        "(UTC)",
        "quick",
        "paused",
        "-",
        "never",
    ]

    triggered = run_jobwarden("schedules", "trigger", "tick", "--json", cwd=daemon.directory)
    assert triggered.returncode == 0, triggered.stderr
    job = json.loads(triggered.stdout)["job"]
    assert job["schedule"] == "tick"
    shown = run_jobwarden("show", str(job["id"]), cwd=daemon.directory)
    assert "schedule  tick" in shown.stdout

    resumed = run_jobwarden("schedules", "resume", "tick", "--json", cwd=daemon.directory)
    assert json.loads(resumed.stdout)["schedule"]["state"] == "active"

    unknown = run_jobwarden("schedules", "trigger", "tock", cwd=daemon.directory)
    assert unknown.returncode == 2
    assert "no schedule 'tock'" in unknown.stderr


@pytest.mark.parametrize("command", ["check-config", "serve"])
def test_a_bad_payload_fails_start_up_naming_the_schedule_and_key(tmp_path, command):
    config = tmp_path / "config.toml"
    config.write_text(
        '[kinds.typed]\nhandler = "tests.handlers:typed"\n'
        '[schedules.hourly]\ncron = "0 * * * *"\nkind = "typed"\npayload = {n = "three"}\n'
    )
    refused = run_jobwarden(
        command, *(["--config"] if command == "serve" else []), str(config), cwd=tmp_path
    )
    assert refused.returncode == 2
    assert "schedules.hourly.payload: payload.n: Expected `int`, got `str`" in refused.stderr
