"""Services against a real daemon process: the hard budget, the 50% image failure case,
`jobwarden ledger` agreeing with the ledger rows, and a breaker surviving a restart."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import opened_database
from tests.process import DaemonFactory, daemon_factory, run_jobwarden

pytestmark = pytest.mark.both_stores

FAST_STORYBOOK = {
    "handler": "jobwarden.tools.demo:storybook",
    "services": ["llm", "storage"],
    "max_attempts": 4,
    "backoff": ["0s"],
    "options": {
        "seed": 11,
        "llm": {"latency": "5ms"},
        "image": {"latency": "10ms", "failure_rate": 0.5},
        "storage": {"latency": "5ms"},
    },
}
SERVICES = {
    "llm": {"price_usd": 0.000338},
    "image": {
        "price_usd": 0.024,
        "max_concurrent": 5,
        "retries": ["20ms", "50ms", "120ms"],
        "breaker": {"failures": 5, "min_calls": 20, "recovery": "300ms"},
    },
    "storage": {"price_usd": 0.0004},
    "paid": {"price_usd": 1.0},
}


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[DaemonFactory]:
    yield from daemon_factory(tmp_path)


def cli(daemon, *args: str) -> dict:
    result = run_jobwarden(
        "--config", str(daemon.config_path), "--json", *args, cwd=daemon.directory
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def follow(daemon, until) -> dict[int, dict]:
    """Latest status event data per job, from the start, until `until(latest)` holds."""
    latest: dict[int, dict] = {}
    with daemon.client(timeout=60) as client:
        for event in client.watch(since=0):
            if event["type"] == "status":
                latest[event["job"]] = event["data"]
            if until(latest):
                return latest
    raise AssertionError("the watch ended early")


def ledger_rows(daemon) -> list[tuple]:
    with opened_database(daemon.database) as conn:
        return conn.execute("SELECT service, ok, usd FROM ledger ORDER BY id").fetchall()


def test_spend_stops_exactly_at_the_budget_and_jobs_wait(daemons):
    daemon = daemons(
        {
            "daemon": {"max_concurrent_jobs": 6},
            "budget": {"daily_usd": 3, "monthly_usd": 0},
            "services": SERVICES,
            "kinds": {"caller": {"handler": "tests.handlers:call_service"}},
        }
    )
    cli(daemon, "pause", "caller")
    with daemon.client() as client:
        for _ in range(6):
            client.call("submit", kind="caller", payload={"service": "paid", "seconds": 0.05})
    cli(daemon, "resume", "caller")

    def settled(latest):
        statuses = [data["status"] for data in latest.values()]
        waiting = [d for d in latest.values() if d.get("reason") == "BUDGET_WAIT"]
        return statuses.count("done") == 3 and len(waiting) == 3

    follow(daemon, settled)
    budget = cli(daemon, "budget")
    assert (budget["stopped"], budget["spent_today"]) == (True, 3.0)
    report = cli(daemon, "ledger")
    assert report["usd"] == sum(usd for _, _, usd in ledger_rows(daemon)) == 3.0
    refused = run_jobwarden(
        "--config",
        str(daemon.config_path),
        "submit",
        "caller",
        '{"service": "paid"}',
        cwd=daemon.directory,
    )
    assert refused.returncode == 1
    assert "BUDGET_EXHAUSTED" in refused.stderr


def test_image_api_at_50_percent_failure_against_a_real_daemon(daemons):
    daemon = daemons(
        {
            "daemon": {"max_concurrent_jobs": 4},
            "services": SERVICES,
            "kinds": {"storybook": FAST_STORYBOOK},
        }
    )
    with daemon.client() as client:
        books = [
            client.call("submit", kind="storybook", payload={"title": f"B{n}", "pages": 4})["job"][
                "id"
            ]
            for n in range(12)
        ]
    latest = follow(
        daemon,
        lambda latest: all(latest.get(b, {}).get("status") in ("done", "failed") for b in books),
    )
    done = [
        b for b in books if latest[b]["status"] == "done" and not latest[b]["result"]["degraded"]
    ]
    degraded = [
        b for b in books if latest[b]["status"] == "done" and latest[b]["result"]["degraded"]
    ]
    failed = [b for b in books if latest[b]["status"] == "failed"]
    print(f"split: {len(done)} done, {len(degraded)} degraded, {len(failed)} failed")
    assert len(done) + len(degraded) + len(failed) == 12
    breakers = cli(daemon, "breakers")
    assert breakers["image"]["opened"] >= 1
    assert breakers["llm"]["failures"] == 0 and breakers["llm"]["opened"] == 0
    report = cli(daemon, "ledger", "--by", "service")
    rows = ledger_rows(daemon)
    assert report["calls"] == len(rows)
    assert report["usd"] == pytest.approx(sum(usd for _, _, usd in rows))
    by_service = {group["service"]: group for group in report["groups"]}
    assert by_service["image"]["failed"] > 0 and by_service["llm"]["failed"] == 0


def test_an_open_breaker_survives_a_restart(daemons):
    # Recovery outlasts the restart: past it, the circuit would rightly read half_open.
    image = {**SERVICES["image"], "breaker": {**SERVICES["image"]["breaker"], "recovery": "1h"}}
    config = {"services": {**SERVICES, "image": image}, "kinds": {"storybook": FAST_STORYBOOK}}
    daemon = daemons(config)
    tripped = cli(daemon, "breaker", "trip", "image")["image"]
    assert daemon.stop() == 0
    daemon.start()
    again = cli(daemon, "breakers")["image"]
    assert (again["state"], again["open_until"]) == ("open", tripped["open_until"])
