"""Recurring schedules: the slot math across DST, and the daemon firing each slot once, on
MockClock, through restarts, pauses, triggers and reloads."""

from __future__ import annotations

import itertools
import time
from datetime import datetime
from functools import partial
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
import trio

from jobwarden.actors.messages import ScheduleAction
from jobwarden.actors.schedules import ON_TIME, Slots, check_schedules
from jobwarden.config import load_config_text
from jobwarden.errors import ConfigError, RequestError
from jobwarden.hub import EventHub
from jobwarden.mailbox import ask
from jobwarden.process.supervisor import Reload
from jobwarden.store import Store, jobs, schedules
from jobwarden.wire.views import JobView
from tests.conftest import BASE_CONFIG, EPOCH

BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")
HOUR = 3600.0


def at(zone: ZoneInfo, *fields: int, fold: int = 0) -> float:
    """A local time in `zone` as Unix seconds (fold=1: the second of a repeated hour)."""
    return datetime(*fields, tzinfo=zone, fold=fold).timestamp()  # type: ignore[misc]


def local(moment: float, zone: ZoneInfo) -> str:
    return datetime.fromtimestamp(moment, zone).isoformat()


# -- the slot math ----------------------------------------------------------------------------


def test_slots_follow_the_cron_expression():
    slots = Slots("*/5 * * * *", "UTC")
    assert slots.next_after(EPOCH + 1) == EPOCH + 300
    assert slots.next_after(EPOCH) == EPOCH + 300
    assert list(zip(range(3), slots.after(EPOCH - 1), strict=False)) == [
        (0, EPOCH),
        (1, EPOCH + 300),
        (2, EPOCH + 600),
    ]


# The days clocks change, spring and autumn, on both sides of the Atlantic.
CHANGE_DAYS = [
    pytest.param(BERLIN, (2026, 3, 29), id="berlin-spring"),
    pytest.param(BERLIN, (2026, 10, 25), id="berlin-autumn"),
    pytest.param(NEW_YORK, (2026, 3, 8), id="new-york-spring"),
    pytest.param(NEW_YORK, (2026, 11, 1), id="new-york-autumn"),
]

# A fixed time of day runs once on each day the clocks change: in the hour spring skips at the
# first minute after it, in the hour autumn repeats the first time only.
FIXED_TIME_DAYS = [
    pytest.param(
        "30 2 * * *", BERLIN, (2026, 3, 29), "2026-03-29T03:00:00+02:00", id="berlin-spring"
    ),
    pytest.param(
        "30 2 * * *", BERLIN, (2026, 10, 25), "2026-10-25T02:30:00+02:00", id="berlin-autumn"
    ),
    pytest.param(
        "30 2 * * *", NEW_YORK, (2026, 3, 8), "2026-03-08T03:00:00-04:00", id="new-york-spring"
    ),
    pytest.param(
        "30 1 * * *", NEW_YORK, (2026, 11, 1), "2026-11-01T01:30:00-04:00", id="new-york-autumn"
    ),
]


@pytest.mark.parametrize(("cron", "zone", "day", "expected"), FIXED_TIME_DAYS)
def test_a_fixed_time_has_one_slot_on_a_day_the_clocks_change(cron, zone, day, expected):
    slots = Slots(cron, zone.key)
    start, end = at(zone, *day), at(zone, *day) + 26 * HOUR
    that_day = [
        slot
        for slot in itertools.takewhile(lambda slot: slot < end, slots.after(start))
        if local(slot, zone)[:10] == local(start, zone)[:10]
    ]
    assert [local(slot, zone) for slot in that_day] == [expected]


@pytest.mark.parametrize(("zone", "day"), CHANGE_DAYS)
def test_an_interval_keeps_its_pace_in_real_time_across_a_change(zone, day):
    start = at(zone, *day)
    slots = list(
        itertools.takewhile(
            lambda slot: slot <= start + 6 * HOUR, Slots("*/30 * * * *", zone.key).after(start)
        )
    )
    assert [b - a for a, b in itertools.pairwise(slots)] == [1800.0] * 11
    assert slots[0] == start + 1800


def test_due_on_time_slots_run_whatever_catch_up_says():
    slots = Slots("*/5 * * * *", "UTC")
    for catch_up in ("none", "latest", "all"):
        due = slots.due(after=EPOCH - 1, now=EPOCH + 2, catch_up=catch_up, max_catch_up=10)
        assert due == ([EPOCH], 0)


@pytest.mark.parametrize(
    ("catch_up", "fired", "missed"),
    [
        ("none", [], 12),
        ("latest", [EPOCH + HOUR], 11),
        ("all", [EPOCH + HOUR - 300 * n for n in (3, 2, 1, 0)], 8),
    ],
)
def test_due_after_downtime_follows_catch_up(catch_up, fired, missed):
    # Down from just after EPOCH until two minutes after the slot at EPOCH + 1h.
    due = Slots("*/5 * * * *", "UTC").due(
        after=EPOCH, now=EPOCH + HOUR + 120, catch_up=catch_up, max_catch_up=4
    )
    assert due.fire == fired
    # Counting stops a few slots past what may run: a lower bound, logged as such.
    assert 0 < due.missed <= missed


def test_due_after_a_year_down_costs_only_the_slots_it_may_run():
    slots = Slots("* * * * *", "UTC")
    started = time.perf_counter()
    due = slots.due(after=EPOCH, now=EPOCH + 365 * 86400 + 600, catch_up="all", max_catch_up=5)
    assert time.perf_counter() - started < 0.5
    # The latest five missed, and the two slots of the last minute, which are on time.
    assert due.fire == [EPOCH + 365 * 86400 + 600 - 60 * n for n in (6, 5, 4, 3, 2, 1, 0)]


def test_due_in_the_repeated_hour_finds_the_slot_of_its_first_pass():
    # Down over 02:30 CEST on the day Berlin falls back; up again at 02:15 CET, an hour later
    # in real time but earlier on the wall. The slot at 02:30 CEST was missed, not to come.
    slots = Slots("30 2 * * *", "Europe/Berlin")
    now = at(BERLIN, 2026, 10, 25, 2, 15, fold=1)
    due = slots.due(
        after=at(BERLIN, 2026, 10, 25, 1, 0), now=now, catch_up="latest", max_catch_up=1
    )
    assert [local(slot, BERLIN) for slot in due.fire] == ["2026-10-25T02:30:00+02:00"]
    assert local(slots.next_after(now), BERLIN) == "2026-10-26T02:30:00+01:00"


# -- config -----------------------------------------------------------------------------------

KINDS = """
[kinds.noop]
handler = "tests.handlers:noop"
[kinds.typed]
handler = "tests.handlers:typed"
[kinds.hang]
handler = "tests.handlers:hang"
timeout = "off"
stuck_after = "off"
"""


@pytest.mark.parametrize(
    ("table", "error"),
    [
        ('cron = "*/5 * * *"\nkind = "noop"', "schedules.s.cron: expected five fields"),
        ('cron = "61 * * * *"\nkind = "noop"', 'schedules.s.cron: Bad minute in "61 * * * *"'),
        ('cron = "* * * * *"\nkind = "nope"', "schedules.s.kind: no kind 'nope'"),
        (
            'cron = "* * * * *"\nkind = "noop"\ntimezone = "Mars/Olympus"',
            'schedules.s.timezone: unknown time zone "Mars/Olympus"',
        ),
        (
            'cron = "* * * * *"\nkind = "noop"\ncatch_up = "some"',
            "schedules.s.catch_up: expected one of none, latest, all",
        ),
        ('cron = "* * * * *"\nkind = "noop"\nevery = "1m"', "schedules.s.every: unknown key"),
        ('kind = "noop"', "schedules.s: Object missing required field `cron`"),
        (
            'cron = "* * * * *"\nkind = "noop"\ncatch_up = "all"',
            'schedules.s.catch_up: "all" runs the missed slots together',
        ),
    ],
)
def test_a_bad_schedule_fails_naming_the_schedule_and_key(table, error):
    with pytest.raises(ConfigError) as raised:
        load_config_text(KINDS + "[schedules.s]\n" + table)
    assert error in str(raised.value)


def test_a_payload_the_kind_refuses_fails_naming_the_schedule():
    config = load_config_text(
        KINDS + '[schedules.s]\ncron = "* * * * *"\nkind = "typed"\npayload = {n = "three"}'
    )
    with pytest.raises(ConfigError, match=r"schedules\.s\.payload: .*payload\.n"):
        check_schedules(config)


# -- the daemon -------------------------------------------------------------------------------

QUIET = """
[monitor]
interval = "1h"
queued_timeout = "off"
"""


def schedule_table(name: str, cron: str, kind: str = "noop", **keys: object) -> str:
    lines = [f"[schedules.{name}]", f'cron = "{cron}"', f'kind = "{kind}"']
    lines += [
        f'{key} = "{value}"' if isinstance(value, str) else f"{key} = {value}"
        for key, value in keys.items()
    ]
    return "\n".join(lines) + "\n"


async def runs_of(daemon, schedule: str) -> list[JobView]:
    listed = await daemon.handle.store.read(
        partial(jobs.list_jobs, statuses=None, kind=None, user=None, limit=10_000)
    )
    return sorted((job for job in listed if job.schedule == schedule), key=lambda job: job.id)


def slots_counted(daemon, schedule: str, outcome: str) -> float | None:
    return daemon.handle.metrics.registry.get_sample_value(
        "jobwarden_schedule_slots_total", {"schedule": schedule, "outcome": outcome}
    )


async def operator(daemon, action: str, name: str | None = None):
    return await ask(daemon.handle.admission, ScheduleAction, action=action, name=name)


@pytest.mark.parametrize(("cron", "zone", "day", "expected"), FIXED_TIME_DAYS)
async def test_the_daemon_runs_a_fixed_time_once_on_a_day_the_clocks_change(
    autojump_clock, start_daemon, cron, zone, day, expected
):
    midnight = at(zone, *day)
    daemon = await start_daemon(
        KINDS + QUIET + schedule_table("nightly", cron, timezone=zone.key), clock_epoch=midnight
    )
    await trio.sleep(5 * HOUR)
    runs = await runs_of(daemon, "nightly")
    assert [local(job.created_at, zone) for job in runs] == [expected]
    assert runs[0].user == "schedules"
    assert (await daemon.wait_done(runs[0].id)).status == "done"


@pytest.mark.parametrize(("zone", "day"), CHANGE_DAYS)
async def test_the_daemon_keeps_an_intervals_pace_across_a_change(
    autojump_clock, start_daemon, zone, day
):
    midnight = at(zone, *day)
    daemon = await start_daemon(
        KINDS + QUIET + schedule_table("half-hourly", "*/30 * * * *", timezone=zone.key),
        clock_epoch=midnight,
    )
    await trio.sleep(6 * HOUR + 1)
    created = [job.created_at for job in await runs_of(daemon, "half-hourly")]
    assert created == [midnight + 1800 * n for n in range(1, 13)]


async def test_overlap_skip_skips_a_slot_while_the_previous_run_is_active(
    autojump_clock, start_daemon
):
    daemon = await start_daemon(KINDS + QUIET + schedule_table("hourly", "0 * * * *", "hang"))
    await trio.sleep(3 * HOUR + 1)
    runs = await runs_of(daemon, "hourly")
    assert [job.status for job in runs] == ["running"]
    [listed] = await operator(daemon, "list")
    assert listed["last"].job is None
    assert (
        listed["last"].skipped == f"CONFLICT: its previous run, job {runs[0].id}, is still running"
    )
    assert listed["next"] == EPOCH + 4 * HOUR
    assert slots_counted(daemon, "hourly", "fired") == 1
    assert slots_counted(daemon, "hourly", "skipped") == 2
    assert slots_counted(daemon, "hourly", "missed") == 0


async def test_overlap_queue_runs_every_slot(autojump_clock, start_daemon):
    daemon = await start_daemon(
        KINDS + QUIET + schedule_table("hourly", "0 * * * *", "hang", overlap="queue"),
        max_concurrent_jobs=2,
    )
    await trio.sleep(3 * HOUR + 1)
    runs = await runs_of(daemon, "hourly")
    assert [job.status for job in runs] == ["running", "running", "queued"]


@pytest.mark.parametrize(("catch_up", "expected"), [("none", 0), ("latest", 1), ("all", 4)])
async def test_catch_up_after_downtime(autojump_clock, start_daemon, catch_up, expected):
    table = (
        KINDS
        + QUIET
        + schedule_table("five", "*/5 * * * *", catch_up=catch_up, max_catch_up=4, overlap="queue")
    )
    daemon = await start_daemon(table, clock_epoch=EPOCH + 10)
    await trio.sleep(350)
    assert len(await runs_of(daemon, "five")) == 1
    await daemon.stop()
    # Back an hour later, two minutes past a slot: every slot since is missed.
    daemon = await start_daemon(table, clock_epoch=EPOCH + HOUR + 120)
    await trio.sleep(1)
    runs = await runs_of(daemon, "five")
    assert len(runs) == 1 + expected
    assert slots_counted(daemon, "five", "missed") >= 1
    [listed] = await operator(daemon, "list")
    if expected:
        assert listed["last"].slot == EPOCH + HOUR
    assert listed["next"] == EPOCH + HOUR + 300


async def test_a_restart_within_a_slots_minute_does_not_fire_it_again(autojump_clock, start_daemon):
    table = KINDS + QUIET + schedule_table("five", "*/5 * * * *")
    daemon = await start_daemon(table, clock_epoch=EPOCH - 10)
    await trio.sleep(15)
    assert len(await runs_of(daemon, "five")) == 1
    await daemon.stop()
    daemon = await start_daemon(table, clock_epoch=EPOCH + 30)
    await trio.sleep(ON_TIME)
    assert len(await runs_of(daemon, "five")) == 1


async def test_pause_holds_across_a_restart_and_resume_does_not_catch_up(
    autojump_clock, start_daemon
):
    table = KINDS + QUIET + schedule_table("five", "*/5 * * * *", catch_up="all", overlap="queue")
    daemon = await start_daemon(table, clock_epoch=EPOCH + 10)
    paused = await operator(daemon, "pause", "five")
    assert paused["state"] == "paused" and paused["next"] is None
    await trio.sleep(HOUR)
    await daemon.stop()
    daemon = await start_daemon(table, clock_epoch=EPOCH + 2 * HOUR + 10)
    await trio.sleep(HOUR)
    assert await runs_of(daemon, "five") == []
    resumed = await operator(daemon, "resume", "five")
    assert resumed["state"] == "active"
    assert resumed["next"] == EPOCH + 3 * HOUR + 300
    await trio.sleep(300)
    assert [job.created_at for job in await runs_of(daemon, "five")] == [EPOCH + 3 * HOUR + 300]


async def test_trigger_runs_once_now_and_respects_overlap_skip(autojump_clock, start_daemon):
    daemon = await start_daemon(KINDS + QUIET + schedule_table("daily", "0 3 * * *", "hang"))
    job = await operator(daemon, "trigger", "daily")
    assert job.schedule == "daily" and job.user == "schedules"
    await daemon.wait_status(job.id, {"running"})
    with pytest.raises(RequestError) as refused:
        await operator(daemon, "trigger", "daily")
    assert refused.value.body.code == "CONFLICT"
    assert f"job {job.id}, is still running" in refused.value.body.message
    with pytest.raises(RequestError) as unknown:
        await operator(daemon, "trigger", "weekly")
    assert unknown.value.body.code == "NOT_FOUND"
    [listed] = await operator(daemon, "list")
    assert listed["last"].slot is None and listed["last"].job == job.id


async def test_a_scheduled_run_is_refused_like_a_submission_and_says_why(
    autojump_clock, start_daemon
):
    limits = '[limits]\nmax_queued = 1\nrate = "off"\ncredits = "unlimited"\n'
    daemon = await start_daemon(
        KINDS + QUIET + limits + schedule_table("hourly", "0 * * * *", overlap="queue"),
        max_concurrent_jobs=1,
    )
    blocker = await daemon.submit("hang")
    await daemon.wait_status(blocker.id, {"running"})
    await daemon.submit("hang")
    await trio.sleep(HOUR + 1)
    assert await runs_of(daemon, "hourly") == []
    [listed] = await operator(daemon, "list")
    assert listed["last"].skipped.startswith("QUEUE_FULL: ")


def write_config(path: Path, extra: str) -> Path:
    path.write_text(BASE_CONFIG.format(max_concurrent_jobs=2) + KINDS + QUIET + extra)
    return path


async def test_reload_adds_changes_and_removes_schedules(autojump_clock, start_daemon, tmp_path):
    config_path = write_config(tmp_path / "config.toml", schedule_table("a", "0 * * * *"))
    daemon = await start_daemon(config_path=config_path)
    await trio.sleep(HOUR + 1)
    assert len(await runs_of(daemon, "a")) == 1

    write_config(config_path, schedule_table("b", "*/30 * * * *"))
    await daemon.handle.control.send(Reload())
    await trio.sleep(HOUR)
    assert len(await runs_of(daemon, "a")) == 1
    assert len(await runs_of(daemon, "b")) == 2
    assert [listed["name"] for listed in await operator(daemon, "list")] == ["b"]

    write_config(config_path, schedule_table("b", "not a cron"))
    await daemon.handle.control.send(Reload())
    await trio.sleep(HOUR)
    # The bad file was refused: b runs on as it was.
    assert len(await runs_of(daemon, "b")) == 4

    write_config(config_path, schedule_table("b", "0 */2 * * *"))
    await daemon.handle.control.send(Reload())
    await trio.sleep(2 * HOUR)
    assert len(await runs_of(daemon, "b")) == 5


async def test_of_two_daemons_on_one_database_the_first_to_insert_fires_the_slot(tmp_path):
    path = tmp_path / "jw.db"
    new = jobs.NewJob(
        kind="noop",
        user="schedules",
        payload_json="{}",
        priority=0,
        idempotency_key=None,
        max_attempts=1,
        schedule="s",
    )
    fire = partial(
        schedules.fire,
        schedule="s",
        slot=EPOCH,
        new=new,
        skip_if_active=False,
        quota=jobs.NO_QUOTA,
        now=EPOCH + 1,
    )
    results = []

    async def fire_from(store: Store) -> None:
        results.append(await store.write(fire))

    async with (
        Store.open(path, hub=EventHub()) as first,
        Store.open(path, hub=EventHub()) as second,
    ):
        await first.write(partial(schedules.sync, specs={"s": "* * * * * UTC"}, now=0.0))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fire_from, first)
            nursery.start_soon(fire_from, second)
        listed = await first.read(
            partial(jobs.list_jobs, statuses=None, kind=None, user=None, limit=10)
        )
    assert sorted(type(result).__name__ for result in results) == ["Admitted", "NoneType"]
    assert [job.schedule for job in listed] == ["s"]


async def test_a_slot_the_store_refused_fires_once_it_takes_writes_again(
    autojump_clock, start_daemon
):
    daemon = await start_daemon(
        KINDS + QUIET + schedule_table("five", "*/5 * * * *"), clock_epoch=EPOCH + 10
    )
    # Between the node's lease renewals (every 10 s from EPOCH + 10): the first write the
    # read-only file refuses is at the slot, EPOCH + 300, not a renewal's before it.
    await trio.sleep(285)
    # A read-only database file, until the store's probe opens it again (see test_store_health).
    daemon.handle.store._writer.execute("PRAGMA query_only = 1")
    await trio.sleep(50)
    assert daemon.handle.store.health.fault is None
    runs = await runs_of(daemon, "five")
    assert len(runs) == 1
    assert EPOCH + 300 < runs[0].created_at <= EPOCH + 300 + 10
