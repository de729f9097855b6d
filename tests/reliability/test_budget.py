"""The hard budget under a storm of concurrent metered calls, on MockClock with the real ledger.

Many jobs each make several calls at once from a nursery, each call reporting the units it
used (`Metered`), half of them under a per-call `units=` bound and half under the service's
`max_units`. Whatever the interleaving, what the ledger books never sums past the daily limit,
nor do its reservations plus its spend; the calls refused for budget put their jobs back to
wait (BUDGET_WAIT) without spending an attempt. The short form runs by default; the long one
(`-m slow`) runs days of it and prints its figures.
"""

from __future__ import annotations

import math
import random

import msgspec
import pytest
import trio

from jobwarden.actors.messages import BudgetQuery, Pause, Resume
from jobwarden.mailbox import ReplySlot
from tests.test_ledger import metered

# The test daemon's clock starts at 08:00 UTC: the first budget day ends 16 h in.
FIRST_DAY = 16 * 3600
DAY = 24 * 3600
# The service's price is $0.01 a unit: a call's worst case is $0.05.
MAX_UNITS = 5
EPSILON = 1e-9


class Storm(msgspec.Struct, frozen=True):
    jobs: int
    calls_per_job: int
    running: int  # jobs at once: running x calls_per_job calls in flight
    daily_usd: float
    days: int
    seed: int = 14


class Figures(msgspec.Struct):
    calls_asked: int = 0
    calls_booked: int = 0
    calls_billed: int = 0
    booked_usd: float = 0.0
    max_day_usd: float = 0.0
    max_reserved_usd: float = 0.0
    max_spent_and_reserved_usd: float = 0.0
    overrun_usd: float = 0.0
    # Times a job went back to the queue because a call was refused (BUDGET_WAIT).
    budget_waits: int = 0
    other_requeues: int = 0
    jobs_done: int = 0
    jobs_queued: int = 0


async def ask(channel, message: type, **fields):
    reply = ReplySlot()
    await channel.send(message(**fields, reply=reply))
    return await reply.wait()


def storm_payloads(storm: Storm) -> list[dict]:
    """Each job's calls and the units each really uses, at most MAX_UNITS; every other job
    declares its own bound (`units=`), the rest rely on the service's max_units."""
    rng = random.Random(storm.seed)
    payloads = []
    for n in range(storm.jobs):
        units = [round(rng.uniform(2, MAX_UNITS), 2) for _ in range(storm.calls_per_job)]
        payload = {"service": "tokens", "units": units, "seconds": round(rng.uniform(0.5, 3), 2)}
        if n % 2:
            payload["bound"] = math.ceil(max(units))
        payloads.append(payload)
    return payloads


async def run_storm(start_daemon, storm: Storm) -> Figures:
    daemon = await start_daemon(
        metered(daily=storm.daily_usd, max_units=MAX_UNITS), max_concurrent_jobs=storm.running
    )
    figures = Figures(calls_asked=storm.jobs * storm.calls_per_job)
    handle = daemon.handle
    # Held until every job is queued, so that the first round starts them all at once.
    await ask(handle.scheduler, Pause, kind="fanout")
    jobs = [
        await daemon.submit("fanout", payload, user=f"user{n % 10}")
        for n, payload in enumerate(storm_payloads(storm))
    ]

    async def watch_the_budget() -> None:
        """After each booked call: the most held in reservations, and held plus spent; and
        why jobs went back to the queue."""
        with handle.hub.subscribe(buffer=10**7) as sub:
            async for event in sub.events:
                if event.type == "status" and event.data["status"] == "queued":
                    if event.data.get("reason") == "BUDGET_WAIT":
                        figures.budget_waits += 1
                    else:
                        figures.other_requeues += 1
                if event.type == "cost":
                    view = await ask(handle.ledger, BudgetQuery)
                    figures.max_reserved_usd = max(figures.max_reserved_usd, view["reserved"])
                    figures.max_spent_and_reserved_usd = max(
                        figures.max_spent_and_reserved_usd,
                        view["spent_today"] + view["reserved"],
                    )

    async with trio.open_nursery() as watching:
        watching.start_soon(watch_the_budget)
        await trio.sleep(0)
        await ask(handle.scheduler, Resume, kind="fanout")
        # Up to the last second of each budget day: by then the day's stop holds everything.
        await trio.sleep(FIRST_DAY - 1)
        assert (await ask(handle.ledger, BudgetQuery))["stopped"] is True
        for _ in range(storm.days - 1):
            await trio.sleep(DAY)
        watching.cancel_scope.cancel()

    days = await handle.store.read(
        lambda conn: conn.execute(
            "SELECT day, COUNT(*), SUM(usd > 0), SUM(usd), SUM(overrun_usd) FROM ledger "
            "GROUP BY day ORDER BY day"
        ).fetchall()
    )
    for _day, calls, billed, usd, overrun in days:
        figures.calls_booked += calls
        figures.calls_billed += billed
        figures.booked_usd += usd
        figures.max_day_usd = max(figures.max_day_usd, usd)
        figures.overrun_usd += overrun
    finals = [await daemon.job(job.id) for job in jobs]
    # Every job either finished its first counted attempt or waits with none spent: a call
    # refused for budget inside its nursery gave the attempt back.
    assert {(job.status, job.attempt) for job in finals} <= {("done", 1), ("queued", 0)}
    figures.jobs_done = sum(job.status == "done" for job in finals)
    figures.jobs_queued = sum(job.status == "queued" for job in finals)
    return figures


@pytest.mark.parametrize(
    "storm",
    [
        # 600 calls, 240 at once (a worst case of $12 in flight) against $15 a day.
        pytest.param(
            Storm(jobs=200, calls_per_job=3, running=80, daily_usd=15, days=1), id="short"
        ),
        # 8000 calls, 1200 at once ($60 in flight) against $100 a day, over four budget days.
        pytest.param(
            Storm(jobs=2000, calls_per_job=4, running=300, daily_usd=100, days=4),
            id="long",
            marks=pytest.mark.slow,
        ),
    ],
)
async def test_concurrent_metered_calls_never_book_past_the_daily_limit(
    autojump_clock, start_daemon, storm
):
    figures = await run_storm(start_daemon, storm)
    print(
        f"\nbudget storm: {storm.jobs} jobs x {storm.calls_per_job} calls, "
        f"{storm.running * storm.calls_per_job} at once, limit ${storm.daily_usd:g}/day "
        f"over {storm.days} day(s): {figures.calls_asked} calls asked, "
        f"{figures.calls_booked} booked ({figures.calls_billed} billed), "
        f"most reserved at once ${figures.max_reserved_usd:.2f}, "
        f"most reserved + spent ${figures.max_spent_and_reserved_usd:.4f}, "
        f"booked ${figures.booked_usd:.4f}, max spend seen in a day ${figures.max_day_usd:.4f}, "
        f"overruns ${figures.overrun_usd:g}; jobs done {figures.jobs_done}, "
        f"still queued {figures.jobs_queued}, sent back to wait for budget "
        f"{figures.budget_waits} times"
    )
    assert figures.max_day_usd <= storm.daily_usd + EPSILON
    assert figures.max_spent_and_reserved_usd <= storm.daily_usd + EPSILON
    assert figures.overrun_usd == 0
    # The storm did reach the limit: calls were refused and their jobs waited for budget,
    # never counted as failures.
    assert figures.budget_waits > 0
    assert figures.other_requeues == 0
    assert figures.calls_billed > 0
