"""Guards that hold for every daemon on one database, not per daemon.

Two whole daemons run in this process on one database, each with its own store, its own
actors and its own admin socket: what one decides, the other must see in the rows when it
decides. On SQLite the two share one file (WAL), which a daemon would normally refuse (it
locks the file); the fixture lifts that lock, and keeps both started before any job exists,
so neither recovers the other's running jobs at its start. With JOBWARDEN_TEST_POSTGRES set
they run on PostgreSQL too (the module is marked `both_stores`), both daemons in one schema.
"""

from __future__ import annotations

import itertools
import os
from functools import partial
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio

from jobwarden.actors.bucket import TokenBucket
from jobwarden.actors.budget import BudgetCalendar, Limits
from jobwarden.actors.ledger import STOPPED_RECHECK, OverBudget, Reserved, reserve_within_budget
from jobwarden.actors.messages import (
    BreakerReset,
    BreakerSnapshot,
    BreakerTrip,
    BudgetQuery,
    Pause,
    Reservation,
    Resume,
    SetBudget,
)
from jobwarden.errors import RequestError
from jobwarden.hub import EventHub
from jobwarden.mailbox import ask
from jobwarden.process import supervisor
from jobwarden.store import Store, jobs, users
from jobwarden.store import ledger as ledger_rows
from jobwarden.store.jobs import Admitted, NewJob, Quota, Refused
from jobwarden.store.users import UserLimits
from jobwarden.wire.views import TERMINAL_STATUSES, JobView
from tests.conftest import make_config
from tests.test_breaker import SERVICE_KINDS
from tests.test_guards import KINDS, explained, limits
from tests.test_ledger import metered

pytestmark = pytest.mark.both_stores


@pytest.fixture
def start_cluster(start_daemon, tmp_path: Path, database: str, monkeypatch: pytest.MonkeyPatch):
    """Start two daemons on the one database, each on a directory (and sockets) of its own.
    On PostgreSQL make_config names the test's schema; on SQLite both get one file."""
    if database == "sqlite":
        # Each daemon locks its database file so that a second one cannot dispatch it; here
        # two share it on purpose.
        monkeypatch.setattr(
            supervisor, "lock_database", lambda path: os.open(os.devnull, os.O_RDONLY)
        )

    async def start(extra: str, *, max_concurrent_jobs: int = 2) -> list:
        daemons = []
        for name in ("a", "b"):
            home = tmp_path / name
            home.mkdir()
            config = make_config(home, extra, max_concurrent_jobs=max_concurrent_jobs)
            if database == "sqlite":
                shared = msgspec.structs.replace(config.store, path=str(tmp_path / "shared.db"))
                config = msgspec.structs.replace(config, store=shared)
            daemons.append(await start_daemon(config=config))
        return daemons

    return start


async def finished(daemon, job_id: int) -> JobView:
    """The job once it has finished, on whichever daemon ran it: read from the store, since a
    daemon's watchers hear only of its own commits (the cluster's events are another part)."""
    while (job := await daemon.job(job_id)).status not in TERMINAL_STATUSES:
        await trio.sleep(0.5)
    return job


async def submitted(daemon, **options) -> str:
    """ "accepted", or the code the daemon refused the submission with."""
    try:
        await daemon.submit("noop", **options)
    except RequestError as exc:
        return exc.body.code
    return "accepted"


async def test_a_user_limited_to_10_a_minute_gets_10_of_30_spread_over_two_daemons(
    autojump_clock, start_cluster
):
    a, b = await start_cluster(limits(rate='"10/min"', burst=10) + KINDS)
    answers = [await submitted((a, b)[n % 2], user="alice") for n in range(30)]
    assert answers.count("accepted") == 10
    assert set(answers) == {"accepted", "RATE_LIMITED"}
    # The bucket refills once for the two: a token every 6 s, whichever daemon takes it.
    await trio.sleep(6.0)
    assert [await submitted(b, user="alice"), await submitted(a, user="alice")] == [
        "accepted",
        "RATE_LIMITED",
    ]


async def test_a_rate_an_operator_sets_on_one_daemon_holds_on_the_other(
    autojump_clock, start_cluster
):
    a, b = await start_cluster(limits(rate='"10/min"', burst=10) + KINDS)
    await a.handle.store.write(
        partial(
            users.create,
            name="batch",
            credits=None,
            limits=UserLimits(),
            token_hash=None,
            now=a.now,
        )
    )
    await a.handle.store.write(partial(users.update, name="batch", limits=UserLimits(rate="off")))
    answers = [await submitted(b, user="batch") for _ in range(15)]
    assert answers == ["accepted"] * 15
    await b.handle.store.write(partial(users.update, name="batch", limits=UserLimits(rate="1/h")))
    # A full bucket of 10 (the burst), spread over both, then a token an hour.
    answers = [await submitted((a, b)[n % 2], user="batch") for n in range(11)]
    assert answers == ["accepted"] * 10 + ["RATE_LIMITED"]


async def test_a_pause_on_one_daemon_pauses_the_other_and_a_resume_there_resumes_both(
    autojump_clock, start_cluster
):
    a, b = await start_cluster(limits() + KINDS)
    await ask(a.handle.scheduler, Pause, kind="noop")
    # b's own pause of another kind keeps a's: each change is made to the state as stored.
    await ask(b.handle.scheduler, Pause, kind="sleepy")
    held = [await daemon.submit("noop") for daemon in (a, b)]
    await trio.sleep(60)
    assert [(await b.job(job.id)).status for job in held] == ["queued", "queued"]
    assert await explained(b, held[1]) == "kind noop paused"
    assert await ask(a.handle.scheduler, Resume, kind="sleepy") == {
        "paused": ["noop"],
        "all": False,
    }
    await ask(b.handle.scheduler, Resume, kind="noop")
    for job in held:
        assert (await finished(a, job.id)).status == "done"


async def test_a_breaker_tripped_on_one_daemon_holds_the_kinds_jobs_on_the_other(
    autojump_clock, start_cluster
):
    a, b = await start_cluster(limits() + SERVICE_KINDS.format(max_concurrent=10))
    opened = await ask(a.handle.breaker, BreakerTrip, service="flaky")
    job = await b.submit("needs_flaky", {"service": "flaky", "seconds": 1})
    await trio.sleep(30)
    assert (await b.job(job.id)).status == "queued"
    assert (await explained(b, job)).startswith("service flaky unavailable until")
    # Its recovery time over, the circuit lets jobs through again on either daemon.
    final = await finished(b, job.id)
    assert final.status == "done"
    assert final.started_at == opened["open_until"]


async def test_a_breaker_tripped_on_one_daemon_is_reset_from_the_other(
    autojump_clock, start_cluster
):
    a, b = await start_cluster(limits() + SERVICE_KINDS.format(max_concurrent=10))
    opened = await ask(a.handle.breaker, BreakerTrip, service="flaky")
    job = await b.submit("needs_flaky", {"service": "flaky", "seconds": 1})
    await trio.sleep(30)
    # b never saw the circuit open itself: its reset still closes the stored one.
    reset = await ask(b.handle.breaker, BreakerReset, service="flaky")
    assert reset["state"] == "closed"
    final = await finished(b, job.id)
    assert final.status == "done"
    assert final.started_at < opened["open_until"]


def booked_calls(subscription) -> dict[int, tuple[int, float]]:
    """The cost events a hub carried, by seq: (job, usd)."""
    calls = {}
    while True:
        try:
            event = subscription.events.receive_nowait()
        except trio.WouldBlock:
            return calls
        if event.type == "cost":
            calls[event.seq] = (event.job, event.data["usd"])


async def spent_in_ledger(daemon) -> float:
    return await daemon.handle.store.read(
        lambda conn: conn.execute("SELECT COALESCE(SUM(usd), 0) FROM ledger").fetchone()[0]
    )


async def test_200_priced_calls_at_once_over_two_daemons_never_spend_past_the_daily_budget(
    autojump_clock, start_cluster
):
    # $0.01 a call, 200 calls ($2) against $1 a day: 200 jobs of one call, each daemon free
    # to run 100 of them at once.
    a, b = await start_cluster(limits() + metered(daily=1), max_concurrent_jobs=100)
    work = {"service": "tokens", "units": [1]}
    await ask(a.handle.scheduler, Pause, kind=None)
    fanouts = [await (a, b)[n % 2].submit("fanout", work) for n in range(200)]
    with (
        a.handle.hub.subscribe(buffer=10_000) as on_a,
        b.handle.hub.subscribe(buffer=10_000) as on_b,
    ):
        # Each daemon hears of the resume (another's wake-up is the cluster's part): both
        # start ten jobs at once.
        for daemon in (a, b):
            await ask(daemon.handle.scheduler, Resume, kind=None)
        await trio.sleep(120)
        # A daemon's hub carries its own commits, and on PostgreSQL the other's too (the
        # event tail): one call's event may come from both, told apart by its seq.
        calls = booked_calls(on_a) | booked_calls(on_b)
    booked = sum(usd for _, usd in calls.values())
    paid_jobs = sorted({job for job, _ in calls.values()})
    # Both daemons booked calls: the jobs that paid ran on two nodes.
    ran_on = await a.handle.store.read(
        lambda conn: conn.execute(
            f"SELECT COUNT(DISTINCT node) FROM jobs WHERE id IN ({','.join('?' * len(paid_jobs))})",
            paid_jobs,
        ).fetchone()[0]
    )
    assert ran_on == 2
    assert booked == pytest.approx(await spent_in_ledger(a))
    assert 0.5 < booked <= 1.0 + 1e-9
    assert all([(await ask(d.handle.ledger, BudgetQuery))["stopped"] for d in (a, b)])
    # An operator raises the limit on one daemon: the other takes it up too, and every job
    # finishes within the new limit.
    await ask(a.handle.ledger, SetBudget, daily_usd=3.0, monthly_usd=None)
    for job in fanouts:
        assert (await finished(b, job.id)).status == "done"
    # b reads the stored limits again while it is stopped.
    await trio.sleep(STOPPED_RECHECK)
    assert not (await ask(b.handle.ledger, BudgetQuery))["stopped"]
    assert await spent_in_ledger(b) <= 3.0 + 1e-9


async def test_a_call_on_one_daemon_fails_fast_while_another_holds_the_circuit_open(
    autojump_clock, start_cluster
):
    a, b = await start_cluster(limits() + SERVICE_KINDS.format(max_concurrent=10))
    await ask(a.handle.breaker, BreakerTrip, service="flaky")
    # A kind that does not name the service runs, and its call is refused at once.
    job = await b.submit("caller", {"service": "flaky", "seconds": 5})
    final = await finished(b, job.id)
    assert final.error.code == "SERVICE_UNAVAILABLE"
    assert final.finished_at == final.started_at
    assert (await ask(b.handle.breaker, BreakerSnapshot))["flaky"]["state"] == "open"


async def test_one_daemon_probes_a_half_open_circuit_and_its_success_closes_it_for_both(
    autojump_clock, start_cluster
):
    a, b = await start_cluster(
        limits() + SERVICE_KINDS.format(max_concurrent=10), max_concurrent_jobs=1
    )
    opened = await ask(a.handle.breaker, BreakerTrip, service="flaky")
    await trio.sleep(opened["open_until"] - a.now)
    await ask(a.handle.scheduler, Pause, kind=None)
    calls = [await d.submit("caller", {"service": "flaky", "seconds": 5}) for d in (a, b)]
    for daemon in (a, b):  # one job each: a slot apiece
        await ask(daemon.handle.scheduler, Resume, kind=None)
    outcomes = sorted([(await finished(a, job.id)).status for job in calls])
    # One probe went; the other daemon's call was refused meanwhile, as a call beyond the
    # probes of a half-open circuit is.
    assert outcomes == ["done", "failed"]
    for daemon in (a, b):
        assert (await ask(daemon.handle.breaker, BreakerSnapshot))["flaky"]["state"] == "closed"


# -- two stores writing at once ---------------------------------------------------------------
# The daemons above share one trio thread, so their transactions take turns. Here two stores
# on one database write from their own threads at the same time, as two daemons' would: the
# row locks (PostgreSQL) and the one writer (SQLite) must decide each guard alone.

NOW = 1_800_000_000.0


def booked(at: float, *, usd: float) -> tuple:
    """A ledger entry as the ledger books one (job, user, kind, service, units, usd, ok, at,
    day, month, overrun_usd)."""
    day = BudgetCalendar("UTC").day(at)
    return (None, "alice", "fanout", "tokens", 1.0, usd, 1, at, day, day[:7], 0.0)


async def side_by_side(store_target: str, first: Any | None, writes: list) -> list:
    """`first` alone (if any), then each write handed to one of two stores in turn, all at
    once; their results in order. `first` makes the rows the writes contend for: a row being
    created makes a second creator wait for the first's commit, and the contest would be no
    test."""
    results: list = [None] * len(writes)
    async with (
        Store.open(store_target, hub=EventHub()) as one,
        Store.open(store_target, hub=EventHub()) as two,
    ):
        if first is not None:
            await one.write(first)

        async def run(index: int) -> None:
            results[index] = await (one, two)[index % 2].write(writes[index])

        async with trio.open_nursery() as nursery:
            for index in range(len(writes)):
                nursery.start_soon(run, index)
    return results


async def test_submissions_through_two_stores_at_once_take_one_users_bucket_once(store_target):
    quota = Quota(rate=10 / 60, burst=10, bucket=TokenBucket, day="2027-01-15")
    new = NewJob(
        kind="noop",
        user="alice",
        payload_json="{}",
        priority=0,
        idempotency_key=None,
        max_attempts=1,
    )
    writes = [partial(jobs.insert_many, batch=[new], now=NOW, quota=quota) for _ in range(30)]
    alice = partial(
        users.create, name="alice", credits=None, limits=UserLimits(), token_hash=None, now=NOW
    )
    batches = await side_by_side(store_target, alice, writes)
    results = [result for batch in batches for result in batch]
    assert sum(isinstance(result, Admitted) for result in results) == 10
    assert {result.code for result in results if isinstance(result, Refused)} == {"RATE_LIMITED"}


async def test_reservations_through_two_stores_at_once_never_pass_the_daily_limit(store_target):
    # 200 calls of $0.01 against $1 a day: exactly 100 fit.
    calendar = BudgetCalendar("UTC")
    call = Reservation(
        id=None,
        job=None,
        user="alice",
        kind="fanout",
        service="tokens",
        units=1.0,
        usd=0.01,
        price_usd=0.01,
        failures_billed=False,
    )
    writes = [
        partial(
            reserve_within_budget,
            reservation=call,
            holder=f"daemon-{n % 2}",
            calendar=calendar,
            default_limits=Limits(daily_usd=1.0, monthly_usd=0.0),
            now=NOW,
        )
        for n in range(200)
    ]
    # The spend rows of the day and the month, as the first booking of the day leaves them.
    spend_rows = partial(ledger_rows.book, entry=booked(NOW, usd=0.0), reservation_id=None)
    results = await side_by_side(store_target, spend_rows, writes)
    assert sum(isinstance(result, Reserved) for result in results) == 100
    assert {result.which for result in results if isinstance(result, OverBudget)} == {"daily"}


async def test_submissions_through_two_stores_at_once_fill_the_queue_to_its_depth_only(
    store_target,
):
    quota = Quota(max_queued=10, day="2027-01-15")
    writes = [
        partial(
            jobs.insert_many,
            batch=[
                NewJob(
                    kind="noop",
                    user=f"user{n}",
                    payload_json="{}",
                    priority=0,
                    idempotency_key=None,
                    max_attempts=1,
                )
            ],
            now=NOW,
            quota=quota,
        )
        for n in range(30)
    ]
    first = partial(jobs.set_setting, key="first", value=0)
    results = [
        result for batch in await side_by_side(store_target, first, writes) for result in batch
    ]
    assert sum(isinstance(result, Admitted) for result in results) == 10
    assert {result.code for result in results if isinstance(result, Refused)} == {"QUEUE_FULL"}


async def test_one_key_submitted_through_two_stores_at_once_makes_one_job(store_target):
    keyed = NewJob(
        kind="noop",
        user="alice",
        payload_json="{}",
        priority=0,
        idempotency_key="book-7",
        max_attempts=1,
    )
    writes = [partial(jobs.insert_many, batch=[keyed], now=NOW) for _ in range(20)]
    alice = partial(
        users.create, name="alice", credits=None, limits=UserLimits(), token_hash=None, now=NOW
    )
    results = [
        result for batch in await side_by_side(store_target, alice, writes) for result in batch
    ]
    assert all(isinstance(result, Admitted) for result in results)
    assert len({result.job.id for result in results}) == 1
    assert sum(not result.existing for result in results) == 1


async def test_a_services_concurrency_limit_holds_for_the_calls_of_both_daemons(
    autojump_clock, start_cluster
):
    # At most 2 calls to the service at once, for the two daemons together; each daemon has
    # 4 slots and starts 4 jobs that call it for 10 s.
    a, b = await start_cluster(
        limits() + SERVICE_KINDS.format(max_concurrent=2), max_concurrent_jobs=4
    )
    await ask(a.handle.scheduler, Pause, kind=None)
    calls = [await d.submit("caller", {"service": "flaky", "seconds": 10}) for d in (a, b) * 4]
    for daemon in (a, b):
        await ask(daemon.handle.scheduler, Resume, kind=None)
    ended = [(await finished(a, job.id)).finished_at for job in calls]
    # Each call took its 10 s just before its job finished.
    moments = sorted([(end - 10, +1) for end in ended] + [(end, -1) for end in ended])
    at_once = max(itertools.accumulate(change for _, change in moments))
    assert at_once == 2
    assert max(ended) - min(ended) >= 30
