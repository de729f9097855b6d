"""What a queued job waits for besides its turn, on MockClock: a start time (run_at, delay),
an operator's hold of it or of its user, the jobs it runs after; and its tags."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
import trio

from jobwarden.errors import RequestError
from tests.conftest import EPOCH
from tests.test_admin import ask_admin
from tests.test_guards import KINDS, explained
from tests.test_websocket import add_user, connect, url_of


async def refusal(daemon, kind: str = "noop", **options: object) -> tuple[str, str]:
    with pytest.raises(RequestError) as refused:
        await daemon.submit(kind, {}, **options)
    return refused.value.body.code, refused.value.body.message


def status_trail(events) -> list[tuple[str, str | None]]:
    return [(e.data["status"], e.data.get("reason")) for e in events if e.type == "status"]


# -- delayed jobs ----------------------------------------------------------------------------


async def test_a_delayed_job_waits_scheduled_and_starts_at_its_time(autojump_clock, start_daemon):
    daemon = await start_daemon(KINDS)
    job = await daemon.submit("noop", {}, delay="10m")
    assert job.run_at == job.available_at == job.created_at + 600
    # EPOCH is 2027-01-15 08:00:00 UTC; the daemon's day zone is UTC by default.
    assert await explained(daemon, job) == "scheduled for 08:10:00 UTC"
    done = await daemon.wait_done(job.id)
    assert done.status == "done"
    assert done.started_at == job.created_at + 600


async def test_a_run_at_on_another_day_says_the_date_and_one_in_the_past_runs_now(
    autojump_clock, start_daemon
):
    daemon = await start_daemon(KINDS)
    tomorrow = datetime.fromtimestamp(EPOCH + 86400 + 3600, UTC).isoformat()
    later = await daemon.submit("noop", {}, run_at=tomorrow)
    assert await explained(daemon, later) == "scheduled for 2027-01-16 09:00:00 UTC"
    past = datetime.fromtimestamp(EPOCH - 3600, UTC).isoformat().replace("+00:00", "Z")
    now = await daemon.submit("noop", {}, run_at=past)
    assert now.run_at is None and now.available_at == now.created_at
    assert (await daemon.wait_done(now.id)).started_at == now.created_at


async def test_the_scheduled_time_is_told_in_the_days_zone(autojump_clock, start_daemon):
    daemon = await start_daemon(KINDS + '\n[budget]\ntimezone = "Europe/Berlin"\n')
    job = await daemon.submit("noop", {}, delay="10m")
    assert await explained(daemon, job) == "scheduled for 09:10:00 CET"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        pytest.param(
            {"run_at": "2027-01-15T09:00:00Z", "delay": "1h"},
            "give run_at or delay, not both",
            id="both",
        ),
        pytest.param({"delay": "soon"}, 'delay: expected a duration like "15m"', id="bad-delay"),
        pytest.param({"delay": "off"}, 'delay: expected a duration like "10m"', id="delay-off"),
        pytest.param(
            {"run_at": "2027-01-15 09:00:00"},
            "run_at: expected an RFC 3339 time with its offset",
            id="no-offset",
        ),
        pytest.param(
            {"delay": "31d"}, "delay: at most 30d ahead (admission.max_delay)", id="beyond-horizon"
        ),
        pytest.param(
            {"run_at": "2027-03-01T00:00:00Z"},
            "run_at: at most 30d ahead (admission.max_delay)",
            id="run-at-beyond-horizon",
        ),
    ],
)
async def test_a_start_time_that_cannot_be_kept_is_refused_naming_the_field(
    autojump_clock, start_daemon, options, message
):
    daemon = await start_daemon(KINDS)
    code, text = await refusal(daemon, **options)
    assert code == "INVALID_REQUEST"
    assert text.startswith(message)


async def test_the_horizon_is_a_config_key(autojump_clock, start_daemon):
    daemon = await start_daemon(KINDS + '\n[admission]\nmax_delay = "1h"\n')
    assert await refusal(daemon, delay="61m") == (
        "INVALID_REQUEST",
        "delay: at most 1h ahead (admission.max_delay)",
    )
    assert (await daemon.submit("noop", {}, delay="1h")).run_at is not None


async def test_a_job_before_its_time_does_not_age_the_queue(autojump_clock, start_daemon):
    daemon = await start_daemon(KINDS)
    await daemon.submit("noop", {}, delay="2h")
    await trio.sleep(3600)
    assert (await ask_admin(daemon, "status"))["data"]["oldest_queued_seconds"] == 0


async def test_show_on_the_admin_socket_says_when_a_delayed_job_starts(
    autojump_clock, start_daemon
):
    daemon = await start_daemon(KINDS)
    submitted = await ask_admin(daemon, "submit", kind="noop", delay="90s", tags=["nightly"])
    job = submitted["data"]["job"]
    shown = (await ask_admin(daemon, "show", job=job["id"]))["data"]
    assert shown["job"]["run_at"] == job["created_at"] + 90
    assert shown["job"]["tags"] == ["nightly"]
    assert shown["waiting"]["reason"] == "scheduled for 08:01:30 UTC"
    assert shown["waiting"]["position"] == 1


# -- tags ------------------------------------------------------------------------------------


async def test_jobs_are_found_by_tag_and_show_their_tags(autojump_clock, start_daemon):
    daemon = await start_daemon(KINDS)
    tagged = await daemon.submit("noop", {}, tags=["batch:7", "eu"])
    await daemon.submit("noop", {}, tags=["us"])
    await daemon.submit("noop", {})
    listed = (await ask_admin(daemon, "jobs", tag="eu"))["data"]["jobs"]
    assert [(job["id"], job["tags"]) for job in listed] == [(tagged.id, ["batch:7", "eu"])]
    assert (await ask_admin(daemon, "jobs", tag="none"))["data"]["jobs"] == []


@pytest.mark.parametrize(
    ("tags", "message"),
    [
        pytest.param(["a b"], "tags: 'a b' is not 1 to 32 letters", id="space"),
        pytest.param([""], "tags: '' is not 1 to 32 letters", id="empty"),
        pytest.param(["x" * 33], "tags: 'xxxxxxxx", id="long"),
        pytest.param([f"t{n}" for n in range(9)], "tags: at most 8, got 9", id="too-many"),
    ],
)
async def test_a_tag_out_of_bounds_is_refused_naming_tags(
    autojump_clock, start_daemon, tags, message
):
    daemon = await start_daemon(KINDS)
    code, text = await refusal(daemon, tags=tags)
    assert code == "INVALID_REQUEST"
    assert text.startswith(message)


# -- holds -----------------------------------------------------------------------------------


async def test_a_held_job_waits_until_released(autojump_clock, start_daemon):
    daemon = await start_daemon(KINDS)
    # Held before dispatch can take it: submitted behind a delay, held, then due.
    job = await daemon.submit("noop", {}, delay="1m")
    held = await ask_admin(daemon, "hold", job=job.id)
    assert held["data"]["job"]["held"] is True
    await trio.sleep(3600)
    assert (await daemon.job(job.id)).status == "queued"
    assert await explained(daemon, job) == "held by an operator"
    released_at = daemon.now
    await ask_admin(daemon, "release", job=job.id)
    done = await daemon.wait_done(job.id)
    assert done.started_at == released_at
    trail = status_trail(await daemon.events(job.id))
    assert trail == [
        ("queued", None),
        ("queued", "HELD"),
        ("queued", "RELEASED"),
        ("running", None),
        ("done", None),
    ]


async def test_only_a_queued_job_is_held(autojump_clock, start_daemon):
    daemon = await start_daemon(KINDS)
    job = await daemon.submit("noop", {})
    await daemon.wait_done(job.id)
    reply = await ask_admin(daemon, "hold", job=job.id)
    assert reply["error"]["code"] == "INVALID_REQUEST"
    assert reply["error"]["message"] == f"job {job.id} is done; only a queued job is held"
    assert (await ask_admin(daemon, "release", job=10**6))["error"]["code"] == "NOT_FOUND"


async def test_a_user_on_hold_keeps_their_jobs_waiting_while_others_run(
    autojump_clock, start_daemon
):
    daemon = await start_daemon(KINDS)
    first = await daemon.submit("noop", {}, user="alice")
    await daemon.wait_done(first.id)
    assert (await ask_admin(daemon, "users", action="hold", name="alice"))["data"]["user"]["held"]
    waiting = await daemon.submit("noop", {}, user="alice")
    other = await daemon.submit("noop", {}, user="bob")
    assert (await daemon.wait_done(other.id)).status == "done"
    await trio.sleep(3600)
    assert (await daemon.job(waiting.id)).status == "queued"
    assert await explained(daemon, waiting) == "user alice on hold"
    released_at = daemon.now
    await ask_admin(daemon, "users", action="release", name="alice")
    assert (await daemon.wait_done(waiting.id)).started_at == released_at
    reply = await ask_admin(daemon, "users", action="hold", name="nobody")
    assert reply["error"]["code"] == "NOT_FOUND"


async def test_a_job_retried_while_its_user_is_on_hold_waits_too(autojump_clock, start_daemon):
    daemon = await start_daemon(KINDS)
    job = await daemon.submit("sleepy", {"seconds": 1, "fail": True}, user="alice")
    await daemon.wait_done(job.id)
    await ask_admin(daemon, "users", action="hold", name="alice")
    await ask_admin(daemon, "retry", job=job.id)
    await trio.sleep(3600)
    assert (await daemon.job(job.id)).status == "queued"
    assert await explained(daemon, job) == "user alice on hold"


async def test_a_held_job_is_not_failed_for_waiting_too_long(autojump_clock, start_daemon):
    daemon = await start_daemon(KINDS + '\n[monitor]\nqueued_timeout = "5m"\n')
    job = await daemon.submit("noop", {}, delay="1m")
    await ask_admin(daemon, "hold", job=job.id)
    await trio.sleep(3600)
    assert (await daemon.job(job.id)).status == "queued"


# -- dependencies ----------------------------------------------------------------------------


async def test_a_dependent_waits_for_its_job_and_starts_when_it_is_done(
    autojump_clock, start_daemon
):
    daemon = await start_daemon(KINDS)
    first = await daemon.submit("sleepy", {"seconds": 60})
    second = await daemon.submit("noop", {}, after=[first.id])
    assert second.after == [first.id]
    assert await explained(daemon, second) == f"waiting for job {first.id}"
    first_done = await daemon.wait_done(first.id)
    second_done = await daemon.wait_done(second.id)
    assert second_done.status == "done"
    # Marked by the write that finished the first: no poll between them.
    assert second_done.started_at == first_done.finished_at


async def test_a_failed_dependency_fails_its_dependents_down_the_chain(
    autojump_clock, start_daemon
):
    daemon = await start_daemon(KINDS)
    first = await daemon.submit("sleepy", {"seconds": 60, "fail": True})
    second = await daemon.submit("noop", {}, after=[first.id])
    third = await daemon.submit("noop", {}, after=[second.id])
    anyway = await daemon.submit("noop", {}, after=[first.id], after_any=True)
    await daemon.wait_done(first.id)
    second_failed = await daemon.wait_done(second.id)
    third_failed = await daemon.wait_done(third.id)
    assert (second_failed.status, second_failed.error.code) == ("failed", "DEPENDENCY_FAILED")
    assert second_failed.error.message == f"job {first.id}, which this job runs after, failed"
    assert (third_failed.status, third_failed.error.code) == ("failed", "DEPENDENCY_FAILED")
    assert (await daemon.wait_done(anyway.id)).status == "done"


async def test_a_canceled_queued_dependency_lets_jobs_after_any_outcome_start(
    autojump_clock, start_daemon
):
    daemon = await start_daemon(KINDS)
    first = await daemon.submit("noop", {}, delay="1h")
    anyway = await daemon.submit("noop", {}, after=[first.id], after_any=True)
    await ask_admin(daemon, "cancel", job=first.id)
    canceled_at = daemon.now
    assert (await daemon.wait_done(anyway.id)).started_at == canceled_at


async def test_a_dependent_is_retried_after_its_dependency(autojump_clock, start_daemon):
    daemon = await start_daemon(KINDS)
    first = await daemon.submit("sleepy", {"seconds": 1, "fail": True})
    second = await daemon.submit("noop", {}, after=[first.id])
    assert (await daemon.wait_done(second.id)).status == "failed"
    refused = await ask_admin(daemon, "retry", job=second.id)
    assert refused["error"]["code"] == "CONFLICT"
    assert refused["error"]["message"] == (
        f"job {second.id} runs after job {first.id}, which has failed; retry job {first.id} first"
    )
    await ask_admin(daemon, "retry", job=first.id)
    await ask_admin(daemon, "retry", job=second.id)
    assert await explained(daemon, second) == f"waiting for job {first.id}"
    # The retried dependency fails again: so does its retried dependent.
    assert (await daemon.wait_done(second.id)).error.code == "DEPENDENCY_FAILED"


@pytest.mark.parametrize(
    ("after", "message"),
    [
        pytest.param([999], "after: no job 999 of user 'alice'", id="unknown"),
        pytest.param(["bob's"], "after: no job {bob} of user 'alice'", id="another-users"),
    ],
)
async def test_a_dependency_the_user_cannot_see_is_refused_naming_it(
    autojump_clock, start_daemon, after, message
):
    daemon = await start_daemon(KINDS)
    bobs = await daemon.submit("noop", {}, user="bob", delay="1h")
    ids = [bobs.id if job == "bob's" else job for job in after]
    code, text = await refusal(daemon, after=ids)
    assert (code, text) == ("INVALID_REQUEST", message.format(bob=bobs.id))


async def test_a_dependency_that_already_failed_is_refused_unless_after_any(
    autojump_clock, start_daemon
):
    daemon = await start_daemon(KINDS)
    failed = await daemon.submit("sleepy", {"seconds": 1, "fail": True})
    await daemon.wait_done(failed.id)
    code, text = await refusal(daemon, after=[failed.id])
    assert code == "INVALID_REQUEST"
    assert text.startswith(f"after: job {failed.id} has failed, so this job would never run")
    anyway = await daemon.submit("noop", {}, after=[failed.id], after_any=True)
    assert (await daemon.wait_done(anyway.id)).status == "done"


# -- the WebSocket ---------------------------------------------------------------------------


async def test_a_user_submits_delayed_tagged_dependent_jobs_over_the_websocket(
    autojump_clock, start_daemon
):
    daemon = await start_daemon(KINDS)
    token = await add_user(daemon, "alice")
    with trio.fail_after(7200):
        async with connect(url_of(daemon), token) as client:
            first = await client.submit("noop", {}, delay="5m", tags=["nightly"])
            second = await client.submit("noop", {}, after=[first.id], tags=["nightly"])
            await client.submit("noop", {})
            tagged = await client.jobs(tag="nightly")
            bobs = await daemon.submit("noop", {}, user="bob")
            with pytest.raises(Exception, match=f"after: no job {bobs.id} of user 'alice'"):
                await client.submit("noop", {}, after=[bobs.id])
    assert [job.id for job in tagged] == [second.id, first.id]
    assert first.run_at == first.created_at + 300
    done = await daemon.wait_done(second.id)
    assert done.started_at == first.created_at + 300
