"""The guards through a real daemon's admin socket and the CLI."""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from pathlib import Path

import pytest

from jobwarden.store.backend import backend_of
from tests.conftest import opened_database
from tests.guard_table import reproduce
from tests.process import DaemonFactory, daemon_factory, run_jobwarden

pytestmark = pytest.mark.both_stores


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[DaemonFactory]:
    yield from daemon_factory(tmp_path)


def seconds_to_utc_midnight() -> float:
    now = datetime.datetime.now(datetime.UTC)
    midnight = datetime.datetime.combine(
        now.date() + datetime.timedelta(days=1), datetime.time(), datetime.UTC
    )
    return (midnight - now).total_seconds()


def test_the_seed_guard_table_is_reproduced_against_a_running_daemon(tmp_path):
    rows = {row.guard: row for row in reproduce(tmp_path)}
    assert {guard: (row.code, row.http) for guard, row in rows.items()} == {
        "rate limit": ("RATE_LIMITED", 429),
        "daily job limit": ("DAILY_LIMIT", 429),
        "credit check": ("INSUFFICIENT_CREDITS", 402),
        "queue depth": ("QUEUE_FULL", 503),
        "payload size": ("PAYLOAD_TOO_LARGE", 413),
        "draining": ("DRAINING", 503),
    }
    assert rows["rate limit"].crossed_by == "submission 11 in a minute"
    assert 5.0 < rows["rate limit"].retry_after <= 6.0
    assert rows["daily job limit"].crossed_by == "submission 21 today"
    assert rows["daily job limit"].retry_after == pytest.approx(seconds_to_utc_midnight(), abs=30)
    assert rows["queue depth"].crossed_by == "a submission with 100 queued"


def test_users_over_the_cli_token_once_credits_and_why_a_job_waits(daemons):
    daemon = daemons(
        {
            "limits": {"credits": 1, "rate": "off"},
            "daemon": {"max_concurrent_jobs": 1},
        }
    )
    config = ["--config", str(daemon.config_path)]
    cwd = daemon.directory

    added = run_jobwarden("users", "add", "alice", "--credits", "2", *config, cwd=cwd)
    assert added.returncode == 0, added.stderr
    token_line = next(line for line in added.stdout.splitlines() if line.startswith("token"))
    token = token_line.split()[-1]
    assert token.startswith("jw_") and len(token) > 40
    shown = run_jobwarden("users", "show", "alice", *config, cwd=cwd)
    assert token not in shown.stdout and "token        set" in shown.stdout
    with opened_database(daemon.database) as conn:
        tables = backend_of(conn).table_names(conn)
        stored = [conn.execute(f"SELECT * FROM {table}").fetchall() for table in tables]
    assert token not in repr(stored)
    if daemon.db_path is not None:
        # Nor in SQLite's file: freed pages and the write-ahead log included.
        assert token not in daemon.db_path.read_bytes().decode("utf-8", "replace")

    again = run_jobwarden("users", "add", "alice", *config, cwd=cwd)
    assert again.returncode == 2 and "exists already" in again.stderr

    run_jobwarden("pause", "quick", *config, cwd=cwd)
    for _ in range(2):
        submitted = run_jobwarden("submit", "quick", "{}", "--user", "alice", *config, cwd=cwd)
        assert submitted.returncode == 0, submitted.stderr
    broke = run_jobwarden("submit", "quick", "{}", "--user", "alice", *config, cwd=cwd)
    assert broke.returncode == 1
    assert "INSUFFICIENT_CREDITS" in broke.stderr and "has 0" in broke.stderr

    topped = run_jobwarden("users", "credits", "alice", "+5", *config, cwd=cwd)
    assert "credits      5 (2 reserved" in topped.stdout
    show = run_jobwarden("show", "2", *config, cwd=cwd)
    assert "waiting   kind quick paused; position 2 of 2" in show.stdout
    listing = run_jobwarden("jobs", *config, cwd=cwd)
    assert "kind quick paused; position 1 of 2" in listing.stdout

    disabled = run_jobwarden("users", "disable", "alice", *config, cwd=cwd)
    assert disabled.returncode == 0
    refused = run_jobwarden("submit", "quick", "{}", "--user", "alice", *config, cwd=cwd)
    assert refused.returncode == 1 and "FORBIDDEN" in refused.stderr

    bad = run_jobwarden("users", "set", "bob", "--rate", "fast", *config, cwd=cwd)
    assert bad.returncode == 2 and 'expected a rate like "100/min"' in bad.stderr
    missing = run_jobwarden("users", "credits", "nobody", "+1", *config, cwd=cwd)
    assert missing.returncode == 2 and "no user 'nobody'" in missing.stderr
    # The daemon keeps serving after every refusal.
    assert run_jobwarden("status", *config, cwd=cwd).returncode == 0
