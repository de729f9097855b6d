"""The demo storybook kind, on MockClock with the shipped config's simulated providers."""

from __future__ import annotations

import pytest

from daemon.errors import RequestError

STORYBOOK = """
[kinds.storybook]
handler = "daemon.demo:storybook"
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


async def test_a_book_makes_the_seed_calls_and_reports_pages(autojump_clock, start_daemon):
    daemon = await start_daemon(STORYBOOK.format(image_failure_rate=0.0))
    job = await daemon.submit("storybook", {"title": "The brave otter", "pages": 8})
    final = await daemon.wait_done(job.id)
    assert final.status == "done"
    assert final.result["images"] == 9
    assert final.checkpoint == {"llm_done": 4, "images_done": 9}
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


async def test_image_failures_resume_from_the_checkpoint(autojump_clock, start_daemon):
    daemon = await start_daemon(
        STORYBOOK.format(image_failure_rate=0.3).replace(
            'handler = "daemon.demo:storybook"',
            'handler = "daemon.demo:storybook"\nmax_attempts = 50\nbackoff = ["0s"]',
        )
    )
    job = await daemon.submit("storybook", {"title": "Flaky pictures", "pages": 8})
    final = await daemon.wait_done(job.id)
    assert final.status == "done"
    assert final.attempt > 1
    # Each retry starts where the last one stopped: LLM steps are never repeated.
    llm_steps = [
        e.data["message"]
        for e in await daemon.events(job.id)
        if e.type == "progress" and e.data.get("message", "").startswith("llm:")
    ]
    assert len(llm_steps) == 4


async def test_payload_is_checked_against_the_story_request(autojump_clock, start_daemon):
    daemon = await start_daemon(STORYBOOK.format(image_failure_rate=0.0))
    with pytest.raises(RequestError) as refused:
        await daemon.submit("storybook", {"title": "", "pages": 8})
    assert "payload.title" in refused.value.body.message
    with pytest.raises(RequestError) as refused:
        await daemon.submit("storybook", {"title": "x", "pages": "eight"})
    assert "payload.pages" in refused.value.body.message
