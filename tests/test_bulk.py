"""Bulk actions: cancel and retry every job a filter matches, a bounded batch per store write,
with a dry run first; operators on the admin socket, a user's own jobs over the WebSocket.
The CLI's confirmation is tested in test_cli.py, against its fake daemon."""

from __future__ import annotations

import pytest
import trio

from jobwarden.actors.messages import CancelJob, Pause
from jobwarden.errors import RequestError
from jobwarden.mailbox import ask
from jobwarden.process.commands import OPERATOR, Caller
from jobwarden.store import jobs
from jobwarden.wire.views import JobFilter, Submission
from tests.test_websocket import Frames, add_user, open_frames

pytestmark = pytest.mark.both_stores

KINDS = """
[kinds.noop]
handler = "tests.handlers:noop"

[kinds.failing]
handler = "tests.handlers:sleepy"
"""


async def failed_job(daemon, **payload: object) -> int:
    job = await daemon.submit("failing", {"seconds": 0, "fail": True, **payload})
    assert (await daemon.wait_done(job.id)).reason == "TEST_FAILURE"
    return job.id


async def test_retry_by_code_and_age_takes_only_the_recent_failures(autojump_clock, start_daemon):
    daemon = await start_daemon(KINDS)
    commands = daemon.commands
    old = [await failed_job(daemon) for _ in range(2)]
    await trio.sleep(7200)
    recent = [await failed_job(daemon) for _ in range(3)]
    await ask(daemon.handle.scheduler, Pause, kind="noop")
    canceled = await daemon.submit("noop", user="bob")
    await ask(daemon.handle.pool, CancelJob, job_id=canceled.id)
    wanted = JobFilter(status=["failed"], code="TEST_FAILURE", since=3600)

    preview = await commands.retry_many(wanted, dry_run=True, show=2)
    assert (preview.matched, preview.ids, preview.changed) == (3, recent[:2], 0)
    # A dry run changes nothing.
    assert {(await daemon.job(job_id)).status for job_id in recent} == {"failed"}

    done = await commands.retry_many(wanted, dry_run=False)
    assert (done.matched, done.changed, done.ids, done.refused) == (3, 3, recent, {})
    for job_id in recent:
        assert [e.data.get("reason") for e in await daemon.events(job_id)].count(
            "MANUAL_RETRY"
        ) == 1
    for job_id in [*old, canceled.id]:
        assert "MANUAL_RETRY" not in [e.data.get("reason") for e in await daemon.events(job_id)]


async def test_cancel_of_many_queued_jobs_lets_other_writes_in_between(
    autojump_clock, start_daemon
):
    count = 3 * jobs.BULK_BATCH
    daemon = await start_daemon(f"[admission]\nmax_batch_items = {count}\n" + KINDS)
    commands = daemon.commands
    await ask(daemon.handle.scheduler, Pause, kind="noop")
    await commands.submit_many("alice", [Submission(kind="noop")] * count)
    submitted, canceled = [], []

    async def submit_meanwhile() -> None:
        submitted.append(await daemon.submit("failing", {"seconds": 0}, user="bob"))

    async def cancel_all() -> None:
        canceled.append(await commands.cancel_many(OPERATOR, JobFilter(kind="noop"), dry_run=False))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(cancel_all)
        await trio.sleep(0)
        nursery.start_soon(submit_meanwhile)
    assert canceled[0].changed == count
    seqs = [
        event.seq
        for job_id in range(1, count + 1)
        for event in await daemon.events(job_id)
        if event.data.get("status") == "canceled"
    ]
    bob_queued = (await daemon.events(submitted[0].id))[0].seq
    # The other user's submit committed while the cancel was still going: between batches.
    assert min(seqs) < bob_queued < max(seqs)


@pytest.mark.parametrize(
    ("job_filter", "message"),
    [
        (JobFilter(), "cancel: give at least one filter"),
        (JobFilter(status=["done", "failed"]), "cancel applies to queued or running jobs only"),
    ],
    ids=["empty", "no-cancelable-status"],
)
async def test_a_filter_that_would_take_everything_or_nothing_is_refused(
    autojump_clock, start_daemon, job_filter, message
):
    daemon = await start_daemon(KINDS)
    with pytest.raises(RequestError) as caught:
        await daemon.commands.cancel_many(OPERATOR, job_filter, dry_run=False)
    assert caught.value.body.code == "INVALID_REQUEST"
    assert caught.value.body.message.startswith(message)


async def test_a_running_job_that_matches_is_stopped(autojump_clock, start_daemon):
    daemon = await start_daemon(KINDS)
    running = await daemon.submit("failing", {"seconds": 3600})
    await daemon.wait_status(running.id, {"running"})
    outcome = await daemon.commands.cancel_many(
        Caller(user="alice"), JobFilter(kind="failing"), dry_run=False
    )
    assert (outcome.changed, outcome.ids) == (1, [running.id])
    assert (await daemon.job(running.id)).status == "canceled"


async def test_a_websocket_user_bulk_cancels_only_their_own_jobs(start_daemon):
    daemon = await start_daemon(KINDS)
    await ask(daemon.handle.scheduler, Pause, kind="noop")
    token = await add_user(daemon, "alice")
    hers = await daemon.submit("noop", user="alice")
    his = await daemon.submit("noop", user="bob")
    with trio.fail_after(10):
        async with open_frames(daemon, token) as ws:
            frames = Frames(ws)
            preview = await frames.ask(
                op="cancel_many", id=1, dry_run=True, filter={"kind": "noop", "user": "bob"}
            )
            reply = await frames.ask(op="cancel_many", id=2, filter={"kind": "noop"})
    assert preview["outcome"]["matched"] == 1
    assert preview["outcome"]["ids"] == [hers.id]
    assert reply["type"] == "canceled_many"
    assert reply["outcome"]["ids"] == [hers.id]
    assert (await daemon.job(hers.id)).status == "canceled"
    assert (await daemon.job(his.id)).status == "queued"


async def test_a_retry_the_store_refuses_is_counted_by_code(autojump_clock, start_daemon):
    daemon = await start_daemon(KINDS)
    failed = await daemon.submit("failing", {"seconds": 0, "fail": True}, idempotency_key="k")
    await daemon.wait_done(failed.id)
    other = await failed_job(daemon)
    await ask(daemon.handle.scheduler, Pause, kind="failing")
    # The key is the active job's now: the failed one may not come back beside it.
    await daemon.submit("failing", {"seconds": 1}, idempotency_key="k")
    outcome = await daemon.commands.retry_many(JobFilter(kind="failing"), dry_run=False)
    assert (outcome.matched, outcome.changed, outcome.ids) == (2, 1, [other])
    assert outcome.refused == {"CONFLICT": 1}
    assert (await daemon.job(failed.id)).status == "failed"


async def test_cancel_and_retry_by_tag_take_only_the_jobs_tagged_so(autojump_clock, start_daemon):
    daemon = await start_daemon(KINDS)
    await ask(daemon.handle.scheduler, Pause, kind="noop")
    nightly = [(await daemon.submit("noop", tags=["nightly", "eu"])).id for _ in range(2)]
    untagged = await daemon.submit("noop")
    other_tag = await daemon.submit("noop", tags=["eu"])
    by_tag = JobFilter(tag="nightly")

    canceled = await daemon.commands.cancel_many(OPERATOR, by_tag, dry_run=False)
    assert (canceled.matched, canceled.ids) == (2, nightly)
    assert {job_id: (await daemon.job(job_id)).status for job_id in nightly} == dict.fromkeys(
        nightly, "canceled"
    )
    assert (await daemon.job(untagged.id)).status == "queued"
    assert (await daemon.job(other_tag.id)).status == "queued"

    retried = await daemon.commands.retry_many(by_tag, dry_run=False)
    assert (retried.matched, retried.changed, retried.ids) == (2, 2, nightly)
    assert {(await daemon.job(job_id)).status for job_id in nightly} == {"queued"}
