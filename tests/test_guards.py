"""Request guards, system guards, fair scheduling and waiting reasons, on MockClock."""

from __future__ import annotations

import math
from functools import partial
from zoneinfo import ZoneInfo

import pytest
import trio

from jobwarden.actors.dispatch import WaitState, explain
from jobwarden.actors.messages import (
    BudgetState,
    CancelJob,
    Explain,
    Pause,
    PauseState,
    Resume,
)
from jobwarden.config import load_config_text
from jobwarden.errors import RequestError
from jobwarden.mailbox import ask
from jobwarden.store import users
from jobwarden.system import SystemLoad
from jobwarden.wire.views import JobView
from tests.conftest import EPOCH, GB, machine_load

pytestmark = pytest.mark.both_stores

KINDS = """
[kinds.noop]
handler = "tests.handlers:noop"

[kinds.sleepy]
handler = "tests.handlers:sleepy"
timeout = "1h"

[kinds.flaky]
handler = "tests.handlers:flaky"
max_attempts = 2
"""

# Every guard off but the one a test turns on.
NONE = {
    "credits": '"unlimited"',
    "rate": '"off"',
    "daily_jobs": "0",
    "max_queued": "0",
    "max_memory_percent": "100",
    "max_cpu_percent": "100",
}


def limits(**values: object) -> str:
    merged = {**NONE, **{key: str(value) for key, value in values.items()}}
    return "[limits]\n" + "".join(f"{key} = {value}\n" for key, value in merged.items())


async def refused(daemon, kind: str = "noop", payload: object = None, **options) -> RequestError:
    with pytest.raises(RequestError) as caught:
        await daemon.submit(kind, payload, **options)
    return caught.value


async def test_rate_limit_passes_ten_a_minute_then_says_when_a_token_is_back(
    autojump_clock, start_daemon
):
    daemon = await start_daemon(limits(rate='"10/min"', burst=10) + KINDS)
    for _ in range(10):
        await daemon.submit("noop", user="alice")
    error = await refused(daemon, user="alice")
    assert error.body.code == "RATE_LIMITED"
    assert error.body.retryable
    assert error.body.retry_after == pytest.approx(6.0)
    # Another user has a bucket of their own.
    await daemon.submit("noop", user="bob")
    await trio.sleep(6.0)
    await daemon.submit("noop", user="alice")
    assert (await refused(daemon, user="alice")).body.code == "RATE_LIMITED"


async def test_a_user_who_submits_at_exactly_their_rate_is_never_refused(
    autojump_clock, start_daemon
):
    # Epoch seconds are exact to 2.4e-7 s, so one token's time later the refill may be short
    # of a token by rounding: that was RATE_LIMITED with a retry_after of 0, every other time.
    daemon = await start_daemon(limits(rate='"100/min"', burst=1) + KINDS)
    for _ in range(100):
        await daemon.submit("noop", user="alice")
        await trio.sleep(0.6)


async def test_daily_limit_refuses_the_21st_until_midnight_in_the_configured_zone(
    autojump_clock, start_daemon
):
    # EPOCH is 2027-01-15 08:00 UTC, 03:00 in New York: midnight there is 21 hours away.
    daemon = await start_daemon(limits(daily_jobs=20, timezone='"America/New_York"') + KINDS)
    for _ in range(20):
        await daemon.submit("noop", user="alice")
    error = await refused(daemon, user="alice")
    assert error.body.code == "DAILY_LIMIT"
    assert error.body.retry_after == pytest.approx(21 * 3600)
    await daemon.submit("noop", user="bob")
    await trio.sleep(21 * 3600 - 1)
    assert (await refused(daemon, user="alice")).body.code == "DAILY_LIMIT"
    await trio.sleep(1)
    await daemon.submit("noop", user="alice")


async def test_the_daily_count_survives_a_restart(autojump_clock, start_daemon):
    config = limits(daily_jobs=3) + KINDS
    daemon = await start_daemon(config)
    for _ in range(3):
        await daemon.submit("noop", user="alice")
    await daemon.stop()
    daemon = await start_daemon(config)
    assert (await refused(daemon, user="alice")).body.code == "DAILY_LIMIT"


async def user(daemon, name: str) -> users.UserView:
    found = await daemon.handle.store.read(partial(users.get, name=name))
    assert found is not None
    return found


async def test_credits_are_reserved_spent_when_done_and_refunded_on_failure_or_cancel(
    autojump_clock, start_daemon
):
    daemon = await start_daemon(limits(credits=3) + KINDS)
    done = await daemon.submit("noop", user="alice")
    failed = await daemon.submit("sleepy", {"seconds": 1, "fail": True}, user="alice")
    waiting = await daemon.submit("sleepy", {"seconds": 60}, user="alice")
    assert (await user(daemon, "alice")).credits == 0
    assert (await refused(daemon, user="alice")).body.code == "INSUFFICIENT_CREDITS"
    assert (await daemon.wait_done(done.id)).status == "done"
    assert (await daemon.wait_done(failed.id)).status == "failed"
    await ask(daemon.handle.pool, CancelJob, job_id=waiting.id)
    assert (await daemon.wait_done(waiting.id)).status == "canceled"
    alice = await user(daemon, "alice")
    assert (alice.credits, alice.spent, alice.reserved) == (2, 1, 0)


async def test_a_kind_may_cost_more_than_one_credit(autojump_clock, start_daemon):
    daemon = await start_daemon(limits(credits=5) + KINDS + "credits = 3\n")
    await daemon.submit("flaky", user="alice")
    error = await refused(daemon, "flaky", user="alice")
    assert error.body.code == "INSUFFICIENT_CREDITS"
    assert "costs 3 credits" in error.body.message and "has 2" in error.body.message


async def test_queue_depth_refuses_the_101st_queued_job(autojump_clock, start_daemon):
    daemon = await start_daemon(limits(max_queued=100) + KINDS)
    await ask(daemon.handle.scheduler, Pause, kind=None)
    for n in range(100):
        await daemon.submit("noop", user=f"user{n % 7}")
    error = await refused(daemon, user="someone")
    assert error.body.code == "QUEUE_FULL"
    # Nothing finished lately to estimate from: a minute.
    assert error.body.retry_after == 60.0


async def test_queue_full_estimates_room_from_recent_completions(autojump_clock, start_daemon):
    daemon = await start_daemon(limits(max_queued=5) + KINDS, max_concurrent_jobs=1)
    finished = [await daemon.submit("sleepy", {"seconds": 10}) for _ in range(5)]
    for job in finished:
        await daemon.wait_done(job.id)
    # 5 completions in the last 300 s: one every 60 s.
    for _ in range(5):
        await daemon.submit("sleepy", {"seconds": 1000})
    await trio.sleep(1)
    await daemon.submit("sleepy", {"seconds": 1000})
    error = await refused(daemon, "sleepy", {"seconds": 1})
    assert error.body.code == "QUEUE_FULL"
    assert error.body.retry_after == 60.0


async def test_a_kind_has_its_own_queue_depth(autojump_clock, start_daemon):
    config = limits(max_queued=100) + KINDS.replace(
        'timeout = "1h"', 'timeout = "1h"\nmax_queued = 2'
    )
    daemon = await start_daemon(config, max_concurrent_jobs=1)
    await daemon.submit("sleepy", {"seconds": 100})
    await trio.sleep(1)
    await daemon.submit("sleepy", {"seconds": 1})
    await daemon.submit("sleepy", {"seconds": 1})
    error = await refused(daemon, "sleepy", {"seconds": 1})
    assert (error.body.code, error.body.message) == (
        "QUEUE_FULL",
        "the sleepy queue holds 2 jobs, its limit",
    )
    await daemon.submit("noop")


async def test_oversized_payload_is_refused_with_413_code(autojump_clock, start_daemon):
    daemon = await start_daemon(KINDS)
    error = await refused(daemon, payload={"text": "x" * 70_000})
    assert error.body.code == "PAYLOAD_TOO_LARGE"


async def test_heavy_users_are_slowed_first_above_the_soft_queue_depth(
    autojump_clock, start_daemon
):
    config = limits(rate='"60/min"', burst=10, max_queued=20, shed_at=0.25, shed_rate_factor=0.25)
    daemon = await start_daemon(config + KINDS)
    await ask(daemon.handle.scheduler, Pause, kind=None)
    await daemon.submit("noop", user="light")
    for _ in range(10):
        await daemon.submit("noop", user="heavy")
    # Past 5 of 20 queued, heavy holds 10 of 11: their bucket refills at a quarter now.
    error = await refused(daemon, user="heavy")
    assert error.body.code == "RATE_LIMITED"
    assert "slowed" in error.body.message
    assert error.body.retry_after == pytest.approx(4.0)
    await trio.sleep(1.0)
    assert (await refused(daemon, user="heavy")).body.retry_after == pytest.approx(3.0)
    for _ in range(5):
        await daemon.submit("noop", user="light")


async def test_unknown_users_are_refused_when_creating_them_is_off(autojump_clock, start_daemon):
    daemon = await start_daemon(limits(create_users="false") + KINDS)
    error = await refused(daemon, user="mallory")
    assert error.body.code == "FORBIDDEN"


async def test_a_requirement_this_machine_can_never_meet_is_refused_at_admission(
    autojump_clock, start_daemon
):
    # The machine's total memory is the sampler's reading, as every other figure of it.
    machine = Machine()
    machine.load = machine_load(memory_total=2 * GB, memory_available=1 * GB)
    daemon = await start_daemon(KINDS + 'min_memory = "4GB"\n', sample_system=machine)
    error = await refused(daemon, "flaky")
    assert error.body.code == "INVALID_REQUEST"
    assert error.body.message.endswith("has 2.0 GB of memory in total: it could never start")


class Machine:
    """A machine whose load a test sets."""

    def __init__(self) -> None:
        self.load = machine_load(memory_percent=50.0, memory_available=8 * GB, cpu_percent=10.0)

    def __call__(self) -> SystemLoad:
        return self.load


async def explained(daemon, job: JobView) -> str:
    job = await daemon.job(job.id)
    return (await ask(daemon.handle.scheduler, Explain, jobs=[job]))[job.id].reason


async def test_dispatch_pauses_while_memory_is_high_and_resumes_at_the_next_sample(
    autojump_clock, start_daemon
):
    machine = Machine()
    machine.load = machine_load(memory_percent=83.0, memory_available=2 * GB, cpu_percent=10.0)
    daemon = await start_daemon(
        limits(max_memory_percent=80, max_cpu_percent=90, sample_every='"5s"') + KINDS,
        sample_system=machine,
    )
    job = await daemon.submit("noop")
    await trio.sleep(1)
    assert (await daemon.job(job.id)).status == "queued"
    assert await explained(daemon, job) == "memory 83% > 80%"
    machine.load = machine_load(memory_percent=60.0, memory_available=8 * GB, cpu_percent=95.0)
    await trio.sleep(5)
    assert await explained(daemon, job) == "cpu 95% > 90%"
    machine.load = machine_load(memory_percent=60.0, memory_available=8 * GB, cpu_percent=20.0)
    done = await daemon.wait_done(job.id)
    assert done.started_at - EPOCH == pytest.approx(10.0)


async def test_a_kind_waits_until_its_memory_is_free(autojump_clock, start_daemon):
    machine = Machine()
    machine.load = machine_load(memory_percent=60.0, memory_available=int(3.1 * GB), cpu_percent=1)
    daemon = await start_daemon(KINDS + 'min_memory = "4GB"\n', sample_system=machine)
    job = await daemon.submit("flaky", {"succeed_on": 1})
    other = await daemon.submit("noop")
    await daemon.wait_done(other.id)
    assert await explained(daemon, job) == "needs 4.0 GB, 3.1 GB free"
    machine.load = machine_load(memory_percent=40.0, memory_available=6 * GB, cpu_percent=1)
    assert (await daemon.wait_done(job.id)).status == "done"


async def test_one_users_backlog_delays_another_users_job_by_at_most_one_slot(
    autojump_clock, start_daemon
):
    daemon = await start_daemon(KINDS, max_concurrent_jobs=1)
    heavy = [await daemon.submit("sleepy", {"seconds": 10}, user="heavy") for _ in range(100)]
    light = await daemon.submit("sleepy", {"seconds": 10}, user="light")
    done = await daemon.wait_done(light.id)
    started_before = [
        job for job in [await daemon.job(j.id) for j in heavy] if job.started_at is not None
    ]
    # heavy's first job was running when light's arrived; one more of heavy's may go first.
    assert len([j for j in started_before if j.started_at < done.started_at]) <= 2
    assert done.started_at - EPOCH <= 20.0


async def test_round_robin_alternates_users_within_a_priority(autojump_clock, start_daemon):
    daemon = await start_daemon(KINDS, max_concurrent_jobs=1)
    await ask(daemon.handle.scheduler, Pause, kind=None)
    submitted = []
    for name in ["a"] * 4 + ["b"] * 2 + ["c"]:
        submitted.append(await daemon.submit("noop", user=name))
    urgent = await daemon.submit("noop", user="a", priority=10)
    await ask(daemon.handle.scheduler, Resume, kind=None)
    for job in [*submitted, urgent]:
        await daemon.wait_done(job.id)
    started = [
        (event.seq, event.user)
        for job in [*submitted, urgent]
        for event in await daemon.events(job.id)
        if event.type == "status" and event.data["status"] == "running"
    ]
    assert [user for _, user in sorted(started)] == ["a", "a", "b", "c", "a", "b", "a", "a"]


async def test_a_user_at_their_running_limit_waits_while_others_run(autojump_clock, start_daemon):
    daemon = await start_daemon(limits(max_running_per_user=1) + KINDS, max_concurrent_jobs=3)
    first = await daemon.submit("sleepy", {"seconds": 100}, user="alice")
    second = await daemon.submit("sleepy", {"seconds": 100}, user="alice")
    bob = await daemon.submit("sleepy", {"seconds": 100}, user="bob")
    await trio.sleep(1)
    assert (await daemon.job(first.id)).status == "running"
    assert (await daemon.job(bob.id)).status == "running"
    assert await explained(daemon, second) == "user alice at running limit 1"
    # A user's own limit overrides the default.
    await daemon.handle.store.write(
        partial(users.update, name="alice", limits=users.UserLimits(max_running=2))
    )
    await trio.sleep(1)
    await daemon.submit("noop", user="carol")
    assert (await daemon.wait_done(second.id)).started_at - EPOCH == pytest.approx(2.0)


async def test_positions_count_down_as_jobs_ahead_finish(autojump_clock, start_daemon):
    daemon = await start_daemon(KINDS, max_concurrent_jobs=1)
    jobs = [await daemon.submit("sleepy", {"seconds": 10}) for _ in range(5)]
    last = jobs[-1]
    await daemon.wait_done(last.id)
    positions = [e.data for e in await daemon.events(last.id) if e.type == "position"]
    assert [p["position"] for p in positions] == [4, 3, 2, 1]
    assert positions[0]["reason"] == "no free slot (1 of 1 running)"
    assert positions[0]["queued"] == 4


async def test_position_events_are_coalesced_to_the_head_of_the_queue(autojump_clock, start_daemon):
    daemon = await start_daemon(limits(position_head=10) + KINDS, max_concurrent_jobs=1)
    jobs = [await daemon.submit("sleepy", {"seconds": 1}) for _ in range(200)]
    await trio.sleep(3)
    events = [
        e
        for job in jobs
        for e in await daemon.events(job.id)
        if e.type == "position" and e.at - EPOCH < 3
    ]
    assert 0 < len(events) <= 20
    assert all(e.data["position"] <= 10 for e in events)


def state(**changes: object) -> WaitState:
    base = {
        "now": EPOCH,
        "dispatching": True,
        "paused": PauseState(),
        "budget": BudgetState(stopped=False),
        "open_services": {},
        "load": machine_load(memory_percent=50.0, memory_available=8 * GB, cpu_percent=10.0),
        "running": {"render": 1},
        "running_by_user": {"alice": 1},
    }
    return WaitState(**{**base, **changes})  # type: ignore[arg-type]


RENDER_CONFIG = load_config_text(
    """
[daemon]
max_concurrent_jobs = 2
[limits]
max_running_per_user = 2
[services.image]
[kinds.render]
command = ["true"]
max_concurrent = 1
min_memory = "4GB"
services = ["image"]
"""
)


def queued(**changes: object) -> JobView:
    base = {
        "id": 7,
        "kind": "render",
        "user": "alice",
        "status": "queued",
        "priority": 0,
        "attempt": 0,
        "max_attempts": 4,
        "created_at": EPOCH,
        "updated_at": EPOCH,
        "available_at": EPOCH,
    }
    return JobView(**{**base, **changes})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("job", "wait", "user_limit", "reason"),
    [
        (
            queued(attempt=1, available_at=EPOCH + 250),
            state(),
            None,
            "backoff until 08:04:10 (attempt 2 of 4)",
        ),
        (queued(), state(dispatching=False), None, "the daemon is draining"),
        (queued(), state(paused=PauseState(kinds=["render"])), None, "kind render paused"),
        (queued(), state(paused=PauseState(all=True)), None, "all kinds paused"),
        (
            queued(),
            state(budget=BudgetState(stopped=True, reason="daily limit $500 reached")),
            None,
            "budget stopped: daily limit $500 reached",
        ),
        (
            queued(),
            state(open_services={"image": EPOCH + 60}),
            None,
            "service image unavailable until 08:01:00 (circuit open)",
        ),
        (
            queued(),
            state(load=machine_load(memory_percent=83, memory_available=8 * GB, cpu_percent=1)),
            None,
            "memory 83% > 80%",
        ),
        (
            queued(),
            state(
                load=machine_load(memory_percent=50, memory_available=int(3.1 * GB), cpu_percent=1)
            ),
            None,
            "needs 4.0 GB, 3.1 GB free",
        ),
        (queued(), state(running_by_user={"alice": 2}), None, "user alice at running limit 2"),
        (
            queued(),
            state(running_by_user={"alice": 2}),
            0,
            "no free slot for render (1 of 1 running)",
        ),
        (
            queued(),
            state(running={"render": 1, "other": 1}),
            5,
            "no free slot (2 of 2 running)",
        ),
        (queued(), state(running={}), None, "position 3 of 12"),
    ],
    ids=[
        "backoff",
        "draining",
        "kind-paused",
        "all-paused",
        "budget",
        "circuit",
        "memory",
        "min-memory",
        "user-limit",
        "kind-slot",
        "global-slot",
        "position",
    ],
)
def test_each_waiting_state_has_its_reason(job, wait, user_limit, reason):
    assert (
        explain(
            RENDER_CONFIG,
            wait,
            job,
            user_limit=user_limit,
            position=(3, 12, 1, 2),
            zone=ZoneInfo("UTC"),
        )
        == reason
    )


def test_no_limit_reads_as_infinite_rate():
    config = load_config_text('[limits]\nrate = "off"\n')
    assert math.isinf(config.limits.rate)


async def test_a_users_own_rate_is_kept_across_a_restart(autojump_clock, start_daemon):
    config = limits(rate='"10/min"', burst=10) + KINDS
    daemon = await start_daemon(config)
    await daemon.submit("noop", user="batch")
    await daemon.handle.store.write(
        partial(users.update, name="batch", limits=users.UserLimits(rate="off"))
    )
    await daemon.stop()
    daemon = await start_daemon(config)
    for _ in range(15):
        await daemon.submit("noop", user="batch")
    for _ in range(10):
        await daemon.submit("noop", user="other")
    assert (await refused(daemon, user="other")).body.code == "RATE_LIMITED"
