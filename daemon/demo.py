"""The demo storybook kind: the seed's pipeline against simulated providers.

A book is 4 LLM calls (moderation, story, character sheet, image prompts), a cover plus one
image per page, and one storage upload, each through ctx.call against the `[services]` of
the config. The providers are simulated: their latencies and failure rates come from
`[kinds.storybook.options]`, and they wait only on trio's clock, so the same handler runs in
real time in the daemon and compressed in tests and the load test. A checkpoint after every
paid step means a retry resumes where the last attempt stopped and never pays twice.
"""

from __future__ import annotations

import random
from typing import Annotated

import msgspec
import trio

from daemon.config import Duration, Fraction, decode_hook
from daemon.handlers import JobContext, ServiceUnavailable


class StoryRequest(msgspec.Struct, forbid_unknown_fields=True):
    title: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
    pages: Annotated[int, msgspec.Meta(ge=1, le=32)] = 8
    style: str = "watercolor"


class ServiceSim(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    latency: Duration = Duration(1)
    # Each call's latency is drawn uniformly within latency * (1 +/- spread).
    spread: Fraction = 0.3
    failure_rate: Fraction = 0.0


class StorybookOptions(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    llm: ServiceSim = ServiceSim(latency=Duration(2))
    image: ServiceSim = ServiceSim(latency=Duration(6))
    storage: ServiceSim = ServiceSim(latency=Duration(0.5))
    # Fixes the simulated latencies and failures per job and attempt, for repeatable runs.
    seed: int | None = None


LLM_STEPS = ("moderation", "story", "character", "prompts")


class ProviderError(Exception):
    """What a simulated provider raises when it fails a call."""


async def simulated_call(name: str, sim: ServiceSim, rng: random.Random) -> str:
    await trio.sleep(sim.latency * rng.uniform(1 - sim.spread, 1 + sim.spread))
    if rng.random() < sim.failure_rate:
        raise ProviderError(f"{name} provider returned an error")
    return f"{name}-{rng.getrandbits(32):08x}"


async def storybook(ctx: JobContext, request: StoryRequest) -> dict:
    """Every provider call goes through ctx.call: priced, limited, behind a breaker, retried.

    While the image circuit is open, pages get a placeholder instead of failing the book
    (seed 000 test 3): the result then says `degraded: true`.
    """
    options = msgspec.convert(ctx.options, StorybookOptions, dec_hook=decode_hook)
    rng = random.Random(
        None if options.seed is None else f"{options.seed}:{ctx.job_id}:{ctx.attempt}"
    )
    state = dict(ctx.checkpoint or {"llm_done": 0, "images": []})
    images_total = request.pages + 1
    steps_total = len(LLM_STEPS) + images_total + 1

    while state["llm_done"] < len(LLM_STEPS):
        name = LLM_STEPS[state["llm_done"]]
        await ctx.progress(state["llm_done"] / steps_total, f"llm: {name}")
        await ctx.call("llm", simulated_call, "llm", options.llm, rng)
        state["llm_done"] += 1
        await ctx.save_checkpoint(state)
    while len(state["images"]) < images_total:
        done = len(state["images"])
        label = "cover" if done == 0 else f"page {done}/{request.pages}"
        await ctx.progress((len(LLM_STEPS) + done) / steps_total, label)
        try:
            image = await ctx.call("image", simulated_call, "image", options.image, rng)
        except ServiceUnavailable:
            image = "placeholder"
        state["images"] = [*state["images"], image]
        await ctx.save_checkpoint(state)
    await ctx.progress((steps_total - 1) / steps_total, "uploading")
    await ctx.call("storage", simulated_call, "storage", options.storage, rng)
    await ctx.progress(1.0, "done")
    placeholders = state["images"].count("placeholder")
    return {
        "title": request.title,
        "style": request.style,
        "pages": request.pages,
        "images": images_total,
        "placeholders": placeholders,
        "degraded": placeholders > 0,
        "url": f"storage://books/{ctx.job_id}.pdf",
    }
