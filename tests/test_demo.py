"""The demo storybook kind against simulated providers, on MockClock, through ctx.call."""

from __future__ import annotations

import pytest

from jobwarden.actors.messages import BreakerTrip
from jobwarden.errors import RequestError
from jobwarden.mailbox import ReplySlot

pytestmark = pytest.mark.both_stores

SERVICES = """
[services.llm]
price_usd = 0.000338
retries = ["1s"]

[services.image]
price_usd = 0.024
max_concurrent = 5
retries = {image_retries}

[services.storage]
price_usd = 0.0004
"""

STORYBOOK = """
[kinds.storybook]
handler = "jobwarden.tools.demo:storybook"
services = ["llm", "storage"]
max_attempts = 50
backoff = ["0s"]
[kinds.storybook.options]
seed = 7
[kinds.storybook.options.llm]
latency = "1500ms"
spread = 0.0
[kinds.storybook.options.image]
latency = "3s"
spread = 0.0
failure_rate = {image_failure_rate}
[kinds.storybook.options.storage]
latency = "300ms"
spread = 0.0
"""


def config(image_failure_rate: float = 0.0, image_retries: str = '["2s"]') -> str:
    return SERVICES.format(image_retries=image_retries) + STORYBOOK.format(
        image_failure_rate=image_failure_rate
    )


async def ledger_rows(daemon, job_id: int) -> list[tuple[str, int, float]]:
    return await daemon.handle.store.read(
        lambda conn: conn.execute(
            "SELECT service, ok, usd FROM ledger WHERE job_id = ? ORDER BY id", (job_id,)
        ).fetchall()
    )


async def test_a_book_makes_the_seed_calls_and_pays_the_seed_price(autojump_clock, start_daemon):
    daemon = await start_daemon(config())
    job = await daemon.submit("storybook", {"title": "The brave otter", "pages": 8})
    final = await daemon.wait_done(job.id)
    assert final.status == "done"
    assert (final.result["images"], final.result["degraded"]) == (9, False)
    messages = [e.data.get("message") for e in await daemon.events(job.id) if e.type == "progress"]
    assert messages[:5] == [
        "llm: moderation",
        "llm: story",
        "llm: character",
        "llm: prompts",
        "cover",
    ]
    assert "page 3/8" in messages
    # 4 LLM calls at 1.5 s, 9 images at 3 s, one upload at 0.3 s, on the virtual clock.
    assert final.finished_at - final.started_at == pytest.approx(4 * 1.5 + 9 * 3 + 0.3)
    rows = await ledger_rows(daemon, job.id)
    assert [service for service, _, _ in rows] == ["llm"] * 4 + ["image"] * 9 + ["storage"]
    assert sum(usd for _, _, usd in rows) == pytest.approx(4 * 0.000338 + 9 * 0.024 + 0.0004)


async def test_a_retried_book_never_pays_for_a_page_twice(autojump_clock, start_daemon):
    # No per-call retries: a failed image fails the attempt, and the job is retried.
    daemon = await start_daemon(config(image_failure_rate=0.3, image_retries="[]"))
    job = await daemon.submit("storybook", {"title": "Flaky pictures", "pages": 8})
    final = await daemon.wait_done(job.id)
    assert final.status == "done"
    assert final.attempt > 1
    rows = await ledger_rows(daemon, job.id)
    paid_images = [usd for service, ok, usd in rows if service == "image" and ok]
    failed_images = [usd for service, ok, usd in rows if service == "image" and not ok]
    assert len(paid_images) == 9
    assert failed_images and sum(failed_images) == 0
    # Each retry starts where the last one stopped: LLM steps are never repeated.
    assert [service for service, _, _ in rows].count("llm") == 4


async def test_an_open_image_circuit_degrades_to_placeholders(autojump_clock, start_daemon):
    daemon = await start_daemon(config())
    reply = ReplySlot()
    await daemon.handle.breaker.send(BreakerTrip(service="image", reply=reply))
    assert (await reply.wait())["state"] == "open"
    job = await daemon.submit("storybook", {"title": "No pictures today", "pages": 2})
    final = await daemon.wait_done(job.id)
    assert final.status == "done"
    assert (final.result["degraded"], final.result["placeholders"]) == (True, 3)
    assert [s for s, _, _ in await ledger_rows(daemon, job.id)] == ["llm"] * 4 + ["storage"]


async def test_payload_is_checked_against_the_story_request(autojump_clock, start_daemon):
    daemon = await start_daemon(config())
    with pytest.raises(RequestError) as refused:
        await daemon.submit("storybook", {"title": "", "pages": 8})
    assert "payload.title" in refused.value.body.message
    with pytest.raises(RequestError) as refused:
        await daemon.submit("storybook", {"title": "x", "pages": "eight"})
    assert "payload.pages" in refused.value.body.message


async def test_image_api_at_50_percent_failure_degrades_without_cascading(
    autojump_clock, start_daemon
):
    """Seed 000 test 3: books complete, complete with placeholders, or fail; LLM untouched."""
    image_breaker = (
        "\n[services.image.breaker]\nfailures = 5\nerror_rate = 0.10\n"
        'window = "60s"\nmin_calls = 20\nrecovery = "60s"\n'
    )
    config_text = config(image_failure_rate=0.5, image_retries='["2s", "5s", "12s"]')
    config_text = config_text.replace("max_attempts = 50", "max_attempts = 4")
    config_text = config_text.replace("[services.storage]", image_breaker + "\n[services.storage]")
    daemon = await start_daemon(config_text, max_concurrent_jobs=10)
    books = [
        await daemon.submit("storybook", {"title": f"Book {n}", "pages": 8}) for n in range(20)
    ]
    finals = [await daemon.wait_done(book.id) for book in books]
    done = [f for f in finals if f.status == "done" and not f.result["degraded"]]
    degraded = [f for f in finals if f.status == "done" and f.result["degraded"]]
    failed = [f for f in finals if f.status == "failed"]
    assert len(done) + len(degraded) + len(failed) == 20
    assert degraded, "the open image circuit should have produced placeholder books"
    assert all(f.error.code == "SERVICE_FAILED" for f in failed)
    calls = await daemon.handle.store.read(
        lambda conn: conn.execute(
            "SELECT service, SUM(ok), SUM(1 - ok) FROM ledger GROUP BY service"
        ).fetchall()
    )
    by_service = {service: (ok, bad) for service, ok, bad in calls}
    # No cascade: the LLM saw only successful calls, and its circuit stayed closed.
    assert by_service["llm"][1] == 0
    state = await daemon.handle.store.read(
        lambda conn: dict(conn.execute("SELECT service, state FROM breakers").fetchall())
    )
    assert "llm" not in state
    print(f"split: {len(done)} done, {len(degraded)} degraded, {len(failed)} failed")
