"""ctx.call: the one path by which a job calls an external service.

For each try: reserve the call's worst case with the ledger (the service's `max_units`, or the
call's own smaller `units=` bound; refused: BudgetExhausted, the job waits for budget) -> ask
the breaker for a permit, which also waits for the service's concurrency and rate limits
(open circuit: ServiceUnavailable at once) -> the call, under the service's timeout -> settle
the ledger with the units used (a `Metered` result's, else the reserved bound) -> tell the
breaker how it went. A failed try is retried after the service's `retries` waits, with
jitter; when they are used up the call raises ServiceFailed. Every step heartbeats the job.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import trio

from jobwarden.actors.budget import is_units
from jobwarden.actors.messages import (
    CallDone,
    Charge,
    Permit,
    Release,
    Reservation,
    Reserve,
    Settle,
    Token,
    Withdraw,
)
from jobwarden.config import Config
from jobwarden.errors import ServiceFailed
from jobwarden.mailbox import ReplySlot, ask
from jobwarden.wire.views import JobView

# How long a finished call waits for its ledger entry to be written.
SETTLE_TIMEOUT = 10.0


class Metered(msgspec.Struct):
    """Return this from the called function when the units used are known only afterwards
    (tokens, seconds of audio): the ledger settles those units; the caller gets `value`.
    More units than the call reserved are booked all the same, as an overrun."""

    value: Any
    units: float


def call_bound(service: str, max_units: float, units: float | None) -> float:
    """The units one call reserves: its own `units=` bound, else the service's `max_units`."""
    if units is None:
        return max_units
    # Above 0: a priced call that declared itself free would slip past a stopped budget.
    if not is_units(units) or not 0 < units <= max_units:
        raise ValueError(
            f"ctx.call: units={units!r} for service '{service}' must be a number above 0 and "
            f"at most its max_units ({max_units:g}), the most one call can use"
        )
    return units


class ServiceLink:
    """What one job needs to call services: the ledger's and the breaker's inboxes."""

    def __init__(
        self,
        *,
        config: Config,
        job: JobView,
        ledger: trio.MemorySendChannel[Any],
        breaker: trio.MemorySendChannel[Any],
        heartbeat: Callable[[], Awaitable[None]],
        rng: random.Random,
    ) -> None:
        self._config = config
        self._job = job
        self._ledger = ledger
        self._breaker = breaker
        self._heartbeat = heartbeat
        self._rng = rng

    async def call(
        self, service: str, fn: Callable[..., Awaitable[Any]], args: tuple, units: float | None
    ) -> Any:
        spec = self._config.services.get(service)
        if spec is None:
            known = ", ".join(sorted(self._config.services)) or "none"
            raise ValueError(f"ctx.call: no service '{service}' in the config (known: {known})")
        units = call_bound(service, spec.max_units, units)
        waits = list(spec.retries)
        tries = 0
        while True:
            tries += 1
            await self._heartbeat()
            reservation = await ask(
                self._ledger,
                Reserve,
                job=self._job.id,
                user=self._job.user,
                kind=self._job.kind,
                service=service,
                units=units,
            )
            permit = Permit(service=service, reply=ReplySlot())
            try:
                await self._breaker.send(permit)
                token = await permit.reply.wait()
            except BaseException:
                self._give_up(permit, reservation)
                raise
            try:
                result, failure = await self._try(fn, args, spec.timeout, token, reservation)
            finally:
                await self._heartbeat()
            if failure is None:
                return result
            if not waits:
                raise ServiceFailed(service, tries, failure)
            wait = waits.pop(0)
            await trio.sleep(wait * (1 + self._rng.uniform(-spec.jitter, spec.jitter)))

    def _give_up(self, permit: Permit, reservation: Reservation) -> None:
        """Hand back a permit nobody will use (granted meanwhile or not) and its reservation,
        or the service loses a slot and the budget a reservation for good. A canceled task
        cannot await a send; both inboxes are unbounded, so these never need to wait."""
        try:
            self._breaker.send_nowait(Withdraw(service=permit.service, reply=permit.reply))
            self._ledger.send_nowait(Release(reservation=reservation))
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            return

    async def charge(self, service: str, units: float) -> float:
        """Record a cost already incurred (a command kind's `{"charge": ...}` line)."""
        return await ask(
            self._ledger,
            Charge,
            job=self._job.id,
            user=self._job.user,
            kind=self._job.kind,
            service=service,
            units=units,
        )

    async def _try(
        self,
        fn: Callable[..., Awaitable[Any]],
        args: tuple,
        timeout: float,
        token: Token,
        reservation: Reservation,
    ) -> tuple[Any, BaseException | None]:
        outcome, used, result, failure = "abandoned", reservation.units, None, None
        unpriceable = None
        try:
            with trio.fail_after(timeout):
                result = await fn(*args)
            if isinstance(result, Metered):
                if is_units(result.units):
                    used = result.units
                else:
                    # The call was made and its cost is unknown: book its declared worst case.
                    unpriceable = ValueError(
                        f"ctx.call: the call to '{reservation.service}' returned "
                        f"Metered(units={result.units!r}); units must be a number from 0 up"
                    )
                result = result.value
            outcome = "ok"
        except trio.TooSlowError:
            outcome, failure = "failed", TimeoutError(f"no answer within {timeout:g}s")
        except Exception as exc:
            outcome, failure = "failed", exc
        finally:
            await self._book(token, outcome, reservation, used)
        if unpriceable is not None:
            raise unpriceable
        return result, failure

    async def _book(
        self, token: Token, outcome: str, reservation: Reservation, units: float
    ) -> None:
        """Release the breaker slot and settle the ledger, even for a call canceled midway.

        Both inboxes are unbounded, so handing over never blocks; waiting for the ledger's
        answer is shielded but bounded, for when the whole daemon is being torn down.
        """
        settle = Settle(reservation=reservation, units=units, ok=outcome == "ok", reply=ReplySlot())
        try:
            self._breaker.send_nowait(CallDone(token=token, outcome=outcome))  # type: ignore[arg-type]
            self._ledger.send_nowait(settle)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            return
        with trio.CancelScope(shield=True), trio.move_on_after(SETTLE_TIMEOUT):
            await settle.reply.wait()
