"""Batch submit: many jobs in one request and one commit, each item with its own result, or
all or none; over the admin socket, the WebSocket, the CLI and a real daemon process."""

from __future__ import annotations

import json
import subprocess
from functools import partial

import msgspec
import pytest
import trio

from jobwarden.actors.messages import Submit, SubmitMany
from jobwarden.client import connect
from jobwarden.errors import RequestError
from jobwarden.mailbox import ReplySlot, ask
from jobwarden.store import jobs
from jobwarden.wire.views import ErrorBody, JobFilter, JobView, Submission
from tests.conftest import opened_database
from tests.process import daemon_factory, run_jobwarden
from tests.test_admin import ask_admin
from tests.test_guards import KINDS, limits
from tests.test_websocket import Frames, add_user, open_frames, url_of

pytestmark = pytest.mark.both_stores


async def submit_many(
    daemon, items: list[dict], *, atomic: bool = False, user: str = "alice"
) -> list[tuple[JobView, bool] | ErrorBody]:
    """A batch sent to admission as the command layer sends it: each item's job, or its
    refusal."""
    submits = [Submit(user=user, reply=ReplySlot(), **{"payload": {}, **item}) for item in items]
    await ask(daemon.handle.admission, SubmitMany, items=submits, atomic=atomic)
    results: list[tuple[JobView, bool] | ErrorBody] = []
    for submit in submits:
        try:
            results.append(await submit.reply.wait())
        except RequestError as exc:
            results.append(exc.body)
    return results


async def stored_jobs(daemon) -> list[JobView]:
    return await daemon.handle.store.read(
        partial(jobs.list_jobs, statuses=None, kind=None, user=None, limit=10_000)
    )


async def test_each_item_meets_the_guards_in_order_and_gets_its_own_result(
    autojump_clock, start_daemon
):
    daemon = await start_daemon(limits(daily_jobs=3) + KINDS)
    results = await submit_many(
        daemon,
        [{"kind": "noop"}, {"kind": "nope"}, {"kind": "noop"}, {"kind": "noop"}, {"kind": "noop"}],
    )
    codes = [r.code if isinstance(r, ErrorBody) else "accepted" for r in results]
    assert codes == ["accepted", "INVALID_REQUEST", "accepted", "accepted", "DAILY_LIMIT"]
    # One write: the accepted jobs were inserted at one moment, in the items' order.
    accepted = [r[0] for r in results if not isinstance(r, ErrorBody)]
    assert len({job.created_at for job in accepted}) == 1
    assert [job.id for job in accepted] == sorted(job.id for job in accepted)


async def test_an_atomic_batch_refused_in_the_store_leaves_nothing_behind(
    autojump_clock, start_daemon
):
    daemon = await start_daemon(limits(daily_jobs=3) + KINDS)
    with pytest.raises(RequestError) as caught:
        await submit_many(daemon, [{"kind": "noop"}] * 4, atomic=True)
    assert caught.value.body.code == "DAILY_LIMIT"
    assert caught.value.body.message.startswith("item 3: user 'alice' has submitted 3 of 3")
    assert await stored_jobs(daemon) == []
    # The daily count was rolled back with the jobs: three still fit today.
    results = await submit_many(daemon, [{"kind": "noop"}] * 3, atomic=True)
    assert all(not isinstance(result, ErrorBody) for result in results)


async def test_an_atomic_batch_refused_in_memory_gives_its_rate_tokens_back(
    autojump_clock, start_daemon
):
    daemon = await start_daemon(limits(rate='"1/min"', burst=3) + KINDS)
    with pytest.raises(RequestError) as caught:
        await submit_many(
            daemon, [{"kind": "noop"}, {"kind": "noop"}, {"kind": "nope"}], atomic=True
        )
    assert caught.value.body.code == "INVALID_REQUEST"
    assert caught.value.body.message.startswith("item 2: unknown kind 'nope'")
    assert await stored_jobs(daemon) == []
    # The whole burst is still there for a batch that passes.
    results = await submit_many(daemon, [{"kind": "noop"}] * 3, atomic=True)
    assert len([r for r in results if not isinstance(r, ErrorBody)]) == 3
    with pytest.raises(RequestError) as caught:
        await submit_many(daemon, [{"kind": "noop"}], atomic=True)
    assert caught.value.body.code == "RATE_LIMITED"


async def test_a_batch_over_the_item_limit_is_refused_whole(autojump_clock, start_daemon):
    daemon = await start_daemon("[admission]\nmax_batch_items = 2\n" + KINDS)
    with pytest.raises(RequestError) as caught:
        await submit_many(daemon, [{"kind": "noop"}] * 3)
    assert caught.value.body.code == "INVALID_REQUEST"
    assert caught.value.body.message == ("submit_many: a batch has 1 to 2 items, this one has 3")
    assert await stored_jobs(daemon) == []


async def test_a_repeated_key_in_a_batch_returns_the_job_it_made(autojump_clock, start_daemon):
    daemon = await start_daemon(KINDS)
    first, again = await submit_many(
        daemon, [{"kind": "noop", "idempotency_key": "k"}] * 2, atomic=True
    )
    assert not isinstance(first, ErrorBody) and not isinstance(again, ErrorBody)
    assert again == (first[0], True)


async def test_submit_many_on_the_admin_socket(start_daemon):
    daemon = await start_daemon(limits(daily_jobs=2) + KINDS)
    with trio.fail_after(10):
        reply = await ask_admin(
            daemon,
            "submit_many",
            user="carol",
            items=[
                {"kind": "noop", "payload": {"n": 1}},
                {"kind": "noop", "payload": {"n": 2}, "priority": 5},
                {"kind": "noop", "payload": {"n": 3}},
            ],
        )
    data = reply["data"]
    assert (data["accepted"], data["existing"], data["refused"]) == (2, 0, 1)
    assert [r["job"]["payload"] for r in data["results"][:2]] == [{"n": 1}, {"n": 2}]
    assert data["results"][1]["job"]["priority"] == 5
    assert data["results"][0]["job"]["user"] == "carol"
    assert data["results"][2]["error"]["code"] == "DAILY_LIMIT"
    with trio.fail_after(10):
        refused = await ask_admin(
            daemon, "submit_many", user="dave", items=[{"kind": "noop", "colour": "red"}]
        )
    assert refused["error"]["message"] == "submit_many: items.0.colour: unknown key"


async def test_submit_many_over_the_websocket_is_the_users_own(start_daemon):
    daemon = await start_daemon(KINDS)
    token = await add_user(daemon, "erin")
    with trio.fail_after(10):
        async with open_frames(daemon, token) as ws:
            frames = Frames(ws)
            reply = await frames.ask(
                op="submit_many",
                id=1,
                items=[{"kind": "noop"}, {"kind": "nope"}],
            )
            atomic = await frames.ask(
                op="submit_many", id=2, atomic=True, items=[{"kind": "noop"}, {"kind": "nope"}]
            )
    assert reply["type"] == "submitted"
    assert (reply["accepted"], reply["refused"]) == (1, 1)
    assert reply["results"][0]["job"]["user"] == "erin"
    assert reply["results"][1]["error"]["code"] == "INVALID_REQUEST"
    assert atomic["type"] == "error"
    assert atomic["error"]["message"].startswith("item 1: unknown kind 'nope'")


@pytest.fixture
def daemons(tmp_path):
    yield from daemon_factory(tmp_path)


def test_a_thousand_lines_from_stdin_land_in_one_commit_that_survives_kill_9(daemons):
    daemon = daemons({"kinds": {"quick": {"handler": "tests.handlers:sleepy"}}})
    lines = "".join(json.dumps({"seconds": 0, "n": n}) + "\n" for n in range(1000))
    done = run_jobwarden(
        "submit",
        "quick",
        "--file",
        "-",
        "--socket",
        str(daemon.socket_path),
        cwd=daemon.directory,
        timeout=60,
        stdin=lines,
    )
    assert (done.returncode, done.stdout) == (0, "submitted 1,000 jobs, 0 refused\n")
    daemon.kill9()
    with opened_database(daemon.database) as conn:
        created = conn.execute("SELECT COUNT(*), COUNT(DISTINCT created_at) FROM jobs").fetchone()
        payloads = [json.loads(row[0])["n"] for row in conn.execute("SELECT payload FROM jobs")]
    # Every job was inserted by one write at one moment: one transaction, one commit.
    assert created == (1000, 1)
    assert sorted(payloads) == list(range(1000))


def test_the_cli_reports_each_refused_line_and_an_atomic_refusal_by_line(daemons, tmp_path):
    daemon = daemons(
        {"limits": {"daily_jobs": 2}, "kinds": {"quick": {"handler": "tests.handlers:sleepy"}}}
    )
    jobs_file = tmp_path / "jobs.jsonl"
    jobs_file.write_text('{"seconds": 0}\n\n{"seconds": 0}\n{"seconds": 0}\n')
    socket = ["--socket", str(daemon.socket_path)]

    def run(*args: str) -> subprocess.CompletedProcess:
        return run_jobwarden(*args, *socket, cwd=daemon.directory, timeout=60)

    atomic = run("submit", "quick", "--file", str(jobs_file), "--atomic", "--user", "u1")
    assert atomic.returncode == 1
    assert atomic.stderr.startswith("error DAILY_LIMIT: line 4: user 'u1' has submitted 2 of 2")
    partly = run("submit", "quick", "--file", str(jobs_file), "--user", "u1")
    assert partly.returncode == 1
    assert partly.stdout.splitlines() == [
        "submitted 2 jobs, 1 refused",
        "line 4: DAILY_LIMIT: user 'u1' has submitted 2 of 2 jobs today",
    ]
    as_json = json.loads(run("submit", "quick", "--file", str(jobs_file), "--json").stdout)
    assert [result["line"] for result in as_json["results"]] == [1, 3, 4]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"seconds": 0}\n[1]\n')
    usage = run("submit", "quick", "--file", str(bad))
    assert usage.returncode == 2
    assert f"{bad}, line 2: must be a JSON object" in usage.stderr


def test_a_single_payload_from_a_file_or_stdin(daemons, tmp_path):
    daemon = daemons({"kinds": {"quick": {"handler": "tests.handlers:sleepy"}}})
    payload = tmp_path / "payload.json"
    payload.write_text('{"seconds": 0, "from": "file"}')
    socket = ["--socket", str(daemon.socket_path), "--json"]
    for args, stdin, source in (
        (["@" + str(payload)], None, "file"),
        (["-"], '{"seconds": 0, "from": "stdin"}', "stdin"),
    ):
        done = run_jobwarden(
            "submit", "quick", *args, *socket, cwd=daemon.directory, timeout=60, stdin=stdin
        )
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["job"]["payload"]["from"] == source


async def test_the_python_client_submits_a_batch_and_previews_a_bulk_cancel(start_daemon):
    daemon = await start_daemon(KINDS)
    token = await add_user(daemon, "erin")
    items = [Submission(kind="sleepy", payload={"seconds": 3600, "n": n}) for n in range(3)]
    with trio.fail_after(10):
        async with connect(url_of(daemon), token) as client:
            batch = await client.submit_many([*items, Submission(kind="nope")])
            again = await client.submit_many(
                [msgspec.structs.replace(items[0], idempotency_key="k")] * 2, atomic=True
            )
            canceled = await client.cancel_many(JobFilter(kind="sleepy"), dry_run=True)
    assert (batch.accepted, batch.refused) == (3, 1)
    assert [result.job.payload["n"] for result in batch.results[:3]] == [0, 1, 2]
    assert batch.results[3].error.code == "INVALID_REQUEST"
    assert again.results[1].existing and again.results[1].job == again.results[0].job
    # The batch's three and the one its resend did not double.
    assert (canceled.dry_run, canceled.matched) == (True, 4)


async def test_an_atomic_batch_the_store_fails_on_is_internal_and_admission_goes_on(
    autojump_clock, start_daemon, monkeypatch
):
    daemon = await start_daemon(KINDS)

    def broken(conn, events, **batch):
        raise RuntimeError("a bug in the write")

    monkeypatch.setattr(jobs, "insert_all_or_none", broken)
    with pytest.raises(RequestError) as caught:
        await submit_many(daemon, [{"kind": "noop"}], atomic=True)
    assert caught.value.body.code == "INTERNAL"
    assert (await daemon.submit("noop")).status == "queued"
