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

pytestmark = pytest.mark.both_stores

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
        lambda conn: conn.execute(
            "SELECT day, COUNT(*) FROM ledger GROUP BY day ORDER BY day"
        ).fetchall()
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


async def assert_held_by_the_stop(daemon, job_id: int) -> None:
    """The first call's spend reached the limit and stopped the budget: the next job waits in
    the queue without having started."""
    job = await daemon.job(job_id)
    assert (job.status, job.attempt) == ("queued", 0)
    assert (await ask(daemon, BudgetQuery))["stopped"] is True


async def test_raising_the_limit_lifts_the_stop(autojump_clock, start_daemon):
    daemon = await start_daemon(config(daily=1), max_concurrent_jobs=1)
    first = await daemon.submit("caller", {"service": "paid"})
    second = await daemon.submit("caller", {"service": "paid"})
    await trio.sleep(10)
    await assert_held_by_the_stop(daemon, second.id)
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
    # The fourth call reached the limit, which stops the budget at once.
    assert alerts == ["budget_50", "budget_80", "budget_100", "budget_stop"]


async def test_a_reloaded_config_changes_the_limits_unless_an_operator_set_them(
    autojump_clock, start_daemon, tmp_path
):
    from jobwarden.actors.messages import Reconfigure
    from tests.conftest import make_config

    daemon = await start_daemon(config(daily=1), max_concurrent_jobs=1)
    first = await daemon.submit("caller", {"service": "paid"})
    second = await daemon.submit("caller", {"service": "paid"})
    await trio.sleep(10)
    await assert_held_by_the_stop(daemon, second.id)
    await daemon.handle.ledger.send(Reconfigure(config=make_config(tmp_path, config(daily=5))))
    assert (await daemon.wait_done(second.id)).status == "done"
    assert (await daemon.job(first.id)).status == "done"
    assert (await ask(daemon, BudgetQuery))["daily_usd"] == 5

    await ask(daemon, SetBudget, daily_usd=2.0, monthly_usd=None)
    await daemon.handle.ledger.send(Reconfigure(config=make_config(tmp_path, config(daily=50))))
    assert (await ask(daemon, BudgetQuery))["daily_usd"] == 2.0


METERED = """
[budget]
daily_usd = {daily}
monthly_usd = 0
alert_at = [1.0]

[services.tokens]
price_usd = 0.01
unit = "1k_tokens"
{max_units}

[kinds.fanout]
handler = "tests.handlers:metered_calls"
timeout = "off"

[kinds.together]
handler = "tests.handlers:raise_together"
timeout = "off"
backoff = ["1h"]
"""


def metered(daily: float = 1, max_units: int | None = None) -> str:
    bound = "" if max_units is None else f"max_units = {max_units}"
    return METERED.format(daily=daily, max_units=bound)


async def refused_code(daemon, kind: str = "fanout") -> str:
    with pytest.raises(RequestError) as refused:
        await daemon.submit(kind, {"service": "tokens", "units": [1]})
    return refused.value.body.code


async def test_a_call_that_uses_more_than_it_reserved_is_booked_flagged_and_stops_the_budget(
    autojump_clock, start_daemon
):
    # No max_units: the call reserves one unit ($0.01) and reports 500 ($5.00).
    daemon = await start_daemon(metered(daily=1))
    with capture_logs() as logs:
        job = await daemon.submit("fanout", {"service": "tokens", "units": [500]})
        assert (await daemon.wait_done(job.id)).status == "done"
        await trio.sleep(1)
    rows = await daemon.handle.store.read(
        lambda conn: conn.execute("SELECT units, usd, overrun_usd FROM ledger").fetchall()
    )
    assert rows == [(500.0, pytest.approx(5.0), pytest.approx(4.99))]
    report = await ask(daemon, LedgerReport, period="2027-01-15", by="service")
    assert (report["overruns"], report["overrun_usd"]) == (1, 4.99)
    budget = await ask(daemon, BudgetQuery)
    assert (budget["stopped"], budget["remaining_today"]) == (True, -4.0)
    assert await refused_code(daemon) == "BUDGET_EXHAUSTED"
    overrun = [entry for entry in logs if entry.get("alert") == "budget_overrun_tokens"]
    assert len(overrun) == 1
    assert (overrun[0]["service"], overrun[0]["units"], overrun[0]["reserved_units"]) == (
        "tokens",
        500.0,
        1.0,
    )
    assert "tokens" in overrun[0]["message"]


async def test_a_call_within_its_reservation_is_not_an_overrun(autojump_clock, start_daemon):
    daemon = await start_daemon(metered(daily=1, max_units=50))
    job = await daemon.submit("fanout", {"service": "tokens", "units": [30, 50]})
    assert (await daemon.wait_done(job.id)).status == "done"
    rows = await daemon.handle.store.read(
        lambda conn: conn.execute("SELECT units, overrun_usd FROM ledger ORDER BY units").fetchall()
    )
    assert rows == [(30.0, 0.0), (50.0, 0.0)]
    assert (await ask(daemon, BudgetQuery))["stopped"] is False


@pytest.mark.parametrize("bound", [80, 0], ids=["above-max-units", "free"])
async def test_a_call_must_declare_a_bound_within_its_services_max_units(
    autojump_clock, start_daemon, bound
):
    daemon = await start_daemon(metered(daily=1, max_units=50))
    job = await daemon.submit("fanout", {"service": "tokens", "units": [10], "bound": bound})
    final = await daemon.wait_done(job.id)
    assert (final.status, final.error.code) == ("failed", "HANDLER_ERROR")
    assert "max_units" in final.error.message
    assert await ledger_total(daemon) == (0, 0.0)


async def test_units_the_ledger_cannot_price_are_booked_at_the_calls_worst_case(
    autojump_clock, start_daemon
):
    daemon = await start_daemon(metered(daily=10, max_units=50))
    job = await daemon.submit("fanout", {"service": "tokens", "units": ["lots"]})
    final = await daemon.wait_done(job.id)
    assert (final.status, final.error.code) == ("failed", "HANDLER_ERROR")
    assert "Metered(units='lots')" in final.error.message
    # One call per attempt, each booked at the 50 units it reserved; the ledger lives on.
    assert await ledger_total(daemon) == (4, pytest.approx(2.0))
    assert (await ask(daemon, BudgetQuery))["spent_today"] == pytest.approx(2.0)


async def test_a_call_reserves_its_services_max_units_so_the_limit_holds(
    autojump_clock, start_daemon
):
    # $0.50 a call at most: the third call at once would pass $1, and is refused up front.
    daemon = await start_daemon(metered(daily=1, max_units=50))
    job = await daemon.submit("fanout", {"service": "tokens", "units": [50, 50, 50]})
    await trio.sleep(60)
    # The two admitted calls were cut short when the third was refused: booked, unbilled.
    assert await ledger_total(daemon) == (2, 0.0)
    waiting = await daemon.job(job.id)
    assert (waiting.status, waiting.reason, waiting.attempt) == ("queued", "BUDGET_WAIT", 0)


async def spend_five_dollars(daemon) -> None:
    job = await daemon.submit("fanout", {"service": "tokens", "units": [250, 250]})
    assert (await daemon.wait_done(job.id)).status == "done"
    assert (await ask(daemon, BudgetQuery))["spent_today"] == 5.0


@pytest.mark.parametrize(
    ("how", "lowered_to"),
    [("reload", 4), ("budget_set", 4), ("restart", 4), ("budget_set", 5)],
    ids=["reload", "budget-set", "restart", "budget-set-to-the-spend"],
)
async def test_spend_already_at_a_lowered_limit_stops_the_budget(
    autojump_clock, start_daemon, tmp_path, how, lowered_to
):
    from jobwarden.actors.messages import Reconfigure
    from tests.conftest import make_config

    daemon = await start_daemon(metered(daily=10, max_units=250))
    await spend_five_dollars(daemon)
    if how == "reload":
        lower = make_config(tmp_path, metered(daily=lowered_to, max_units=250))
        await daemon.handle.ledger.send(Reconfigure(config=lower))
    elif how == "budget_set":
        await ask(daemon, SetBudget, daily_usd=lowered_to, monthly_usd=None)
    else:
        await daemon.stop(grace=0)
        daemon = await start_daemon(metered(daily=lowered_to, max_units=250))
    budget = await ask(daemon, BudgetQuery)
    assert (budget["stopped"], budget["spent_today"], budget["daily_usd"]) == (
        True,
        5.0,
        lowered_to,
    )
    assert await refused_code(daemon) == "BUDGET_EXHAUSTED"


async def test_a_charge_that_reaches_the_limit_stops_the_budget(autojump_clock, start_daemon):
    from jobwarden.actors.messages import Charge

    daemon = await start_daemon(metered(daily=1))
    # A command kind's {"charge": ...} line: booked after the fact, it cannot be refused.
    usd = await ask(daemon, Charge, job=None, user="alice", kind="cmd", service="tokens", units=100)
    assert usd == pytest.approx(1.0)
    assert (await ask(daemon, BudgetQuery))["stopped"] is True
    assert await refused_code(daemon) == "BUDGET_EXHAUSTED"


@pytest.mark.parametrize(
    "units", [float("nan"), -100.0, float("inf")], ids=["nan", "negative", "inf"]
)
async def test_a_charge_the_ledger_cannot_price_is_refused(autojump_clock, start_daemon, units):
    from jobwarden.actors.messages import Charge

    daemon = await start_daemon(metered(daily=1))
    with pytest.raises(RequestError) as refused:
        await ask(daemon, Charge, job=None, user="alice", kind="cmd", service="tokens", units=units)
    assert refused.value.body.code == "INVALID_REQUEST"
    # The spend stays a figure the limit can hold: a real charge still stops the budget.
    await ask(daemon, Charge, job=None, user="alice", kind="cmd", service="tokens", units=100)
    assert (await ask(daemon, BudgetQuery))["stopped"] is True
    assert await ledger_total(daemon) == (1, pytest.approx(1.0))


async def test_calls_refused_for_budget_inside_a_handlers_nursery_wait_for_budget(
    autojump_clock, start_daemon
):
    # $0.50 a call at most against $1: of four calls at once, two are refused; the handler's
    # nursery raises their BudgetExhausted in an ExceptionGroup.
    daemon = await start_daemon(metered(daily=1, max_units=50))
    job = await daemon.submit("fanout", {"service": "tokens", "units": [10, 10, 10, 10]})
    await trio.sleep(60)
    waiting = await daemon.job(job.id)
    assert (waiting.status, waiting.reason, waiting.attempt) == ("queued", "BUDGET_WAIT", 0)
    # With room for all four, it runs again and is done on its first counted attempt.
    await ask(daemon, SetBudget, daily_usd=2.0, monthly_usd=None)
    final = await daemon.wait_done(job.id)
    assert (final.status, final.attempt) == ("done", 1)
    # The four calls of the attempt that ran, booked; a call the refusal cut short while it
    # was being made is booked at nothing (it was never billed), one that had not begun is not.
    booked = await daemon.handle.store.read(
        lambda conn: conn.execute("SELECT COUNT(*), SUM(usd) FROM ledger WHERE ok = 1").fetchone()
    )
    assert booked == (4, pytest.approx(0.4))


@pytest.mark.parametrize(
    ("raised", "status", "reason", "attempt", "code"),
    [
        pytest.param(["budget"], "queued", "BUDGET_WAIT", 0, None, id="budget-only"),
        pytest.param(["failed", "failed"], "queued", "RETRY", 1, "SERVICE_FAILED", id="failed"),
        pytest.param(
            ["unavailable"], "queued", "RETRY", 1, "SERVICE_UNAVAILABLE", id="unavailable"
        ),
        pytest.param(["retry", "retry"], "queued", "RETRY", 1, "TRY_LATER", id="retry-only"),
        pytest.param(["fail", "fail"], "failed", "BAD_INPUT", 1, "BAD_INPUT", id="fail-only"),
        pytest.param(["budget", "failed"], "queued", "RETRY", 1, "SERVICE_FAILED", id="mix"),
        pytest.param(
            ["unavailable", "failed"], "queued", "RETRY", 1, "SERVICE_FAILED", id="failed-first"
        ),
        pytest.param(["failed", "retry"], "queued", "RETRY", 1, "TRY_LATER", id="retry-first"),
        pytest.param(
            ["budget", "retry", "fail"], "failed", "BAD_INPUT", 1, "BAD_INPUT", id="fail-beats-all"
        ),
        pytest.param(["budget", "bug"], "queued", "RETRY", 1, "HANDLER_ERROR", id="bug-counts"),
        pytest.param(["bug", "fail"], "failed", "BAD_INPUT", 1, "BAD_INPUT", id="fail-beats-bug"),
    ],
)
async def test_outcomes_raised_together_by_a_handlers_nursery(
    autojump_clock, start_daemon, raised, status, reason, attempt, code
):
    # A call's worst case is $10 against $1, so the budget refuses it. A retry waits an hour
    # and a budget refusal until midnight: a minute in, the job is where its outcome put it.
    daemon = await start_daemon(metered(daily=1, max_units=1000))
    job = await daemon.submit("together", {"raise": raised})
    await trio.sleep(60)
    after = await daemon.job(job.id)
    assert (after.status, after.reason, after.attempt) == (status, reason, attempt)
    assert (after.error.code if after.error else None) == code
