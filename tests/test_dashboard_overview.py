"""What the dashboard's overview reads through the command layer, on MockClock: the jobs
finished in each five minutes of the last hour, and the alerts of the last hour."""

from __future__ import annotations

import trio

from jobwarden.actors.messages import BreakerTrip, HealthQuery
from jobwarden.mailbox import ReplySlot, ask

KINDS = """
[kinds.quick]
handler = "tests.handlers:sleepy"
max_attempts = 1

[services.flaky]
price_usd = 0.01
breaker = { failures = 3, recovery = "10m" }
"""


async def overview(daemon) -> dict:
    return await ask(daemon.handle.monitor, HealthQuery, by_kind=True, last_hour=True)


def span_of(spans: list[dict], at: float) -> dict:
    (span,) = [span for span in spans if span["start"] <= at < span["start"] + 300]
    return span


async def test_finished_jobs_are_counted_in_the_five_minutes_they_finished_in(
    autojump_clock, start_daemon
):
    daemon = await start_daemon(KINDS)
    early_done = await daemon.wait_done((await daemon.submit("quick", {"seconds": 1})).id)
    early_failed = await daemon.wait_done((await daemon.submit("quick", {"fail": True})).id)
    await trio.sleep(1800)
    late_done = await daemon.wait_done((await daemon.submit("quick", {"seconds": 1})).id)

    spans = (await overview(daemon))["finished_last_hour"]["spans"]

    assert len(spans) == 12
    assert spans[-1]["start"] <= daemon.now < spans[-1]["start"] + 300
    assert span_of(spans, late_done.finished_at)["done"] == 1
    early = span_of(spans, early_done.finished_at)
    assert early is span_of(spans, early_failed.finished_at)
    assert (early["done"], early["failed"]) == (1, 1)
    assert sum(span["done"] for span in spans) == 2
    assert sum(span["failed"] for span in spans) == 1


async def test_jobs_finished_over_an_hour_ago_are_not_counted(autojump_clock, start_daemon):
    daemon = await start_daemon(KINDS)
    await daemon.wait_done((await daemon.submit("quick", {"seconds": 1})).id)
    await trio.sleep(3601)

    spans = (await overview(daemon))["finished_last_hour"]["spans"]

    assert all(span["done"] == span["failed"] == span["canceled"] == 0 for span in spans)


async def test_an_alert_is_listed_for_an_hour(autojump_clock, start_daemon):
    daemon = await start_daemon(KINDS)
    reply: ReplySlot = ReplySlot()
    await daemon.handle.breaker.send(BreakerTrip(service="flaky", reply=reply))
    await reply.wait()
    await trio.sleep(1)

    (alert,) = (await overview(daemon))["alerts"]
    assert alert["alert"] == "breaker_flaky"
    assert "opened" in alert["message"]

    await trio.sleep(3600)
    assert (await overview(daemon))["alerts"] == []


async def test_the_overview_names_every_configured_kind(autojump_clock, start_daemon):
    daemon = await start_daemon(KINDS)

    assert "quick" in (await overview(daemon))["kinds"]
