"""Ledger: what every external call costs, and the hard budget that spending never crosses.

Consumes `Reserve`/`Settle`/`Release` from ctx.call, `Charge` from command kinds,
`BudgetQuery`/`SetBudget`/`ResumeBudget`/`LedgerReport` from the admin socket, `Reconfigure`.
Produces `BudgetState` for admission and the scheduler, and alerts for the monitor.

A call first reserves its worst case: its declared most units (the service's `max_units`,
or the call's own `units=`) at the service's price. The reservation is refused when the day's
(or month's) spend plus every open reservation plus this one would pass the limit. The store
decides it, for every daemon on the database: in one transaction that locks the day's and the
month's spend rows, reads the limits as stored (`budget set`, `budget resume`), sums the open
reservations and inserts this one (`reserve_within_budget`). So however many jobs call at once
on however many daemons, their reservations together never pass the limit, and neither does
spend while each call stays within what it reserved. A reservation is held under a lease this
daemon renews; if it dies mid-call, its reservations stop counting when the lease runs out.

A refusal is the emergency stop: admission answers BUDGET_EXHAUSTED, the scheduler holds
dispatch, and the job whose call was refused goes back to the queue to wait, its checkpoint
kept. The stop lifts at the next budget day (midnight in `budget.timezone`), when an operator
raises the limit, or on `budget resume`; on this daemon at once, on the others when they next
read the stored limits (every `STOPPED_RECHECK` while they are stopped).

Settling writes one ledger row per call, with the units actually used; a failed call costs
nothing unless the service bills failures. A call that used more than it reserved is booked
as it happened, its excess in the row's `overrun_usd`, and raises an alert naming the service.
A command kind's `charge` line is booked after the fact the same way. Whenever what was booked
reaches or passes a limit (and when the ledger starts, or a limit is lowered, with spend
already there) the budget stops at once. Budget days, the limit checks and the month's
projection are plain code in actors/budget.py.
"""

from __future__ import annotations

import math
import uuid
from functools import partial
from typing import Any, NamedTuple

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
from jobwarden.store import ledger as rows
from jobwarden.store.rows import Events

log = structlog.get_logger("ledger")

LIMITS_SETTING = "budget_limits"
OVERRIDE_SETTING = "budget_override_day"
# A reservation's lease, renewed every third of it while this daemon lives: a daemon that dies
# mid-call holds its reservations this long at most.
RESERVATION_LEASE = 60.0
# While the budget is stopped, how often the limits an operator may have changed on another
# daemon (`budget set`, `budget resume`) are read again.
STOPPED_RECHECK = 10.0


class Reserved(NamedTuple):
    """A reservation the store granted: its row, and the spend it saw (every daemon's)."""

    id: int
    spent_day: float
    spent_month: float


class OverBudget(NamedTuple):
    """A reservation the store refused: the limit it would pass, when that limit resets."""

    which: str
    until: float
    spent_day: float
    spent_month: float


def stored_limits(conn: Any, default: Limits) -> tuple[Limits, bool, str | None]:
    """The limits in force for every daemon: an operator's (`budget set`, and True) or the
    config's; and the day an operator's `budget resume` overrides them for."""
    stored = jobs.get_setting(conn, LIMITS_SETTING)
    limits = default if stored is None else msgspec.convert(stored, Limits)
    return limits, stored is not None, jobs.get_setting(conn, OVERRIDE_SETTING)


def reserve_within_budget(
    conn: Any,
    events: Events,
    *,
    reservation: Reservation,
    holder: str,
    calendar: BudgetCalendar,
    default_limits: Limits,
    now: float,
) -> Reserved | OverBudget:
    """Run in the store's transaction, with the day's and month's spend rows locked: the
    reservation is inserted unless the spend, every open reservation and it would pass a
    limit as stored now (an operator's override for the day lifts them)."""
    day, month = calendar.day(now), calendar.month(now)
    spent_day, spent_month = rows.lock_spend(conn, day=day, month=month)
    limits, _, override_day = stored_limits(conn, default_limits)
    if override_day != day:
        over = over_limit(
            limits,
            calendar,
            spent_day=spent_day,
            spent_month=spent_month,
            committed=rows.reserved(conn, now=now) + reservation.usd,
            now=now,
        )
        if over is not None:
            return OverBudget(*over, spent_day, spent_month)
    reservation_id = rows.add_reservation(
        conn,
        holder=holder,
        job_id=reservation.job,
        service=reservation.service,
        usd=reservation.usd,
        now=now,
        expires_at=now + RESERVATION_LEASE,
    )
    return Reserved(reservation_id, spent_day, spent_month)


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
        # Names this daemon's reservations in the store, for their lease.
        self._holder = uuid.uuid4().hex
        # This daemon's open reservations, whose lease it renews.
        self._held: set[int] = set()
        self._renew_at = math.inf
        self._recheck_at = math.inf
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
        self._limits, self._limits_set_by_operator, self._override_day = await self._store.read(
            partial(stored_limits, default=self._limits)
        )
        await self._roll_over()
        async with self._inbox, self._alerts, trio.open_nursery() as nursery:
            task_status.started()
            while True:
                boundary = min(
                    self._clock.deadline_for(self._calendar.next_day(self._clock.now())),
                    self._renew_at,
                    self._recheck_at,
                )
                try:
                    msg = await receive_by(self._inbox, boundary)
                except trio.EndOfChannel:
                    break
                if msg is None:
                    await self._on_time()
                elif isinstance(msg, Reserve):
                    # Reservations are store writes: taken side by side, they share commits.
                    nursery.start_soon(self._reserve, msg)
                else:
                    await self._handle(msg)
            nursery.cancel_scope.cancel()
        for listener in self._listeners:
            await listener.aclose()

    async def _on_time(self) -> None:
        """A new budget day, a lease to renew, or (stopped) the stored limits to read again."""
        await self._roll_over()
        now = trio.current_time()
        if now >= self._renew_at:
            self._renew_at = now + RESERVATION_LEASE / 3 if self._held else math.inf
            if self._held:
                expires_at = self._clock.now() + RESERVATION_LEASE
                # A store that takes no writes meanwhile lets the leases run: what they hold
                # stops counting, which a call booked later then passes at most by its cost.
                await self._store.write_or_keep(
                    partial(rows.renew, holder=self._holder, expires_at=expires_at),
                    key=("renew", self._holder),
                )
        if now >= self._recheck_at:
            self._recheck_at = math.inf
            await self._follow_operators()

    async def _follow_operators(self) -> None:
        """Take up what an operator changed on any daemon: stored limits, or an override."""
        limits, by_operator, override_day = await self._store.read(
            partial(stored_limits, default=self._limits)
        )
        if by_operator and limits != self._limits:
            self._limits, self._limits_set_by_operator = limits, True
            await self._limits_changed()
        if override_day == self._day and self._override_day != override_day:
            self._override_day = override_day
            await self._set_stop(BudgetState(stopped=False))
        if self._stop.stopped:
            self._recheck_at = trio.current_time() + STOPPED_RECHECK

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
            partial(rows.spent, day=day, month=month)
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
                self._held.discard(reservation.id)  # type: ignore[arg-type]
                billed = ok or reservation.failures_billed
                usd = await self._record(reservation, units, ok=ok, billed=billed)
                await self._stop_if_reached()
                reply.set(usd)
            case Release(reservation=reservation):
                if reservation.id is not None:
                    self._held.discard(reservation.id)
                    await self._store.write_or_keep(
                        partial(rows.release, reservation_id=reservation.id)
                    )
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
                # Other daemons may have booked meanwhile; spend they took to a limit stops
                # this one's budget too.
                self._spent_day, self._spent_month = await self._store.read(
                    partial(rows.spent, day=self._day, month=self._month)
                )
                await self._stop_if_reached()
                reply.set(await self._view())
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
                reply.set(await self._view())
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
                reply.set(await self._view())
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
            id=None,
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
        if reservation.usd <= 0:
            msg.reply.set(reservation)  # a free call holds nothing
            return
        if self._stop.stopped:
            msg.reply.fail(self._refusal())
            return
        now = self._clock.now()
        try:
            decided = await self._store.write(
                partial(
                    reserve_within_budget,
                    reservation=reservation,
                    holder=self._holder,
                    calendar=self._calendar,
                    default_limits=Limits(
                        self._config.budget.daily_usd, self._config.budget.monthly_usd
                    ),
                    now=now,
                )
            )
        except StoreError as exc:
            # Unchecked, the call is not made: its job waits for budget, attempt not spent.
            msg.reply.fail(
                BudgetExhausted(
                    f"the budget cannot be checked: {exc}",
                    now + self._store.health.retry_after(),
                )
            )
            return
        if self._day == self._calendar.day(now):
            # Every daemon's spend, as the store saw it: for the alerts and the view.
            self._spent_day, self._spent_month = decided.spent_day, decided.spent_month
        if isinstance(decided, OverBudget):
            await self._stop_for(decided.which, decided.until)
            msg.reply.fail(self._refusal())
            return
        if not self._held:
            self._renew_at = trio.current_time() + RESERVATION_LEASE / 3
        self._held.add(decided.id)
        msg.reply.set(msgspec.structs.replace(reservation, id=decided.id))

    async def _limits_changed(self) -> None:
        """A lowered limit that the spend has reached stops the budget; a stop whose limit is
        no longer reached ends."""
        if await self._stop_if_reached():
            return
        if self._stop.stopped and await self._over_limit(0.0) is None:
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

    async def _over_limit(self, extra: float) -> tuple[str, float] | None:
        """Which limit `extra` more than the spend and every open reservation would cross,
        and when that limit resets; None if none."""
        if self._override_day == self._day:
            return None
        reserved = await self._store.read(partial(rows.reserved, now=self._clock.now()))
        return over_limit(
            self._limits,
            self._calendar,
            spent_day=self._spent_day,
            spent_month=self._spent_month,
            committed=reserved + extra,
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
            # An operator on another daemon may lift it: the stored limits are read again.
            self._recheck_at = trio.current_time() + STOPPED_RECHECK
        else:
            log.warning("budget stop lifted")
            self._recheck_at = math.inf
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
        book = partial(rows.book, entry=entry, reservation_id=reservation.id)
        try:
            # The totals it answers count every daemon's bookings.
            self._spent_day, self._spent_month = await self._store.write(book)
        except StoreError:
            # The call was made: its cost is booked when the store takes writes again.
            self._store.hand_over(book, keep=True)
            self._spent_day += usd
            self._spent_month += usd
        self._metrics.spend.labels(reservation.service).inc(usd)
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

    async def _view(self) -> dict[str, Any]:
        now = self._clock.now()
        # Every daemon's open reservations, as stored now.
        reserved = await self._store.read(partial(rows.reserved, now=now))
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
        result = await self._store.read(partial(rows.report, period=period, by=by))
        if len(period) == 7:
            now = self._clock.now()
            if period == self._calendar.month(now):
                result["month_projection_usd"] = month_projection(
                    self._calendar, result["usd"], now
                )
        return result
