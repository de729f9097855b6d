"""Ledger: what every external call costs, and the hard budget that spending never crosses.

Consumes `Reserve`/`Settle`/`Release` from ctx.call, `Charge` from command kinds,
`BudgetQuery`/`SetBudget`/`ResumeBudget`/`LedgerReport` from the admin socket, `Reconfigure`.
Produces `BudgetState` for admission and the scheduler, and alerts for the monitor.

A call first reserves its worst case: its declared most units (the service's `max_units`,
or the call's own `units=`) at the service's price. The reservation is refused when the day's
(or month's) spend plus every open reservation plus this one would pass the limit. One actor
decides every reservation in turn, so however many jobs call at once, their reservations
together never pass the limit, and neither does spend while each call stays within what it
reserved. A refusal is the emergency stop: admission answers BUDGET_EXHAUSTED, the scheduler
holds dispatch, and the job whose call was refused goes back to the queue to wait, its
checkpoint kept. The stop lifts at the next budget day (midnight in `budget.timezone`), when
an operator raises the limit, or on `budget resume`.

Settling writes one ledger row per call, with the units actually used; a failed call costs
nothing unless the service bills failures. A call that used more than it reserved is booked
as it happened, its excess in the row's `overrun_usd`, and raises an alert naming the service.
A command kind's `charge` line is booked after the fact the same way. Whenever what was booked
reaches or passes a limit (and when the ledger starts, or a limit is lowered, with spend
already there) the budget stops at once. Budget days, the limit checks and the month's
projection are plain code in actors/budget.py.
"""

from __future__ import annotations

import itertools
import math
from functools import partial
from typing import Any

import msgspec
import structlog
import trio

from jobwarden.actors.budget import (
    EPSILON,
    BudgetCalendar,
    Limits,
    is_units,
    limit_reached,
    month_projection,
    over_limit,
)
from jobwarden.actors.messages import (
    BudgetQuery,
    BudgetState,
    Charge,
    LedgerMessage,
    LedgerReport,
    RaiseAlert,
    Reconfigure,
    Release,
    Reservation,
    Reserve,
    ResumeBudget,
    SetBudget,
    Settle,
)
from jobwarden.clock import WallClock
from jobwarden.config import Config
from jobwarden.errors import BudgetExhausted, RequestError, StoreError
from jobwarden.mailbox import ReplySlot, receive_by
from jobwarden.metrics import Metrics
from jobwarden.store import Engine, jobs
from jobwarden.store.ledger import record_entry, report, spent

log = structlog.get_logger("ledger")

LIMITS_SETTING = "budget_limits"
OVERRIDE_SETTING = "budget_override_day"


class Ledger:
    def __init__(
        self,
        *,
        config: Config,
        store: Engine,
        clock: WallClock,
        inbox: trio.MemoryReceiveChannel[LedgerMessage],
        listeners: list[trio.MemorySendChannel[Any]],
        alerts: trio.MemorySendChannel[Any],
        metrics: Metrics,
    ) -> None:
        self._config = config
        self._store = store
        self._clock = clock
        self._inbox = inbox
        self._listeners = listeners
        self._alerts = alerts
        self._metrics = metrics
        self._calendar = BudgetCalendar(config.budget.timezone)
        self._ids = itertools.count(1)
        self._reserved: dict[int, Reservation] = {}
        self._limits = Limits(config.budget.daily_usd, config.budget.monthly_usd)
        # `budget set` wins over the config file, across restarts and reloads.
        self._limits_set_by_operator = False
        self._override_day: str | None = None
        self._stop: BudgetState = BudgetState(stopped=False)
        self._alerted: set[float] = set()
        self._day = ""
        self._month = ""
        self._spent_day = 0.0
        self._spent_month = 0.0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        stored = await self._store.read(partial(jobs.get_setting, key=LIMITS_SETTING))
        if stored is not None:
            self._limits = msgspec.convert(stored, Limits)
            self._limits_set_by_operator = True
        self._override_day = await self._store.read(partial(jobs.get_setting, key=OVERRIDE_SETTING))
        await self._roll_over()
        async with self._inbox, self._alerts:
            task_status.started()
            while True:
                boundary = self._clock.deadline_for(self._calendar.next_day(self._clock.now()))
                try:
                    msg = await receive_by(self._inbox, boundary)
                except trio.EndOfChannel:
                    break
                if msg is None:
                    await self._roll_over()
                else:
                    await self._handle(msg)
        for listener in self._listeners:
            await listener.aclose()

    async def _roll_over(self) -> None:
        """A new budget day (or month): reload what was spent, lift a stop that has expired."""
        now = self._clock.now()
        day, month = self._calendar.day(now), self._calendar.month(now)
        if day == self._day:
            return
        if self._day:
            log.info("new budget day", day=day, spent_yesterday=round(self._spent_day, 6))
        self._day, self._month = day, month
        self._spent_day, self._spent_month = await self._store.read(
            partial(spent, day=day, month=month)
        )
        self._alerted = {f for f in self._config.budget.alert_at if self._fraction() >= f}
        if self._stop.stopped and self._stop.until is not None and now >= self._stop.until:
            await self._set_stop(BudgetState(stopped=False))
        # Spend already at a limit (the day began with the month's spent, or the daemon starts
        # after booking to the limit): stopped from the start.
        await self._stop_if_reached()

    def _fraction(self) -> float:
        daily = self._limits.daily_usd
        return self._spent_day / daily if daily else 0.0

    async def _handle(self, msg: LedgerMessage) -> None:
        match msg:
            case Reserve():
                await self._reserve(msg)
            case Settle(reservation=reservation, units=units, ok=ok, reply=reply):
                self._reserved.pop(reservation.id, None)
                billed = ok or reservation.failures_billed
                usd = await self._record(reservation, units, ok=ok, billed=billed)
                await self._stop_if_reached()
                reply.set(usd)
            case Release(reservation=reservation):
                self._reserved.pop(reservation.id, None)
            case Charge(reply=reply):
                if not is_units(msg.units):
                    reply.fail(
                        RequestError(
                            "INVALID_REQUEST",
                            f"charge units must be a number from 0 up, got {msg.units!r}",
                        )
                    )
                    return
                try:
                    reservation = self._price(msg.job, msg.user, msg.kind, msg.service, msg.units)
                except RequestError as exc:
                    reply.fail(exc)
                    return
                # Reported after the fact, it cannot be refused: it is booked as it happened,
                # and stops what comes next once the spend reaches a limit.
                usd = await self._record(reservation, msg.units, ok=True, billed=True)
                await self._stop_if_reached()
                reply.set(usd)
            case BudgetQuery(reply=reply):
                reply.set(self._view())
            case SetBudget(daily_usd=daily, monthly_usd=monthly, reply=reply):
                limits = Limits(
                    self._limits.daily_usd if daily is None else daily,
                    self._limits.monthly_usd if monthly is None else monthly,
                )
                # Stored first: a limit that would not hold after a restart is refused.
                if not await self._save_setting(LIMITS_SETTING, msgspec.to_builtins(limits), reply):
                    return
                self._limits = limits
                self._limits_set_by_operator = True
                log.warning("budget limits set by an operator", **msgspec.to_builtins(self._limits))
                await self._limits_changed()
                reply.set(self._view())
            case ResumeBudget(reply=reply):
                if not await self._save_setting(OVERRIDE_SETTING, self._day, reply):
                    return
                self._override_day = self._day
                log.warning(
                    "budget stop overridden by an operator for the rest of the day",
                    day=self._day,
                    spent_today=round(self._spent_day, 6),
                )
                await self._set_stop(BudgetState(stopped=False))
                reply.set(self._view())
            case LedgerReport(period=period, by=by, reply=reply):
                reply.set(await self._report(period, by))
            case Reconfigure(config=config):
                self._config = config
                self._calendar = BudgetCalendar(config.budget.timezone)
                if not self._limits_set_by_operator:
                    self._limits = Limits(config.budget.daily_usd, config.budget.monthly_usd)
                    await self._limits_changed()

    async def _save_setting(self, key: str, value: Any, reply: ReplySlot[Any]) -> bool:
        """Store an operator's setting; a store that takes no writes refuses it."""
        try:
            await self._store.write(partial(jobs.set_setting, key=key, value=value))
        except StoreError as exc:
            reply.fail(exc.refusal())
            return False
        return True

    def _price(
        self, job: int | None, user: str, kind: str, service: str, units: float
    ) -> Reservation:
        spec = self._config.services.get(service)
        if spec is None:
            known = ", ".join(sorted(self._config.services)) or "none"
            raise RequestError("INVALID_REQUEST", f"no service '{service}' (known: {known})")
        return Reservation(
            id=next(self._ids),
            job=job,
            user=user,
            kind=kind,
            service=service,
            units=units,
            usd=spec.price_usd * units,
            price_usd=spec.price_usd,
            failures_billed=spec.failures_billed,
        )

    async def _reserve(self, msg: Reserve) -> None:
        try:
            reservation = self._price(msg.job, msg.user, msg.kind, msg.service, msg.units)
        except RequestError as exc:
            msg.reply.fail(exc)
            return
        if reservation.usd > 0:
            if self._stop.stopped:
                msg.reply.fail(self._refusal())
                return
            over = self._over_limit(reservation.usd)
            if over is not None:
                await self._stop_for(*over)
                msg.reply.fail(self._refusal())
                return
        self._reserved[reservation.id] = reservation
        msg.reply.set(reservation)

    async def _limits_changed(self) -> None:
        """A lowered limit that the spend has reached stops the budget; a stop whose limit is
        no longer reached ends."""
        if await self._stop_if_reached():
            return
        if self._stop.stopped and self._over_limit(0.0) is None:
            await self._set_stop(BudgetState(stopped=False))

    async def _stop_if_reached(self) -> bool:
        """Spend at or past a limit stops the budget, however it got there: a call that used
        more than it reserved, a command's charge, a lowered limit. Only an operator's
        `budget resume` for the day overrides it. Says whether it stopped for that."""
        if self._override_day == self._day:
            return False
        reached = limit_reached(
            self._limits,
            self._calendar,
            spent_day=self._spent_day,
            spent_month=self._spent_month,
            now=self._clock.now(),
        )
        if reached is None:
            return False
        await self._stop_for(*reached)
        return True

    def _over_limit(self, extra: float) -> tuple[str, float] | None:
        """Which limit `extra` more would cross, and when that limit resets; None if none."""
        if self._override_day == self._day:
            return None
        return over_limit(
            self._limits,
            self._calendar,
            spent_day=self._spent_day,
            spent_month=self._spent_month,
            committed=sum(r.usd for r in self._reserved.values()) + extra,
            now=self._clock.now(),
        )

    async def _stop_for(self, which: str, until: float) -> None:
        if self._stop.stopped:
            return
        limit = self._limits.daily_usd if which == "daily" else self._limits.monthly_usd
        reason = f"{which} budget of ${limit:g} reached"
        await self._set_stop(BudgetState(stopped=True, until=until, reason=reason))
        await self._alerts.send(
            RaiseAlert(
                name="budget_stop",
                message=f"emergency stop: {reason}",
                data={"until": until, "spent_today": round(self._spent_day, 6)},
            )
        )

    def _refusal(self) -> BudgetExhausted:
        until = self._stop.until if self._stop.until is not None else math.inf
        return BudgetExhausted(f"budget exhausted: {self._stop.reason}", until)

    async def _set_stop(self, state: BudgetState) -> None:
        if state == self._stop:
            return
        self._stop = state
        if state.stopped:
            log.error("budget emergency stop", reason=state.reason, until=state.until)
        else:
            log.warning("budget stop lifted")
        for listener in self._listeners:
            await listener.send(state)

    async def _record(
        self, reservation: Reservation, units: float, *, ok: bool, billed: bool
    ) -> float:
        """Book a call as it happened; what it cost beyond its reservation is its overrun."""
        usd = reservation.price_usd * units if billed else 0.0
        overrun_usd = max(0.0, usd - reservation.usd)
        # Before the write: a new day's reloaded total must not count this call already.
        await self._roll_over()
        now = self._clock.now()
        entry = (
            reservation.job,
            reservation.user,
            reservation.kind,
            reservation.service,
            units,
            usd,
            int(ok),
            now,
            self._calendar.day(now),
            self._calendar.month(now),
            overrun_usd,
        )
        # The call was made: its cost is booked even while the store takes no writes.
        await self._store.write_or_keep(partial(record_entry, entry=entry))
        self._metrics.spend.labels(reservation.service).inc(usd)
        self._spent_day += usd
        self._spent_month += usd
        if overrun_usd > EPSILON:
            await self._alert_overrun(reservation, units, overrun_usd)
        await self._check_alerts()
        return usd

    async def _alert_overrun(
        self, reservation: Reservation, units: float, overrun_usd: float
    ) -> None:
        service = reservation.service
        await self._alerts.send(
            RaiseAlert(
                name=f"budget_overrun_{service}",
                message=(
                    f"a call to {service} used {units:g} units where {reservation.units:g} "
                    f"were reserved: ${overrun_usd:.4f} past its reservation; raise "
                    f"services.{service}.max_units (or the call's units=) to what one call "
                    "can really use"
                ),
                data={
                    "service": service,
                    "job": reservation.job,
                    "units": units,
                    "reserved_units": reservation.units,
                    "overrun_usd": round(overrun_usd, 6),
                    "spent_today": round(self._spent_day, 6),
                },
            )
        )

    async def _check_alerts(self) -> None:
        fraction = self._fraction()
        for at in sorted(self._config.budget.alert_at):
            if fraction >= at and at not in self._alerted:
                self._alerted.add(at)
                await self._alerts.send(
                    RaiseAlert(
                        name=f"budget_{round(at * 100)}",
                        message=f"daily spend passed {at:.0%} of ${self._limits.daily_usd:g}",
                        data={"spent_today": round(self._spent_day, 6), "fraction": at},
                    )
                )

    def _view(self) -> dict[str, Any]:
        now = self._clock.now()
        reserved = sum(r.usd for r in self._reserved.values())
        daily, monthly = self._limits.daily_usd, self._limits.monthly_usd
        return {
            "day": self._day,
            "month": self._month,
            "daily_usd": daily,
            "monthly_usd": monthly,
            "spent_today": round(self._spent_day, 6),
            "spent_month": round(self._spent_month, 6),
            "reserved": round(reserved, 6),
            "remaining_today": round(daily - self._spent_day, 6) if daily else None,
            "remaining_month": round(monthly - self._spent_month, 6) if monthly else None,
            "stopped": self._stop.stopped,
            "stop_reason": self._stop.reason or None,
            "stopped_until": self._stop.until,
            "override_today": self._override_day == self._day,
            "month_projection_usd": month_projection(self._calendar, self._spent_month, now),
            "alert_at": list(self._config.budget.alert_at),
        }

    async def _report(self, period: str, by: str) -> dict[str, Any]:
        result = await self._store.read(partial(report, period=period, by=by))
        if len(period) == 7:
            now = self._clock.now()
            if period == self._calendar.month(now):
                result["month_projection_usd"] = month_projection(
                    self._calendar, result["usd"], now
                )
        return result
