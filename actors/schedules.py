"""Recurring schedules: their slots, and the loop that fires them.

A schedule's slots are the moments its cron expression names in its time zone, computed by
cronsim, which follows Debian cron across daylight saving time: a job at a fixed time (minute
and hour both fixed, `30 2 * * *`) runs once a day whatever the clocks do: in the hour that
spring skips, at the first minute after it (03:00); in the hour that autumn repeats, the first
time only. A job with a wildcard or step in its minute or hour (`*/15 * * * *`, `0 * * * *`)
keeps its interval in real time, so the repeated hour has its runs too, and the skipped hour
none. A slot is a moment (Unix seconds), and it fires at most once (see store/schedules.py).

The loop is a task of admission, not a seventh actor: a schedule's run is a submission that
the daemon makes itself, so it passes admission's guards (all but the user's rate limit: no
client asks) and its insert, and admission already hears of every reload and of the drain.
It sleeps on trio's clock until the earliest next slot, a reload, a pause, resume or trigger.

A slot up to ON_TIME late is on time (a restart, a busy moment); older ones were missed while
the daemon was down, and the schedule's `catch_up` decides which of those run.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Iterator
from datetime import datetime
from functools import partial
from typing import Any, NamedTuple
from zoneinfo import ZoneInfo

import msgspec
import structlog
import trio
from cronsim import CronSim

from jobwarden.actors.handlers import validate_payload
from jobwarden.clock import WallClock
from jobwarden.config import Config, ScheduleSection
from jobwarden.errors import ConfigError, RequestError, StoreError
from jobwarden.metrics import Metrics
from jobwarden.store import Engine, schedules
from jobwarden.store.jobs import Admitted, Refused
from jobwarden.wire.views import JobView

log = structlog.get_logger("schedules")

# A slot this late is still on time; an older one was missed, and catch_up decides.
ON_TIME = 60.0
# After a store fault refused a slot's write, the slot is tried again this soon.
RETRY_AFTER = 5.0


class Due(NamedTuple):
    """What a schedule does now: the slots to fire, oldest first, and how many missed slots
    it lets go (at least that many: a long downtime is not counted to the end)."""

    fire: list[float]
    missed: int


class Slots:
    """One cron expression in one time zone."""

    def __init__(self, cron: str, timezone: str) -> None:
        self.cron = cron
        self.zone = ZoneInfo(timezone)

    def after(self, moment: float) -> Iterator[float]:
        """The slots after `moment`, in order. cronsim starts a fixed-time expression from the
        local time without its fold, so on the day clocks fall back it may begin with a slot
        already past: that is left out."""
        last = moment
        for found in CronSim(self.cron, datetime.fromtimestamp(moment, self.zone)):
            slot = found.timestamp()
            if slot > last:
                last = slot
                yield slot

    def next_after(self, moment: float) -> float | None:
        """The first slot after `moment` (None: there is none within fifty years)."""
        return next(self.after(moment), None)

    def due(self, *, after: float, now: float, catch_up: str, max_catch_up: int) -> Due:
        """The slots in (after, now] to fire now under `catch_up`: on-time slots always; of
        the missed ones, none, the latest (unless an on-time slot runs anyway), or each, up
        to the latest `max_catch_up`."""
        if now <= after:
            return Due([], 0)
        # Where to start walking forward: at most `back` slots before now, found walking
        # backwards, so a downtime of months costs no more than the slots it may run. The
        # walk forward decides, being exact where the backward one is not (the repeated hour).
        back = (max_catch_up if catch_up == "all" else 1) + 3
        start, cut = after, False
        newest = datetime.fromtimestamp(math.floor(now) + 1, self.zone)
        for count, found in enumerate(CronSim(self.cron, newest, reverse=True)):
            if found.timestamp() <= after:
                break
            if count == back:
                start, cut = found.timestamp(), True
                break
        slots = []
        for slot in self.after(start):
            if slot > now:
                break
            slots.append(slot)
        on_time = [slot for slot in slots if now - slot <= ON_TIME]
        missed = [slot for slot in slots if now - slot > ON_TIME]
        if catch_up == "all":
            fire = missed[-max_catch_up:] + on_time
        elif catch_up == "latest" and not on_time:
            fire = missed[-1:]
        else:
            fire = on_time
        return Due(fire, len(slots) - len(fire) + cut)


def spec_of(schedule: ScheduleSection) -> str:
    """What a schedule's slots follow, as the store keeps it: a change starts it afresh."""
    return f"{schedule.cron} {schedule.timezone}"


def check_schedules(config: Config) -> None:
    """What the config alone cannot check: each schedule's payload against its kind (a
    python kind's payload Struct, a command kind's fields), and its size. Raises ConfigError
    naming the schedule; run at start-up, at reload and by check-config."""
    for name, schedule in config.schedules.items():
        kind = config.kinds[schedule.kind]
        try:
            validate_payload(kind, schedule.payload)
        except ValueError as exc:
            raise ConfigError(f"schedules.{name}.payload: {exc}") from None
        size = len(msgspec.json.encode(schedule.payload))
        limit = config.admission.max_payload_bytes
        if size > limit:
            raise ConfigError(
                f"schedules.{name}.payload: {size} bytes, over admission.max_payload_bytes "
                f"({limit})"
            )


# Fires one slot of a schedule (None: a trigger); see store.schedules.fire for the answers.
Fire = Callable[[str, float | None], Awaitable[Admitted | Refused | None]]


class Schedules:
    """The configured schedules: when each fires next, firing them, and the operator's
    pause, resume, trigger and listing. `fire` is admission's: guards, then the store."""

    def __init__(
        self, *, config: Config, store: Engine, clock: WallClock, metrics: Metrics, fire: Fire
    ) -> None:
        self._config = config
        self._store = store
        self._clock = clock
        self._metrics = metrics
        self._fire = fire
        self._slots: dict[str, Slots] = {}
        # Slots up to this moment are decided, per schedule.
        self._after: dict[str, float] = {}
        self._paused: set[str] = set()
        # Reload, pause, resume: the loop looks again.
        self._wake = trio.Event()
        self._synced = False
        self._stopped = False
        # A store fault refused a write: slots are tried again every RETRY_AFTER meanwhile.
        self._waiting_for_store = False

    def reconfigure(self, config: Config) -> None:
        self._config = config
        self._synced = False
        self._wake.set()

    def stop(self) -> None:
        """The daemon drains: no slot fires from now on. The slots it does not reach are a
        later start's to catch up."""
        self._stopped = True
        self._wake.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        announced = False
        while not self._stopped:
            wake_at = await self._round()
            if self._synced and not announced:
                # Each due slot of the start is decided by now: fired, skipped or found fired.
                log.info(
                    "schedules running",
                    schedules=len(self._config.schedules),
                    paused=len(self._paused),
                )
                announced = True
            self._wake = trio.Event()
            with trio.move_on_at(self._clock.deadline_for(wake_at)):
                await self._wake.wait()

    async def _round(self) -> float:
        """Fire what is due; the wall time to look again at."""
        now = self._clock.now()
        if not self._synced:
            try:
                await self._sync(now)
            except StoreError as exc:
                self._store_refused(exc)
                return now + RETRY_AFTER
        wake_at = math.inf
        for name, schedule in self._config.schedules.items():
            if self._stopped:
                return math.inf
            if name not in self._paused:
                retry = await self._fire_due(name, schedule, now)
                if retry:
                    wake_at = min(wake_at, now + RETRY_AFTER)
                    continue
            upcoming = self._next(name)
            if upcoming is not None:
                wake_at = min(wake_at, upcoming)
        return wake_at

    async def _sync(self, now: float) -> None:
        schedules_now = self._config.schedules
        specs = {name: spec_of(schedule) for name, schedule in schedules_now.items()}
        states = await self._store.write(partial(schedules.sync, specs=specs, now=now))
        self._slots = {
            name: Slots(schedule.cron, schedule.timezone)
            for name, schedule in schedules_now.items()
        }
        self._after = {name: self._taken_up_at(states[name]) for name in schedules_now}
        self._paused = {name for name, state in states.items() if state.paused}
        self._synced = True
        self._waiting_for_store = False

    def _taken_up_at(self, state: schedules.ScheduleState) -> float:
        """Where a schedule's slots are taken up: after its latest decided slot, and never
        before it started (or was changed or resumed)."""
        after = max(state.since, self._after.get(state.name, -math.inf))
        return after if state.last_slot is None else max(after, state.last_slot)

    async def _fire_due(self, name: str, schedule: ScheduleSection, now: float) -> bool:
        """Fire the due slots of one schedule; True: the store took no writes, try again."""
        due = self._slots[name].due(
            after=self._after[name],
            now=now,
            catch_up=schedule.catch_up,
            max_catch_up=schedule.max_catch_up,
        )
        if due.missed and not self._waiting_for_store:
            log.warning(
                "schedule slots missed and not run",
                schedule=name,
                at_least=due.missed,
                catch_up=schedule.catch_up,
            )
            self._metrics.schedule_slots.labels(name, "missed").inc(due.missed)
        for slot in due.fire:
            try:
                result = await self._fire(name, slot)
            except StoreError as exc:
                self._store_refused(exc)
                return True
            except Exception as exc:
                # Not the disk's fault, so trying again would fail again: the slot is let go.
                log.error("schedule slot failed", schedule=name, slot=slot, error=str(exc))
                result = None
            self._after[name] = slot
            self._waiting_for_store = False
            self._count(name, slot, result)
        self._after[name] = now
        return False

    def _count(self, name: str, slot: float, result: Admitted | Refused | None) -> None:
        match result:
            case Admitted(job=job):
                self._metrics.schedule_slots.labels(name, "fired").inc()
                log.info("schedule fired", schedule=name, slot=slot, job=job.id)
            case Refused(code=code, message=message):
                self._metrics.schedule_slots.labels(name, "skipped").inc()
                log.info("schedule slot skipped", schedule=name, slot=slot, code=code, why=message)
            case None:
                # Another daemon, or this one before a restart, decided it; or it is paused
                # there: that daemon counted it.
                pass

    def _store_refused(self, exc: StoreError) -> None:
        """Said once, not at every try: the store's own fault is logged and alerted on."""
        if not self._waiting_for_store:
            log.warning("schedules wait for the store to take writes", error=str(exc))
        self._waiting_for_store = True

    def _next(self, name: str) -> float | None:
        if name in self._paused or self._stopped:
            return None
        return self._slots[name].next_after(self._after[name])

    # -- the operator's -----------------------------------------------------------------------

    def _schedule(self, name: str) -> ScheduleSection:
        schedule = self._config.schedules.get(name)
        if schedule is None:
            known = ", ".join(sorted(self._config.schedules)) or "none"
            raise RequestError("NOT_FOUND", f"no schedule '{name}' (configured: {known})")
        return schedule

    async def pause(self, name: str, *, paused: bool) -> dict[str, Any]:
        """Pause or resume a schedule, in the store: it holds across restarts and daemons."""
        self._schedule(name)
        now = self._clock.now()
        if not self._synced:
            await self._sync(now)
        state = await self._store.write(
            partial(schedules.set_paused, name=name, paused=paused, now=now)
        )
        assert state is not None, "a configured schedule is in the store once synced"
        if state.paused:
            self._paused.add(name)
        else:
            self._paused.discard(name)
            self._after[name] = max(self._after[name], state.since)
        self._wake.set()
        log.info("schedule paused" if paused else "schedule resumed", schedule=name)
        return (await self.overview([name]))[0]

    async def trigger(self, name: str) -> JobView:
        """One run now, outside the slots (a paused schedule too); refused as a submission
        would be, and CONFLICT while the previous run is active under overlap = "skip"."""
        self._schedule(name)
        if self._stopped:
            raise RequestError("DRAINING", "the daemon is shutting down and accepts no new jobs")
        result = await self._fire(name, None)
        if isinstance(result, Refused):
            raise RequestError(
                result.code, f"schedule '{name}': {result.message}", retry_after=result.retry_after
            )
        assert isinstance(result, Admitted), "a trigger is always decided"
        self._metrics.schedule_slots.labels(name, "fired").inc()
        log.info("schedule triggered", schedule=name, job=result.job.id)
        return result.job

    async def overview(self, names: list[str] | None = None) -> list[dict[str, Any]]:
        """Each configured schedule (or those named) with its state, next and latest run."""
        chosen = sorted(self._config.schedules) if names is None else names
        states, runs = await self._store.read(partial(schedules.overview, names=chosen))
        listed = []
        for name in chosen:
            schedule = self._config.schedules[name]
            state = states.get(name)
            paused = name in self._paused if state is None else state.paused
            upcoming = None
            if not paused and not self._stopped and name in self._slots:
                since = -math.inf if state is None else state.since
                upcoming = self._slots[name].next_after(
                    max(self._after.get(name, since), since, self._clock.now())
                )
            listed.append(
                {
                    "name": name,
                    "cron": schedule.cron,
                    "timezone": schedule.timezone,
                    "kind": schedule.kind,
                    "user": schedule.user,
                    "overlap": schedule.overlap,
                    "catch_up": schedule.catch_up,
                    "state": "paused" if paused else "active",
                    "next": upcoming,
                    "last": runs.get(name),
                }
            )
        return listed
