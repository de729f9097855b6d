"""The demo storybook kind: the seed's pipeline against simulated providers.

A book is 4 LLM calls (moderation, story, character sheet, image prompts), a cover plus one
image per page, and one storage upload, each through ctx.call against the `[services]` of
the config. The providers are simulated: their latencies and failure rates come from
`[kinds.storybook.options]`, and they wait only on trio's clock, so the same handler runs in
real time in the daemon and compressed in tests and the load test. A checkpoint after every
paid step means a retry resumes where the last attempt stopped and never pays twice.

Two faults the load test injects (seed 001): `terminal_failure_rate` in the options ends a
share of books with a permanent error, under one of the seed's four codes; a payload with
`hang_once` wedges its first attempt, so the monitor has a stuck job to find.
"""

from __future__ import annotations

import random
from typing import Annotated, Literal, NamedTuple

import msgspec
import trio

from jobwarden import Fail, JobContext, ServiceFailed, ServiceUnavailable
from jobwarden.config import Duration, Fraction, decode_hook


class StoryRequest(msgspec.Struct, forbid_unknown_fields=True):
    title: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
    pages: Annotated[int, msgspec.Meta(ge=1, le=32)] = 8
    style: str = "watercolor"
    # Fault injection: the first attempt goes silent once the story is written, without
    # progress or heartbeat, as a wedged worker would; later attempts run normally.
    hang_once: bool = False


class ServiceSim(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    latency: Duration = Duration(1)
    # Each call's latency is drawn uniformly within latency * (1 +/- spread).
    spread: Fraction = 0.3
    failure_rate: Fraction = 0.0


class StorybookOptions(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    llm: ServiceSim = ServiceSim(latency=Duration(2))
    image: ServiceSim = ServiceSim(latency=Duration(6))
    storage: ServiceSim = ServiceSim(latency=Duration(0.5))
    # The share of attempts that meet a permanent error: a story that fails the safety
    # check, an LLM that never answers, an image prompt the provider always rejects, an
    # upload that always fails. The book fails at once under that error's code.
    terminal_failure_rate: Fraction = 0.0
    # Fixes the simulated latencies and failures per job and attempt, for repeatable runs.
    seed: int | None = None


LLM_STEPS = ("moderation", "story", "character", "prompts")
# Seed 001's terminal failure causes, and what the user is told of each.
TERMINAL_FAILURES = {
    "IMAGE_FAILED": "the image provider rejected a page on every try",
    "LLM_TIMEOUT": "the LLM did not answer within its timeout on any try",
    "SAFETY_OUTPUT": "the story failed the output safety check",
    "STORAGE_ERROR": "the finished book could not be uploaded",
}

ProviderFault = Literal["error", "hang"] | None


class TerminalFailure(NamedTuple):
    code: str
    # Which call of that step's service it strikes: the LLM step or the image number.
    call: int


class ProviderError(Exception):
    """What a simulated provider raises when it fails a call."""


async def simulated_call(
    name: str, sim: ServiceSim, rng: random.Random, fault: ProviderFault = None
) -> str:
    if fault == "hang":
        await trio.sleep_forever()
    await trio.sleep(sim.latency * rng.uniform(1 - sim.spread, 1 + sim.spread))
    if fault == "error" or rng.random() < sim.failure_rate:
        raise ProviderError(f"{name} provider returned an error")
    return f"{name}-{rng.getrandbits(32):08x}"


def draw_terminal_failure(rate: float, images: int, rng: random.Random) -> TerminalFailure | None:
    if rng.random() >= rate:
        return None
    code = rng.choice(sorted(TERMINAL_FAILURES))
    calls = {"IMAGE_FAILED": images, "LLM_TIMEOUT": len(LLM_STEPS)}.get(code, 1)
    return TerminalFailure(code, rng.randrange(calls))


async def provider_call(
    ctx: JobContext,
    service: str,
    sim: ServiceSim,
    rng: random.Random,
    *,
    doomed: TerminalFailure | None,
) -> str:
    """One call through ctx.call. A doomed call fails every try its service allows, and
    then the book, under the doom's code: a retry of the book would fail the same way."""
    if doomed is None:
        return await ctx.call(service, simulated_call, service, sim, rng)
    fault: ProviderFault = "hang" if doomed.code == "LLM_TIMEOUT" else "error"
    try:
        return await ctx.call(service, simulated_call, service, sim, rng, fault)
    except ServiceFailed as exc:
        raise Fail(TERMINAL_FAILURES[doomed.code], code=doomed.code) from exc


async def storybook(ctx: JobContext, request: StoryRequest) -> dict:
    """Every provider call goes through ctx.call: priced, limited, behind a breaker, retried.

    While the image circuit is open, pages get a placeholder instead of failing the book
    (seed 000 test 3): the result then says `degraded: true`.
    """
    options = msgspec.convert(ctx.options, StorybookOptions, dec_hook=decode_hook)
    seeded = None if options.seed is None else f"{options.seed}:{ctx.job_id}:{ctx.attempt}"
    rng = random.Random(seeded)
    state = dict(ctx.checkpoint or {"llm_done": 0, "images": []})
    images_total = request.pages + 1
    steps_total = len(LLM_STEPS) + images_total + 1
    # Its own generator, so that turning faults on leaves every latency draw as it was.
    fault_rng = random.Random(None if seeded is None else f"{seeded}:fault")
    doom = draw_terminal_failure(options.terminal_failure_rate, images_total, fault_rng)
    if request.hang_once:
        # A job made to hang tests the monitor: a doom that ended it before the hang would
        # count against recovery a job that never got stuck.
        doom = None

    def doomed(code: str, call: int = 0) -> TerminalFailure | None:
        return doom if doom == (code, call) else None

    while state["llm_done"] < len(LLM_STEPS):
        step = state["llm_done"]
        name = LLM_STEPS[step]
        await ctx.progress(step / steps_total, f"llm: {name}")
        await provider_call(ctx, "llm", options.llm, rng, doomed=doomed("LLM_TIMEOUT", step))
        state["llm_done"] += 1
        await ctx.save_checkpoint(state)
        if name == "story" and doomed("SAFETY_OUTPUT"):
            raise Fail(TERMINAL_FAILURES["SAFETY_OUTPUT"], code="SAFETY_OUTPUT")
    if request.hang_once and ctx.attempt == 1:
        await trio.sleep_forever()
    while len(state["images"]) < images_total:
        done = len(state["images"])
        label = "cover" if done == 0 else f"page {done}/{request.pages}"
        await ctx.progress((len(LLM_STEPS) + done) / steps_total, label)
        try:
            image = await provider_call(
                ctx, "image", options.image, rng, doomed=doomed("IMAGE_FAILED", done)
            )
        except ServiceUnavailable:
            image = "placeholder"
        state["images"] = [*state["images"], image]
        await ctx.save_checkpoint(state)
    await ctx.progress((steps_total - 1) / steps_total, "uploading")
    await provider_call(ctx, "storage", options.storage, rng, doomed=doomed("STORAGE_ERROR"))
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
