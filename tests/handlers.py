"""Fake handlers for tests: each behaves one way (quick, slow, flaky, hanging, failing)."""

from __future__ import annotations

import logging
import os
import random

import msgspec
import trio

from jobwarden import (
    BudgetExhausted,
    Fail,
    JobContext,
    Metered,
    Retry,
    ServiceFailed,
    ServiceUnavailable,
)


class Sized(msgspec.Struct, forbid_unknown_fields=True):
    n: int
    label: str = ""


async def noop(ctx: JobContext, payload: dict) -> dict:
    return {"echo": payload}


async def typed(ctx: JobContext, payload: Sized) -> dict:
    return {"n": payload.n}


async def sleepy(ctx: JobContext, payload: dict) -> dict:
    """Sleeps `seconds` (default: a random 0-20 ms); fails for good when `fail` is set."""
    seconds = payload.get("seconds")
    await trio.sleep(random.uniform(0, 0.02) if seconds is None else seconds)
    if payload.get("fail"):
        raise Fail("asked to fail", code="TEST_FAILURE")
    return {"slept": seconds}


async def flaky(ctx: JobContext, payload: dict) -> dict:
    """Asks for a retry until attempt `succeed_on`."""
    if ctx.attempt < payload.get("succeed_on", 10**6):
        raise Retry(f"transient failure on attempt {ctx.attempt}")
    return {"attempt": ctx.attempt}


async def crashing(ctx: JobContext, payload: dict) -> dict:
    raise ZeroDivisionError("division by zero in the handler")


async def hang(ctx: JobContext, payload: dict) -> dict:
    await trio.sleep_forever()
    raise AssertionError("unreachable")


async def stepper(ctx: JobContext, payload: dict) -> dict:
    """Reports progress once a second for `steps` steps, checkpointing each; resumes."""
    steps = payload.get("steps", 4)
    done = resumed_from = (ctx.checkpoint or {}).get("done", 0)
    while done < steps:
        await trio.sleep(payload.get("step_seconds", 1.0))
        done += 1
        await ctx.save_checkpoint({"done": done})
        await ctx.progress(done / steps, f"step {done}/{steps}")
    return {"steps": steps, "resumed_from": resumed_from}


async def slow_once(ctx: JobContext, payload: dict) -> dict:
    """The first run checkpoints and then blocks for a long time; a rerun finishes at once."""
    if ctx.checkpoint is None:
        await ctx.save_checkpoint({"started": True})
        await trio.sleep(payload.get("seconds", 3600))
    return {"attempt": ctx.attempt}


async def stalled(ctx: JobContext, payload: dict) -> dict:
    """Reports 50% once, then keeps heartbeating without its progress moving."""
    await ctx.progress(0.5, "halfway")
    while True:
        await trio.sleep(10)
        await ctx.heartbeat()


async def hang_once(ctx: JobContext, payload: dict) -> dict:
    """The first attempt hangs without a sign of life; the next one finishes at once."""
    if ctx.attempt == 1:
        await trio.sleep_forever()
    return {"attempt": ctx.attempt}


async def call_service(ctx: JobContext, payload: dict) -> dict:
    """Calls `service` once through ctx.call; the call takes `seconds` and fails if `fail`."""

    async def provider() -> str:
        await trio.sleep(payload.get("seconds", 1))
        if payload.get("fail"):
            raise ConnectionError("provider refused")
        return "ok"

    return {"answer": await ctx.call(payload["service"], provider)}


async def metered_calls(ctx: JobContext, payload: dict) -> dict:
    """Calls `service` once per figure in `units`, all at once from a nursery, as a handler
    that fans out would. Each call takes `seconds` and reports its figure as the units it used
    (`Metered`); `bound`, when given, is each call's declared most (`units=` on ctx.call)."""
    bound = {"units": payload["bound"]} if "bound" in payload else {}

    async def provider(used: float) -> Metered:
        await trio.sleep(payload.get("seconds", 1))
        return Metered(value="ok", units=used)

    async def one(used: float) -> None:
        await ctx.call(payload["service"], provider, used, **bound)

    async with trio.open_nursery() as nursery:
        for used in payload["units"]:
            nursery.start_soon(one, used)
    return {"calls": len(payload["units"])}


# The scope a test runs its daemon in, for `ends_the_daemon` to cancel.
TEARDOWN: list[trio.CancelScope] = []


async def ends_the_daemon(ctx: JobContext, payload: dict) -> dict:
    """Tears the daemon down as it returns: the outcome reaches the pool during the teardown."""
    TEARDOWN.pop().cancel()
    return {"ended": True}


# What `raise_together` raises, by name: each outcome a handler or ctx.call can signal.
OUTCOMES = {
    "fail": lambda: Fail("the input can never work", code="BAD_INPUT"),
    "retry": lambda: Retry("try again later", code="TRY_LATER"),
    "failed": lambda: ServiceFailed("paid", 3, ConnectionError("provider refused")),
    "unavailable": lambda: ServiceUnavailable("paid", None),
    "bug": lambda: KeyError("page"),
}


async def raise_together(ctx: JobContext, payload: dict) -> dict:
    """One task per name in `raise`, all in one nursery, each raising that outcome at once:
    the handler ends with them all in one ExceptionGroup. "budget" is a real refusal: a call
    to `tokens`, whose worst case is set above the whole budget, made first so that it is in
    the group."""
    refused: list[BudgetExhausted] = []
    if "budget" in payload["raise"]:
        try:
            await ctx.call("tokens", trio.sleep, 0)
        except BudgetExhausted as exc:
            refused.append(exc)

    async def signal(name: str) -> None:
        raise refused[0] if name == "budget" else OUTCOMES[name]()

    async with trio.open_nursery() as nursery:
        for name in payload["raise"]:
            nursery.start_soon(signal, name)
    return {}


async def records_completion(ctx: JobContext, payload: dict) -> dict:
    """Works a random 0-20 ms, then appends "<job id> <attempt>" to the file `log` as it
    returns: a line the store never committed the outcome of shows a run that will repeat."""
    await trio.sleep(random.uniform(0, 0.02))
    fd = os.open(payload["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, f"{ctx.job_id} {ctx.attempt}\n".encode())
    finally:
        os.close(fd)
    return {"attempt": ctx.attempt}


async def chatty(ctx: JobContext, payload: dict) -> dict:
    """Writes `lines` lines to its log (ctx.log), `every` seconds apart, then one record
    through the standard logging from a task of its own, and `text` if given."""
    for n in range(payload.get("lines", 3)):
        ctx.log(f"line {n}")
        if payload.get("every"):
            await trio.sleep(payload["every"])
    if "text" in payload:
        ctx.log(payload["text"])

    async def child() -> None:
        logging.getLogger("tests.chatty").warning("from a child task of job %d", ctx.job_id)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(child)
    return {"lines": payload.get("lines", 3)}
