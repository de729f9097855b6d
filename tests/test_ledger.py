"""The ledger and the hard budget, on MockClock: reservations, the emergency stop, reports."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
import trio
from structlog.testing import capture_logs

from jobwarden.actors.budget import BudgetCalendar, Limits, month_projection, over_limit
from jobwarden.actors.messages import (
    BudgetQuery,
    LedgerReport,
    Pause,
    Resume,
    ResumeBudget,
    SetBudget,
)
from jobwarden.errors import RequestError
from jobwarden.mailbox import ReplySlot
from tests.conftest import EPOCH

# EPOCH is 2027-01-15 08:00 UTC: the next budget day starts 16 h in.
NEXT_MIDNIGHT = 16 * 3600

KINDS = """
[budget]
daily_usd = {daily}
monthly_usd = 0
alert_at = [0.5, 0.8, 1.0]

[services.paid]
price_usd = 1.0
failures_billed = {billed}

[kinds.caller]
handler = "tests.handlers:call_service"
timeout = "off"
"""


def config(daily: float = 10, billed: str = "false") -> str:
    return KINDS.format(daily=daily, billed=billed)


async def ask(daemon, message: type, **fields):
    reply = ReplySlot()
    await daemon.handle.ledger.send(message(**fields, reply=reply))
    return await reply.wait()


async def pause_or_resume(daemon, message: type) -> None:
    reply = ReplySlot()
    await daemon.handle.scheduler.send(message(kind="caller", reply=reply))
    await reply.wait()


async def ledger_total(daemon) -> tuple[int, float]:
    return await daemon.handle.store.read(
        lambda conn: conn.execute("SELECT COUNT(*), COALESCE(SUM(usd), 0) FROM ledger").fetchone()
    )


def test_budget_days_follow_the_time_zone():
    assert datetime.fromtimestamp(EPOCH, UTC).isoformat() == "2027-01-15T08:00:00+00:00"
    utc, tokyo = BudgetCalendar("UTC"), BudgetCalendar("Asia/Tokyo")
    assert utc.day(EPOCH) == "2027-01-15"
    assert utc.next_day(EPOCH) - EPOCH == NEXT_MIDNIGHT
    # 17:00 in Tokyo: its budget day ends 7 h later.
    assert tokyo.next_day(EPOCH) - EPOCH == 7 * 3600
    assert utc.next_month(EPOCH) == datetime(2027, 2, 1, tzinfo=UTC).timestamp()


def test_which_limit_a_spend_would_cross_and_when_it_resets():
    utc = BudgetCalendar("UTC")
    limits = Limits(daily_usd=0.3, monthly_usd=5.0)

    def crossed(spent_day: float, spent_month: float, committed: float):
        return over_limit(
            limits,
            utc,
            spent_day=spent_day,
            spent_month=spent_month,
            committed=committed,
            now=EPOCH,
        )

    # Three calls at $0.10 sum to a float just over 0.3, and still fit.
    assert 0.1 + 0.1 + 0.1 > 0.3
    assert crossed(0.1 + 0.1, 1.0, 0.1) is None
    assert crossed(0.3, 1.0, 0.01) == ("daily", EPOCH + NEXT_MIDNIGHT)
    assert crossed(0.0, 4.99, 0.02) == ("monthly", utc.next_month(EPOCH))
    assert (
        over_limit(Limits(0, 0), utc, spent_day=1e6, spent_month=1e6, committed=1.0, now=EPOCH)
        is None
    )


def test_the_month_is_projected_at_its_pace_so_far():
    utc = BudgetCalendar("UTC")
    # 2027-01-15 08:00 UTC: 14⅓ days of January's 31 have passed.
    assert month_projection(utc, 43.0, EPOCH) == round(43.0 / (14 + 8 / 24) * 31, 2)
    # In the month's first hour the pace is taken over an hour, not over a minute.
    assert month_projection(utc, 1.0, utc.next_month(EPOCH) + 60) == 28 * 24


async def test_twenty_jobs_against_a_budget_for_ten_calls(autojump_clock, start_daemon):
    daemon = await start_daemon(config(daily=10), max_concurrent_jobs=20)
    # Held until all twenty are queued, then they all call at once.
    await pause_or_resume(daemon, Pause)
    jobs = [await daemon.submit("caller", {"service": "paid", "seconds": 5}) for _ in range(20)]
    await pause_or_resume(daemon, Resume)
    await trio.sleep(60)
    # Exactly ten calls were charged; the spend is at the limit, not a cent over.
    assert await ledger_total(daemon) == (10, 10.0)
    states = [await daemon.job(job.id) for job in jobs]
    assert sorted(job.status for job in states) == ["done"] * 10 + ["queued"] * 10
    waiting = [job for job in states if job.status == "queued"]
    assert {(job.reason, job.attempt) for job in waiting} == {("BUDGET_WAIT", 0)}
    budget = await ask(daemon, BudgetQuery)
    assert (budget["stopped"], budget["spent_today"], budget["reserved"]) == (True, 10.0, 0)

    with pytest.raises(RequestError) as refused:
        await daemon.submit("caller", {"service": "paid"})
    assert refused.value.body.code == "BUDGET_EXHAUSTED"
    assert refused.value.body.retry_after == NEXT_MIDNIGHT - 60

    # The next budget day lifts the stop; the waiting jobs run and are charged to it.
    for job in waiting:
        final = await daemon.wait_done(job.id)
        assert (final.status, final.attempt) == ("done", 1)
        assert final.started_at - EPOCH == NEXT_MIDNIGHT
    days = await daemon.handle.store.read(
        lambda conn: conn.execute("SELECT day, COUNT(*) FROM ledger GROUP BY day").fetchall()
    )
    assert days == [("2027-01-15", 10), ("2027-01-16", 10)]


async def test_resume_overrides_the_stop_for_the_rest_of_the_day(autojump_clock, start_daemon):
    daemon = await start_daemon(config(daily=2), max_concurrent_jobs=1)
    jobs = [await daemon.submit("caller", {"service": "paid", "seconds": 1}) for _ in range(3)]
    await trio.sleep(10)
    assert (await ask(daemon, BudgetQuery))["stopped"] is True
    view = await ask(daemon, ResumeBudget)
    assert (view["stopped"], view["override_today"]) == (False, True)
    final = await daemon.wait_done(jobs[2].id)
    assert final.status == "done"
    assert final.finished_at - EPOCH < 60
    assert await ledger_total(daemon) == (3, 3.0)


async def test_raising_the_limit_lifts_the_stop(autojump_clock, start_daemon):
    daemon = await start_daemon(config(daily=1), max_concurrent_jobs=1)
    first = await daemon.submit("caller", {"service": "paid"})
    second = await daemon.submit("caller", {"service": "paid"})
    await trio.sleep(10)
    assert (await daemon.job(second.id)).reason == "BUDGET_WAIT"
    view = await ask(daemon, SetBudget, daily_usd=5.0, monthly_usd=None)
    assert (view["stopped"], view["daily_usd"]) == (False, 5.0)
    assert (await daemon.wait_done(second.id)).status == "done"
    assert (await daemon.job(first.id)).status == "done"


@pytest.mark.parametrize(("billed", "expected_usd"), [("false", 0.0), ("true", 1.0)])
async def test_a_failed_call_costs_only_when_the_service_bills_failures(
    autojump_clock, start_daemon, billed, expected_usd
):
    daemon = await start_daemon(config(daily=100, billed=billed))
    job = await daemon.submit("caller", {"service": "paid", "fail": True})
    assert (await daemon.wait_done(job.id)).error.code == "SERVICE_FAILED"
    assert await ledger_total(daemon) == (4, 4 * expected_usd)  # four attempts, one call each


async def test_each_call_is_a_cost_event_with_the_jobs_running_total(autojump_clock, start_daemon):
    daemon = await start_daemon(config(daily=100, billed="true"))
    job = await daemon.submit("caller", {"service": "paid", "fail": True})
    await daemon.wait_done(job.id)
    costs = [event.data for event in await daemon.events(job.id) if event.type == "cost"]
    assert [(c["usd"], c["ok"], c["job_usd"]) for c in costs] == [
        (1.0, False, 1.0),
        (1.0, False, 2.0),
        (1.0, False, 3.0),
        (1.0, False, 4.0),
    ]
    assert costs[-1]["job_usd"] == (await ledger_total(daemon))[1]


async def test_report_totals_equal_the_sum_of_the_entries(autojump_clock, start_daemon):
    daemon = await start_daemon(config(daily=100) + "\n[services.cheap]\nprice_usd = 0.25\n")
    for user, service in [("alice", "paid"), ("bob", "cheap"), ("bob", "paid"), ("bob", "cheap")]:
        job = await daemon.submit("caller", {"service": service}, user=user)
        await daemon.wait_done(job.id)
    for by in ("service", "user", "kind"):
        report = await ask(daemon, LedgerReport, period="2027-01-15", by=by)
        assert sum(group["usd"] for group in report["groups"]) == pytest.approx(report["usd"])
    report = await ask(daemon, LedgerReport, period="2027-01", by="user")
    assert {g["user"]: g["usd"] for g in report["groups"]} == {"alice": 1.0, "bob": 1.5}
    assert (report["calls"], report["jobs"], report["usd"]) == (4, 4, 2.5)
    assert report["usd_per_job"] == 0.625
    assert await ledger_total(daemon) == (4, 2.5)
    # 2.5 USD in the first 14 1/3 days of a 31-day month.
    assert report["month_projection_usd"] == pytest.approx(2.5 / (14 + 8 / 24) * 31, abs=0.01)


async def test_alerts_fire_once_at_each_fraction(autojump_clock, start_daemon):
    daemon = await start_daemon(config(daily=4), max_concurrent_jobs=1)
    with capture_logs() as logs:
        for _ in range(4):
            await daemon.wait_done((await daemon.submit("caller", {"service": "paid"})).id)
        await trio.sleep(1)
    alerts = [entry["alert"] for entry in logs if entry["event"] == "alert"]
    assert alerts == ["budget_50", "budget_80", "budget_100"]


async def test_a_reloaded_config_changes_the_limits_unless_an_operator_set_them(
    autojump_clock, start_daemon, tmp_path
):
    from jobwarden.actors.messages import Reconfigure
    from tests.conftest import make_config

    daemon = await start_daemon(config(daily=1), max_concurrent_jobs=1)
    first = await daemon.submit("caller", {"service": "paid"})
    second = await daemon.submit("caller", {"service": "paid"})
    await trio.sleep(10)
    assert (await daemon.job(second.id)).reason == "BUDGET_WAIT"
    await daemon.handle.ledger.send(Reconfigure(config=make_config(tmp_path, config(daily=5))))
    assert (await daemon.wait_done(second.id)).status == "done"
    assert (await daemon.job(first.id)).status == "done"
    assert (await ask(daemon, BudgetQuery))["daily_usd"] == 5

    await ask(daemon, SetBudget, daily_usd=2.0, monthly_usd=None)
    await daemon.handle.ledger.send(Reconfigure(config=make_config(tmp_path, config(daily=50))))
    assert (await ask(daemon, BudgetQuery))["daily_usd"] == 2.0
