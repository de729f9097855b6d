"""`jobwarden loadtest`: short runs on MockClock whose reports must say what the store and
the ledger say; the traffic the scenarios make; the demo's injected faults; and a daemon bug
the load test found (a permit leaked by a stopped job; the rate-limit wait that spun is in
test_bucket.py)."""

from __future__ import annotations

import contextlib
import json
import math
import random
import sqlite3
import sys
from collections import Counter
from pathlib import Path

import pytest
import trio

from jobwarden.actors.messages import BudgetQuery, CancelJob
from jobwarden.cli import build_parser, main
from jobwarden.mailbox import ReplySlot, ask
from jobwarden.store.ledger import report as ledger_report
from jobwarden.store.reports import CallTry, StatusEvent
from jobwarden.tools import report
from jobwarden.tools.demo import TERMINAL_FAILURES
from jobwarden.tools.loadtest import (
    DEFAULT_RUN,
    HOUR,
    RUSH,
    SCENARIOS,
    Plan,
    plan_arrivals,
    plan_from_args,
    run_loadtest,
)
from tests.conftest import EPOCH


def short_plan(tmp_path: Path, **changes) -> Plan:
    fields = {
        "scenario": DEFAULT_RUN,
        "hours": 1.0,
        "jobs_per_hour": 20,
        "users": 10,
        "speed": None,
        "image_failure_rate": 0.03,
        "inject_stuck": 0,
        "inject_crash": False,
        "seed": 7,
        "out": str(tmp_path),
        "show_progress": False,
    }
    return Plan(**{**fields, **changes})


def query(database: str, sql: str, *params) -> list[tuple]:
    with contextlib.closing(sqlite3.connect(database)) as conn:
        return conn.execute(sql, params).fetchall()


async def test_a_short_run_reports_what_the_store_and_the_ledger_say(autojump_clock, tmp_path):
    outcome = await run_loadtest(short_plan(tmp_path, inject_stuck=2), test_id="longrun_short")
    database, figures = outcome.record.database, outcome.figures
    report = (tmp_path / "longrun_short_report.md").read_text()

    statuses = dict(query(database, "SELECT status, COUNT(*) FROM jobs GROUP BY status"))
    done, finished = statuses["done"], sum(statuses.values())
    assert finished == 22  # 20 books and the 2 that hang, all finished
    assert (figures["jobs"]["done"], figures["jobs"]["finished"]) == (done, finished)
    assert f"| **Success rate** | {done / finished:.1%} ({done}/{finished}) |" in report

    # The totals are the ledger's own: what `jobwarden ledger --day` shows for the run's day.
    ((day,),) = query(database, "SELECT DISTINCT day FROM ledger")
    with contextlib.closing(sqlite3.connect(database)) as conn:
        ledger = ledger_report(conn, period=day, by="service")
    ((usd,),) = query(database, "SELECT SUM(usd) FROM ledger")
    assert round(figures["cost"]["total_usd"], 2) == round(usd, 2) == round(ledger["usd"], 2)
    assert f"| **Total cost** | ${usd:,.2f} |" in report
    calls = dict(query(database, "SELECT service, COUNT(*) FROM ledger GROUP BY service"))
    assert {group["service"]: group["calls"] for group in ledger["groups"]} == calls
    assert {service["service"]: service["calls"] for service in figures["services"]} == calls
    for service, count in calls.items():
        assert f"| {service} | {count:,} |" in report
    assert f"{day}: ${ledger['usd']:,.4f} for {ledger['calls']:,} calls" in report

    # The injected jobs hung, the monitor caught them, and they finished from their checkpoint.
    stuck = outcome.record.stuck_injected
    assert len(stuck) == 2
    for job in stuck:
        assert query(database, "SELECT status FROM jobs WHERE id = ?", job) == [("done",)]
        verdicts = query(
            database,
            "SELECT json_extract(data, '$.error.message') FROM events WHERE job_id = ? "
            "AND json_extract(data, '$.error.code') = 'STUCK_TIMEOUT'",
            job,
        )
        assert [message.split(":")[0] for (message,) in verdicts] == ["stall"]
        paid_llm = query(
            database, "SELECT COUNT(*) FROM ledger WHERE job_id = ? AND service = 'llm'", job
        )
        assert paid_llm == [(4,)]
    assert (figures["stuck"]["injected"], figures["stuck"]["recovered"]) == (2, 2)
    assert "| **Stuck job recovery rate** | 100.0% (2/2) |" in report

    summary = (tmp_path / "longrun_short_summary.txt").read_text()
    assert f"success rate  {done / finished:.1%} ({done}/{finished})" in summary
    full = json.loads((tmp_path / "longrun_short_full.json").read_text())
    assert full["figures"]["cost"]["total_usd"] == figures["cost"]["total_usd"]
    intermediate = json.loads((tmp_path / "longrun_short_intermediate.json").read_text())
    assert intermediate["finished"] is True
    assert intermediate["latest"]["done"] == done
    # Left paused: serving the database afterwards shows it as the run left it.
    paused = query(database, "SELECT value FROM settings WHERE key = 'paused'")
    assert json.loads(paused[0][0])["all"] is True


async def test_a_crash_mid_run_loses_no_accepted_job(autojump_clock, tmp_path):
    plan = short_plan(tmp_path, hours=0.5, jobs_per_hour=120, inject_crash=True)
    outcome = await run_loadtest(plan, test_id="longrun_crash")
    database, crash = outcome.record.database, outcome.figures["crash"]
    recovered = query(
        database,
        "SELECT job_id FROM events WHERE json_extract(data, '$.reason') = 'RECOVERED'",
    )
    assert crash["running_at_crash"] == len(recovered) >= 1
    for (job,) in recovered:
        # Back from the store by the new supervisor's start-up recovery, then finished.
        status, recoveries = query(
            database, "SELECT status, recoveries FROM jobs WHERE id = ?", job
        )[0]
        assert (status in ("done", "failed"), recoveries) == (True, 1)
    ((in_store,),) = query(database, "SELECT COUNT(*) FROM jobs")
    accepted = outcome.record.submitted - sum(outcome.record.rejections.values())
    assert (crash["in_store"], crash["accepted"]) == (in_store, accepted) == (60, 60)
    report = (tmp_path / "longrun_crash_report.md").read_text()
    assert f"| Jobs running at the crash, put back from the store | {len(recovered)} |" in report
    assert "| Accepted jobs in the store | 60 of 60 |" in report


async def test_without_matplotlib_the_report_says_how_to_get_charts(
    autojump_clock, tmp_path, monkeypatch
):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    outcome = await run_loadtest(short_plan(tmp_path, hours=0.2), test_id="longrun_plain")
    report = (tmp_path / "longrun_plain_report.md").read_text()
    assert (
        "Charts skipped: matplotlib is not installed (`pip install 'jobwarden[report]'`)" in report
    )
    assert not list(tmp_path.glob("*.png"))
    assert outcome.charts_note is not None


async def test_with_matplotlib_the_report_shows_its_charts(autojump_clock, tmp_path):
    pytest.importorskip("matplotlib")
    await run_loadtest(short_plan(tmp_path, hours=0.2), test_id="longrun_charts")
    report = (tmp_path / "longrun_charts_report.md").read_text()
    for chart in ("throughput", "spend"):
        assert (tmp_path / f"longrun_charts_{chart}.png").stat().st_size > 0
        assert f"(longrun_charts_{chart}.png)" in report


def test_seed_001_traffic_is_steady_and_even():
    arrivals = plan_arrivals(short_plan(Path("."), hours=3, jobs_per_hour=50), random.Random(1))
    assert len(arrivals) == 150
    assert Counter(int(arrival.at // HOUR) for arrival in arrivals) == {0: 50, 1: 50, 2: 50}
    assert set(Counter(arrival.user for arrival in arrivals).values()) == {15}


def test_scenario_c_brings_batches_heavy_users_and_a_rush():
    plan = short_plan(Path("."), scenario=SCENARIOS["C"], hours=8, jobs_per_hour=1000, users=1000)
    arrivals = plan_arrivals(plan, random.Random(1))
    assert set(Counter(int(arrival.at // HOUR) for arrival in arrivals).values()) == {1000}
    per_user = Counter(arrival.user for arrival in arrivals)
    # Past the seed's guards: 20 books a user a day, 10 a minute.
    assert max(per_user.values()) > 20
    per_minute = Counter((arrival.user, int(arrival.at // 60)) for arrival in arrivals)
    assert max(per_minute.values()) > 10
    in_rush = sum(RUSH[0] <= arrival.at % HOUR <= RUSH[1] for arrival in arrivals)
    assert in_rush / len(arrivals) > 0.4


def test_the_command_line_picks_a_scenario_and_lets_flags_override_it(capsys):
    parser = build_parser()
    plan = plan_from_args(parser.parse_args(["loadtest", "--scenario", "C", "--fast"]))
    assert (plan.hours, plan.users, plan.jobs_per_hour, plan.speed) == (8, 1000, 1000, None)
    plan = plan_from_args(
        parser.parse_args(["loadtest", "--scenario", "C", "--users", "5", "--speed", "100"])
    )
    assert (plan.users, plan.jobs_per_hour, plan.speed) == (5, 1000, 100)
    plan = plan_from_args(parser.parse_args(["loadtest"]))
    assert (plan.hours, plan.users, plan.jobs_per_hour, plan.speed) == (3, 10, 50, 1.0)
    assert main(["loadtest", "--fast", "--speed", "100"]) == 2
    assert "not allowed with argument" in capsys.readouterr().err
    assert main(["loadtest", "--image-failure-rate", "1.5"]) == 2
    assert "expected a fraction from 0 to 1" in capsys.readouterr().err


STORYBOOK = """
[services.llm]
price_usd = 0.000338
retries = ["1s"]

[services.image]
price_usd = 0.024
retries = ["2s"]

[services.storage]
price_usd = 0.0004

[kinds.storybook]
handler = "jobwarden.tools.demo:storybook"
services = ["llm", "storage"]
[kinds.storybook.options]
seed = 7
terminal_failure_rate = 1.0
"""


async def test_terminal_failures_end_books_at_once_under_the_seeds_codes(
    autojump_clock, start_daemon
):
    daemon = await start_daemon(STORYBOOK, max_concurrent_jobs=8)
    books = [await daemon.submit("storybook", {"title": f"Book {n}"}) for n in range(8)]
    finals = [await daemon.wait_done(book.id) for book in books]
    assert {(final.status, final.attempt) for final in finals} == {("failed", 1)}
    codes = {final.error.code for final in finals}
    assert codes <= set(TERMINAL_FAILURES) and len(codes) > 1
    for final in finals:
        assert final.error.message == TERMINAL_FAILURES[final.error.code]


async def test_a_book_made_to_hang_is_never_doomed_too(autojump_clock, start_daemon):
    # Every other book fails at once; the one made to hang must hang, for the monitor to find
    # (a doomed one failed before its hang and counted against the recovery rate).
    daemon = await start_daemon(STORYBOOK)
    book = await daemon.submit("storybook", {"title": "Stuck", "hang_once": True})
    final = await daemon.wait_done(book.id)
    assert (final.status, final.attempt) == ("done", 2)
    reasons = [event.data.get("error", {}).get("code") for event in await daemon.events(book.id)]
    assert "STUCK_TIMEOUT" in reasons


# Found by the load test.

ONE_SLOT = """
[services.solo]
price_usd = 1.0
max_concurrent = 1

[kinds.caller]
handler = "tests.handlers:call_service"
timeout = "1h"
max_attempts = 1
"""


async def test_a_job_stopped_while_waiting_for_a_permit_gives_its_slot_back(
    autojump_clock, start_daemon
):
    daemon = await start_daemon(ONE_SLOT, max_concurrent_jobs=3)
    holder = await daemon.submit("caller", {"service": "solo", "seconds": 10})
    waiter = await daemon.submit("caller", {"service": "solo", "seconds": 10})
    await trio.sleep(5)
    assert (await ask(daemon.handle.pool, CancelJob, job_id=waiter.id)).status == "canceled"
    after = await daemon.submit("caller", {"service": "solo", "seconds": 10})
    assert (await daemon.wait_done(holder.id)).finished_at - EPOCH == 10
    # The canceled job's permit would have taken the slot at 10 s, for good.
    final = await daemon.wait_done(after.id)
    assert (final.status, final.finished_at - EPOCH) == ("done", 20)
    reply = ReplySlot()
    await daemon.handle.ledger.send(BudgetQuery(reply=reply))
    assert (await reply.wait())["reserved"] == 0


# The report's sections, and the figures behind its advice.


def test_stuck_jobs_are_injected_unless_told_otherwise():
    parser = build_parser()
    assert plan_from_args(parser.parse_args(["loadtest"])).inject_stuck == 3
    assert plan_from_args(parser.parse_args(["loadtest", "--inject-stuck", "0"])).inject_stuck == 0


def sections(report: str) -> list[str]:
    return [line.removeprefix("## ") for line in report.splitlines() if line.startswith("## ")]


async def test_a_troubled_run_says_what_to_do_and_that_it_is_not_ready(autojump_clock, tmp_path):
    # Half the image calls fail, a third of the books are doomed, and the projection is
    # made for a volume the budget cannot pay for.
    plan = short_plan(
        tmp_path,
        image_failure_rate=0.5,
        terminal_failure_rate=0.3,
        daily_volume=10000,
        inject_stuck=0,
    )
    outcome = await run_loadtest(plan, test_id="longrun_troubled")
    figures = outcome.figures
    report = (tmp_path / "longrun_troubled_report.md").read_text()

    assert sections(report) == [
        "Executive Summary",
        "1. Job Statistics",
        "2. Duration Statistics",
        "3. Retry Statistics",
        "4. Stuck Job Recovery",
        "5. API Call Statistics",
        "6. Cost Analysis",
        "7. Guardrails",
        "8. Recommendations",
        "9. Charts",
        "10. Test Artifacts",
        "Conclusion",
    ]
    advice = {item["topic"]: item for item in figures["recommendations"]}
    job = figures["jobs"]
    rate = job["failed"] / job["finished"]
    assert rate > 0.05
    assert advice["Failure rate"]["act"]
    assert f"{rate:.1%} of the finished jobs failed ({job['failed']} of {job['finished']})" in (
        report
    )
    opened = figures["breakers"]["image"]["opened"]
    assert opened >= 1 and advice["Circuit breakers"]["act"]
    assert f"The image circuit opened {opened} times" in report
    daily = figures["projection"]["daily_usd"]
    assert daily == round(10000 * figures["cost"]["per_job_usd"], 2) > 500
    assert f"Raise `budget.daily_usd` to ${math.ceil(daily * 1.2):,}" in report
    assert advice["Stuck jobs"]["act"]  # none injected: recovery went untested

    conclusion = report[report.index("## Conclusion") :]
    assert conclusion.splitlines()[2].startswith(
        "**Not ready at this load**: the failure rate passed the alert threshold."
    )
    assert "Not tested by this run: stuck job recovery." in conclusion
    summary = (tmp_path / "longrun_troubled_summary.txt").read_text()
    assert "verdict       not ready: the failure rate passed the alert threshold" in summary


async def test_job_retries_and_provider_call_retries_are_counted_apart(autojump_clock, tmp_path):
    outcome = await run_loadtest(
        short_plan(tmp_path, inject_stuck=1, image_failure_rate=0.2), test_id="longrun_retries"
    )
    retries = outcome.figures["retries"]
    database = outcome.record.database
    report = (tmp_path / "longrun_retries_report.md").read_text()

    ((failed_tries,),) = query(database, "SELECT COUNT(*) FROM ledger WHERE ok = 0")
    assert retries["call_retries_total"] > 0
    assert retries["call_retries_total"] + retries["calls_given_up_total"] == failed_tries
    ((job_retries,),) = query(
        database,
        "SELECT COUNT(*) FROM events WHERE type = 'status' "
        "AND json_extract(data, '$.reason') = 'RETRY'",
    )
    assert retries["job_retries"] == job_retries >= 1  # the stuck job's second attempt, at least
    row = f"| Provider call retries (a failed call tried again) | {retries['call_retries_total']} |"
    assert row in report
    assert f"| Job retries (attempts after the first) | {job_retries} |" in report
    summary = (tmp_path / "longrun_retries_summary.txt").read_text()
    assert (
        f"retries       {job_retries} job retries; "
        f"{retries['call_retries_total']} provider call retries"
    ) in summary


def call(job: int, service: str, ok: bool, at: float) -> CallTry:
    return CallTry(job, service, ok, at)


def running(job: int, at: float) -> StatusEvent:
    return StatusEvent(job, at, "running", None, None, None)


def test_a_failed_try_is_a_call_retry_only_when_the_same_call_tries_again():
    tries = [
        # Job 1: an image call fails once and succeeds on its retry.
        call(1, "image", False, 10),
        call(1, "image", True, 12),
        # Job 2: a storage call fails every try it has; the attempt ends, and the job's next
        # attempt starts with the LLM again. Its last failed try was given up, not retried.
        call(2, "storage", False, 20),
        call(2, "storage", False, 21),
        call(2, "llm", True, 90),
        # Job 3: the last failed try of the run was given up too.
        call(3, "image", False, 30),
    ]
    events = [running(1, 0), running(2, 0), running(2, 80), running(3, 0)]

    counted = report._call_retries(tries, events)

    assert counted == {
        "failed_calls": {"image": 2, "storage": 2},
        "call_retries": {"image": 1, "storage": 1},
        "calls_given_up": {"image": 1, "storage": 1},
    }


def series(**fields) -> dict:
    minutes = len(fields["done"])
    return {
        "minutes": minutes,
        "failed": [0] * minutes,
        "queued": [0] * minutes,
        "running": [0] * minutes,
        "spend_today_usd": [0.0] * minutes,
        "daily_budget_usd": 500.0,
        **fields,
    }


def test_throughput_is_drawn_in_five_minute_bins():
    bins = report.throughput_bins(
        series(done=[1] * 12, failed=[0, 1] * 6, queued=list(range(12)), running=[2] * 12)
    )
    assert bins == {
        "ends_at_hours": [5 / 60, 10 / 60, 12 / 60],
        "done": [5, 5, 2],
        "failed": [2, 3, 1],
        "queued": [4, 9, 11],  # the deepest queue within each bin
        "running": [2, 2, 2],
    }


@pytest.mark.parametrize(
    ("peak", "drawn"), [(30.0, None), (249.0, None), (250.0, 500.0), (520.0, 500.0)]
)
def test_the_budget_is_drawn_beside_the_spend_only_when_the_spend_comes_near_it(peak, drawn):
    assert report.budget_line(series(done=[0, 0], spend_today_usd=[peak / 2, peak])) == drawn
