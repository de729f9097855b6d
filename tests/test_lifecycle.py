"""A job's way through the daemon, on MockClock: virtual time asserted exactly."""

from __future__ import annotations

import random
from functools import partial

import pytest
import trio
from structlog.testing import capture_logs

from jobwarden.actors.pool import retry_delay
from jobwarden.config import RetryPolicy
from jobwarden.errors import RequestError
from jobwarden.process.supervisor import Supervisor
from jobwarden.store import jobs
from jobwarden.wire.views import JobView
from tests import handlers
from tests.conftest import EPOCH, Daemon, idle_machine, make_config, opened_database

pytestmark = pytest.mark.both_stores

KINDS = """
[kinds.noop]
handler = "tests.handlers:noop"

[kinds.typed]
handler = "tests.handlers:typed"

[kinds.flaky]
handler = "tests.handlers:flaky"

[kinds.crashing]
handler = "tests.handlers:crashing"

[kinds.hang]
handler = "tests.handlers:hang"
timeout = "10m"

[kinds.sleepy]
handler = "tests.handlers:sleepy"
timeout = "1h"

[kinds.stepper]
handler = "tests.handlers:stepper"
"""


def status_trail(events) -> list[tuple[float, str, str | None]]:
    return [
        (e.at - EPOCH, e.data["status"], e.data.get("reason")) for e in events if e.type == "status"
    ]


@pytest.mark.parametrize(
    ("attempt", "expected"),
    [(1, 0.0), (2, 30.0), (3, 120.0), (4, None)],
    ids=["after-1st", "after-2nd", "after-3rd", "used-up"],
)
def test_backoff_schedule_follows_the_seed(attempt, expected):
    policy = RetryPolicy(max_attempts=4, backoff=[0.0, 30.0, 120.0], jitter=0.0)
    assert retry_delay(policy, attempt, random.Random(1)) == expected


def test_jitter_spreads_delays_within_bounds():
    policy = RetryPolicy(max_attempts=4, backoff=[0.0, 30.0, 120.0], jitter=0.1)
    delays = {retry_delay(policy, 2, random.Random(seed)) for seed in range(50)}
    assert all(27.0 <= d <= 33.0 for d in delays)
    assert len(delays) > 40


async def test_job_runs_to_done_with_its_result(autojump_clock, start_daemon):
    daemon = await start_daemon(KINDS)
    job = await daemon.submit("noop", {"x": 1})
    assert job.status == "queued"
    done = await daemon.wait_done(job.id)
    assert done.status == "done"
    assert done.result == {"echo": {"x": 1}}
    assert done.attempt == 1


async def test_retries_wait_0s_30s_120s_then_fail(autojump_clock, start_daemon):
    daemon = await start_daemon(KINDS)
    job = await daemon.submit("flaky", {})
    final = await daemon.wait_done(job.id)
    assert final.status == "failed"
    assert final.attempt == 4
    assert final.error.code == "HANDLER_ERROR"
    starts = [
        at for at, status, _ in status_trail(await daemon.events(job.id)) if status == "running"
    ]
    assert starts == [0.0, 0.0, 30.0, 150.0]


async def test_flaky_job_succeeds_on_a_later_attempt(autojump_clock, start_daemon):
    daemon = await start_daemon(KINDS)
    job = await daemon.submit("flaky", {"succeed_on": 3})
    final = await daemon.wait_done(job.id)
    assert (final.status, final.attempt, final.result) == ("done", 3, {"attempt": 3})


async def test_unexpected_exception_is_retried_and_named(autojump_clock, start_daemon):
    daemon = await start_daemon(KINDS)
    final = await daemon.wait_done((await daemon.submit("crashing")).id)
    assert final.status == "failed"
    assert "ZeroDivisionError" in final.error.message
    assert final.attempt == 4


async def test_a_failed_attempt_is_logged_at_warning_with_its_message_and_error_id(
    autojump_clock, start_daemon
):
    daemon = await start_daemon(KINDS)
    with capture_logs() as logs:
        final = await daemon.wait_done((await daemon.submit("crashing")).id)
    finished = [entry for entry in logs if entry["event"] == "job finished"]
    assert [(e["log_level"], e["outcome"]) for e in finished] == [("warning", "retry")] * 3 + [
        ("warning", "failed")
    ]
    last = finished[-1]
    assert (last["code"], last["error_id"]) == ("HANDLER_ERROR", final.error.error_id)
    assert last["message"] == "ZeroDivisionError: division by zero in the handler"
    # The traceback stays in the job's error, for `show`; the log line carries no locals.
    assert "Traceback" not in str(last) and "exc_info" not in last
    assert "ZeroDivisionError" in final.error.technical_message


async def test_hung_handler_times_out_at_exactly_its_timeout(autojump_clock, start_daemon):
    daemon = await start_daemon(
        KINDS.replace('timeout = "10m"', 'timeout = "10m"\nmax_attempts = 2')
    )
    job = await daemon.submit("hang")
    final = await daemon.wait_done(job.id)
    assert final.status == "failed"
    assert final.error.code == "TIMEOUT"
    trail = status_trail(await daemon.events(job.id))
    # Attempt 1 times out at 600 s, retries after 0 s, attempt 2 times out at 1200 s.
    assert [(at, status) for at, status, _ in trail] == [
        (0.0, "queued"),
        (0.0, "running"),
        (600.0, "queued"),
        (600.0, "running"),
        (1200.0, "failed"),
    ]


async def test_a_shorter_timeout_started_later_still_fires_on_time(autojump_clock, start_daemon):
    """One task enforces all timeouts, waiting for the earliest: a job with a 10-minute
    timeout that starts after one with an hour must not wait for the hour."""
    daemon = await start_daemon(
        KINDS.replace('timeout = "10m"', 'timeout = "10m"\nmax_attempts = 1')
    )
    long = await daemon.submit("sleepy", {"seconds": 3000})
    await trio.sleep(60)
    short = await daemon.submit("hang")
    final = await daemon.wait_done(short.id)
    assert (final.error.code, final.finished_at - EPOCH) == ("TIMEOUT", 660.0)
    assert (await daemon.job(long.id)).status == "running"


async def test_typed_payload_is_validated_at_admission(autojump_clock, start_daemon):
    daemon = await start_daemon(KINDS)
    with pytest.raises(RequestError) as refused:
        await daemon.submit("typed", {"n": "three"})
    assert refused.value.body.code == "INVALID_REQUEST"
    assert "payload.n" in refused.value.body.message
    with pytest.raises(RequestError) as refused:
        await daemon.submit("typed", {"n": 1, "extra": True})
    assert "extra" in refused.value.body.message
    done = await daemon.wait_done((await daemon.submit("typed", {"n": 3})).id)
    assert done.result == {"n": 3}


async def test_unknown_kind_and_oversized_payload_are_refused(autojump_clock, start_daemon):
    daemon = await start_daemon(KINDS + "\n[admission]\nmax_payload_bytes = 100\n")
    with pytest.raises(RequestError) as refused:
        await daemon.submit("nope")
    assert refused.value.body.code == "INVALID_REQUEST"
    assert "unknown kind 'nope'" in refused.value.body.message
    with pytest.raises(RequestError) as refused:
        await daemon.submit("noop", {"blob": "x" * 200})
    assert refused.value.body.code == "PAYLOAD_TOO_LARGE"


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"user": ""}, "user"),
        ({"user": "x" * 65}, "user"),
        ({"idempotency_key": ""}, "idempotency_key"),
        ({"priority": 1000}, "priority"),
    ],
    ids=["empty-user", "long-user", "empty-key", "priority-out-of-range"],
)
async def test_bad_submit_options_are_named(autojump_clock, start_daemon, options, named):
    daemon = await start_daemon(KINDS)
    with pytest.raises(RequestError) as refused:
        await daemon.submit("noop", {}, **options)
    assert refused.value.body.code == "INVALID_REQUEST"
    assert named in refused.value.body.message


async def test_idempotency_key_returns_the_same_job(autojump_clock, start_daemon):
    daemon = await start_daemon(KINDS)
    first = await daemon.submit("noop", {"a": 1}, idempotency_key="book-42")
    again = await daemon.submit("noop", {"a": 1}, idempotency_key="book-42")
    other_user = await daemon.submit("noop", {}, idempotency_key="book-42", user="bob")
    assert again.id == first.id
    assert other_user.id != first.id


async def test_priority_first_then_fifo(autojump_clock, start_daemon):
    daemon = await start_daemon(KINDS, max_concurrent_jobs=1)
    blocker = await daemon.submit("sleepy", {"seconds": 10})
    low = await daemon.submit("sleepy", {"seconds": 1}, priority=-5)
    normal_a = await daemon.submit("sleepy", {"seconds": 1})
    high = await daemon.submit("sleepy", {"seconds": 1}, priority=10)
    normal_b = await daemon.submit("sleepy", {"seconds": 1})
    for job in (blocker, low, normal_a, high, normal_b):
        await daemon.wait_done(job.id)
    started = {}
    for job in (high, normal_a, normal_b, low):
        trail = status_trail(await daemon.events(job.id))
        started[job.id] = next(at for at, status, _ in trail if status == "running")
    assert sorted(started, key=started.get) == [high.id, normal_a.id, normal_b.id, low.id]


async def test_global_and_per_kind_concurrency_limits(autojump_clock, start_daemon):
    daemon = await start_daemon(
        KINDS.replace('timeout = "1h"', 'timeout = "1h"\nmax_concurrent = 1'),
        max_concurrent_jobs=3,
    )
    sleepers = [await daemon.submit("sleepy", {"seconds": 10}) for _ in range(3)]
    steppers = [await daemon.submit("stepper", {"steps": 1, "step_seconds": 10}) for _ in range(3)]
    for job in sleepers + steppers:
        await daemon.wait_done(job.id)
    intervals = []
    for job in sleepers + steppers:
        final = await daemon.job(job.id)
        intervals.append((final.started_at - EPOCH, final.finished_at - EPOCH, job.kind))

    def running_at(t, kind=None):
        return sum(1 for s, f, k in intervals if s <= t < f and (kind is None or k == kind))

    moments = [s for s, _, _ in intervals]
    assert max(running_at(t) for t in moments) == 3
    assert max(running_at(t, "sleepy") for t in moments) == 1
    # Sleepers run one after another: 10 s each.
    assert sorted(s for s, _, k in intervals if k == "sleepy") == [0.0, 10.0, 20.0]


async def test_cancel_queued_and_running_jobs(autojump_clock, start_daemon):
    from jobwarden.actors.messages import CancelJob
    from jobwarden.mailbox import ReplySlot

    daemon = await start_daemon(KINDS, max_concurrent_jobs=1)
    running = await daemon.submit("hang")
    queued = await daemon.submit("noop")
    await daemon.wait_status(running.id, {"running"})
    for job in (queued, running):
        reply = ReplySlot()
        await daemon.handle.pool.send(CancelJob(job_id=job.id, reply=reply))
        canceled = await reply.wait()
        assert canceled.status == "canceled"
    reply = ReplySlot()
    await daemon.handle.pool.send(CancelJob(job_id=queued.id, reply=reply))
    with pytest.raises(RequestError) as refused:
        await reply.wait()
    assert "already canceled" in refused.value.body.message
    assert (await daemon.job(running.id)).status == "canceled"


async def test_pause_holds_a_kind_until_resume(autojump_clock, start_daemon):
    from jobwarden.actors.messages import Pause, Resume
    from jobwarden.mailbox import ReplySlot

    daemon = await start_daemon(KINDS)
    reply = ReplySlot()
    await daemon.handle.scheduler.send(Pause(kind="noop", reply=reply))
    assert await reply.wait() == {"paused": ["noop"], "all": False}
    job = await daemon.submit("noop")
    other = await daemon.submit("typed", {"n": 1})
    await daemon.wait_done(other.id)
    await trio.sleep(3600)
    assert (await daemon.job(job.id)).status == "queued"
    reply = ReplySlot()
    await daemon.handle.scheduler.send(Resume(kind="noop", reply=reply))
    await reply.wait()
    assert (await daemon.wait_done(job.id)).status == "done"


async def test_progress_and_checkpoint_reach_the_store(autojump_clock, start_daemon):
    daemon = await start_daemon(KINDS)
    job = await daemon.submit("stepper", {"steps": 4})
    final = await daemon.wait_done(job.id)
    assert final.progress == 1.0
    assert final.message == "step 4/4"
    assert final.checkpoint == {"done": 4}
    progress = [e for e in await daemon.events(job.id) if e.type == "progress"]
    assert [(e.at - EPOCH, e.data["fraction"]) for e in progress] == [
        (1.0, 0.25),
        (2.0, 0.5),
        (3.0, 0.75),
        (4.0, 1.0),
    ]


async def test_drain_lets_short_jobs_finish_and_interrupts_the_rest(autojump_clock, start_daemon):
    daemon = await start_daemon(KINDS)
    short = await daemon.submit("sleepy", {"seconds": 5})
    long = await daemon.submit("hang")
    await daemon.wait_status(long.id, {"running"})
    started = trio.current_time()
    await daemon.stop(grace=20)
    # The daemon waited out the full grace for the hanging job, not a second more.
    assert trio.current_time() - started == pytest.approx(20, abs=1e-6)
    assert (await daemon.job(short.id)).status == "done"
    interrupted = await daemon.job(long.id)
    assert interrupted.status == "queued"
    assert interrupted.reason == "INTERRUPTED"
    assert interrupted.attempt == 0


async def test_drain_returns_as_soon_as_jobs_finish(autojump_clock, start_daemon):
    daemon = await start_daemon(KINDS)
    job = await daemon.submit("sleepy", {"seconds": 5})
    await daemon.wait_status(job.id, {"running"})
    started = trio.current_time()
    await daemon.stop(grace=30)
    assert trio.current_time() - started == pytest.approx(5, abs=1e-6)
    assert (await daemon.job(job.id)).status == "done"


async def test_restart_recovers_running_jobs_and_resumes_checkpoint(
    autojump_clock, start_daemon, tmp_path
):
    daemon = await start_daemon(KINDS)
    job = await daemon.submit("stepper", {"steps": 4, "step_seconds": 10})
    await trio.sleep(25)
    # Simulate a crash: mark nothing finished, just reopen the same database.
    await daemon.stop(grace=0)
    interrupted = await daemon.job(job.id)
    assert interrupted.status == "queued"
    assert interrupted.checkpoint == {"done": 2}
    again = await start_daemon(KINDS)
    final = await again.wait_done(job.id)
    assert final.result == {"steps": 4, "resumed_from": 2}
    assert final.attempt == 1


async def test_a_job_ending_as_the_daemon_is_torn_down_is_still_recorded(autojump_clock, tmp_path):
    """The pool hands outcomes to one recorder that writes them in batches; one handed over
    while the whole daemon is being cancelled must still land, not be left `running`."""
    config = make_config(tmp_path, '[kinds.last]\nhandler = "tests.handlers:ends_the_daemon"\n')
    supervisor = Supervisor(
        config, threaded_store=False, clock_epoch=EPOCH, sample_system=idle_machine
    )
    with trio.CancelScope() as teardown:
        handlers.TEARDOWN.append(teardown)
        async with trio.open_nursery() as nursery:
            daemon = Daemon(await nursery.start(supervisor.run), trio.Event())
            job = await daemon.submit("last")
            await trio.sleep_forever()
    assert not handlers.TEARDOWN
    with opened_database(config.database()) as conn:
        stored = jobs.get_job(conn, job.id)
    assert (stored.status, stored.result) == ("done", {"ended": True})


async def test_the_store_never_shows_more_jobs_running_than_slots(tmp_path):
    """The pool frees a batch's slots as soon as its outcomes are handed to the store, so the
    next claim overlaps that write; the claim is queued behind it, so no committed state (no
    prefix of the event log) has more jobs running than `max_concurrent_jobs`. Real threaded
    store, real clock: the ordering under test is the writer thread's."""
    config = make_config(tmp_path, KINDS, max_concurrent_jobs=3)
    supervisor = Supervisor(config, clock_epoch=EPOCH, sample_system=idle_machine)
    async with trio.open_nursery() as nursery:
        daemon = Daemon(await nursery.start(supervisor.run), trio.Event())
        submitted: list[JobView] = []

        async def submit(n: int) -> None:
            submitted.append(await daemon.submit("noop", {"n": n}))

        # All at once, so that a queue builds and every round of claims fills all slots.
        async with trio.open_nursery() as submitters:
            for n in range(300):
                submitters.start_soon(submit, n)
        for job in submitted:
            assert (await daemon.wait_done(job.id)).status == "done"
        log = await daemon.handle.store.read(
            partial(jobs.events_since, since=0, job=None, limit=1_000_000)
        )
        nursery.cancel_scope.cancel()
    running: set[int] = set()
    most = 0
    for event in log:
        if event.type == "status" and event.data["status"] == "running":
            running.add(event.job)
        elif event.type == "status":
            running.discard(event.job)
        most = max(most, len(running))
    assert most == 3


async def test_a_pause_is_answered_even_when_a_backoff_ends_while_it_is_saved(
    autojump_clock, start_daemon, monkeypatch
):
    from jobwarden.actors.messages import Pause
    from jobwarden.mailbox import ReplySlot

    daemon = await start_daemon(KINDS)
    # A job waiting out its backoff gives the scheduler a moment to wake at.
    waiting = await daemon.submit("flaky", {"succeed_on": 3})
    await daemon.wait_status(waiting.id, {"queued"})
    while (await daemon.job(waiting.id)).attempt < 2:
        await trio.sleep(1)
    store = daemon.handle.store
    write = store.write

    async def slow_write(apply, **options):
        # The disk is slow today: the backoff ends before the pause is saved.
        await trio.sleep(60)
        return await write(apply, **options)

    monkeypatch.setattr(store, "write", slow_write)
    reply = ReplySlot()
    await daemon.handle.scheduler.send(Pause(kind="noop", reply=reply))
    with trio.fail_after(600):
        assert await reply.wait() == {"paused": ["noop"], "all": False}
        monkeypatch.setattr(store, "write", write)
        # The backoff that ended meanwhile is acted on, with no other message to wake for.
        assert (await daemon.wait_done(waiting.id)).status == "done"
