"""The demo storybook kind: the seed's pipeline against simulated providers.

A book is 4 LLM calls (moderation, story, character sheet, image prompts), a cover plus one
image per page, and one storage upload. The providers are simulated: their latencies and
failure rates come from `[kinds.storybook.options]`, and they wait only on trio's clock, so
the same handler runs in real time in the daemon and compressed in tests and the load test.
A checkpoint after every paid step means a retry resumes where the last attempt stopped.
"""

from __future__ import annotations

import random
from typing import Annotated

import msgspec
import trio

from daemon.config import Duration, Fraction, decode_hook
from daemon.handlers import JobContext, Retry


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


class ServiceError(Exception):
    pass


async def simulated_call(name: str, sim: ServiceSim, rng: random.Random) -> None:
    await trio.sleep(sim.latency * rng.uniform(1 - sim.spread, 1 + sim.spread))
    if rng.random() < sim.failure_rate:
        raise ServiceError(f"{name} service failed")


async def storybook(ctx: JobContext, request: StoryRequest) -> dict:
    options = msgspec.convert(ctx.options, StorybookOptions, dec_hook=decode_hook)
    rng = random.Random(
        None if options.seed is None else f"{options.seed}:{ctx.job_id}:{ctx.attempt}"
    )
    state = dict(ctx.checkpoint or {"llm_done": 0, "images_done": 0})
    images_total = request.pages + 1
    steps_total = len(LLM_STEPS) + images_total + 1

    async def step(label: str, done_steps: int) -> None:
        await ctx.progress(done_steps / steps_total, label)

    try:
        while state["llm_done"] < len(LLM_STEPS):
            name = LLM_STEPS[state["llm_done"]]
            await step(f"llm: {name}", state["llm_done"])
            await simulated_call("llm", options.llm, rng)
            state["llm_done"] += 1
            await ctx.save_checkpoint(state)
        while state["images_done"] < images_total:
            done = state["images_done"]
            label = "cover" if done == 0 else f"page {done}/{request.pages}"
            await step(label, len(LLM_STEPS) + done)
            await simulated_call("image", options.image, rng)
            state["images_done"] += 1
            await ctx.save_checkpoint(state)
        await step("uploading", steps_total - 1)
        await simulated_call("storage", options.storage, rng)
    except ServiceError as exc:
        raise Retry(str(exc), code="SERVICE_FAILED") from None
    await ctx.progress(1.0, "done")
    return {
        "title": request.title,
        "style": request.style,
        "pages": request.pages,
        "images": images_total,
        "url": f"storage://books/{ctx.job_id}.pdf",
    }
