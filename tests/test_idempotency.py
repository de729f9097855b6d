"""Idempotency keys: a unique active job per (user, key), through the admin socket and the
WebSocket as a client sees it, the window on MockClock, and racing submissions against a real
daemon process."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio
import trio_websocket

from jobwarden.errors import HTTP_STATUS, RequestError
from tests.process import DaemonFactory, daemon_factory
from tests.test_admin import read_lines, request_lines
from tests.test_websocket import Frames, add_user, bearer, url_of

pytestmark = pytest.mark.both_stores

KINDS = """
[kinds.noop]
handler = "tests.handlers:noop"

[kinds.hang]
handler = "tests.handlers:hang"
timeout = "1h"

[kinds.failing]
handler = "tests.handlers:sleepy"
max_attempts = 1
"""

RATE_OF_ONE = """
[limits]
credits = "unlimited"
rate = "1/min"
burst = 1
daily_jobs = 0
max_queued = 0
max_memory_percent = 100
max_cpu_percent = 100
"""


class Answer(msgspec.Struct, kw_only=True):
    """A submit's answer as either door gives it: the job and whether it existed, or the
    error."""

    job: dict[str, Any] | None = None
    existing: bool | None = None
    error: dict[str, Any] | None = None


class AdminDoor:
    """The admin socket, one request at a time."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream
        self._lines = read_lines(stream)
        self._ids = itertools.count(1)

    async def ask(self, cmd: str, **args: Any) -> dict[str, Any]:
        await request_lines(self._stream, {"id": next(self._ids), "cmd": cmd, "args": args})
        return await anext(self._lines)

    async def submit(self, kind: str, payload: Any, **options: Any) -> Answer:
        reply = await self.ask("submit", kind=kind, payload=payload, **options)
        return Answer(**reply["data"]) if reply["ok"] else Answer(error=reply["error"])


class WebSocketDoor:
    """Alice's WebSocket connection, one op at a time."""

    def __init__(self, frames: Frames) -> None:
        self._frames = frames
        self._ids = itertools.count(1)

    async def submit(self, kind: str, payload: Any, **options: Any) -> Answer:
        frame = await self._frames.ask(
            op="submit", id=next(self._ids), kind=kind, payload=payload, **options
        )
        if frame["type"] == "error":
            return Answer(error=frame["error"])
        return Answer(job=frame["job"], existing=frame["existing"])


@pytest.fixture(params=["admin", "websocket"])
def through(request, start_daemon, nursery):
    """Start a daemon for a config snippet and open the door this test runs through."""

    async def open_door(extra: str = ""):
        daemon = await start_daemon(KINDS + extra)
        if request.param == "admin":
            path = daemon.admin_socket
            door: AdminDoor | WebSocketDoor = AdminDoor(await trio.open_unix_socket(path))
        else:
            token = await add_user(daemon, "alice")
            ws = await trio_websocket.connect_websocket_url(
                nursery, url_of(daemon), extra_headers=bearer(token)
            )
            door = WebSocketDoor(Frames(ws))
        return daemon, door

    return open_door


async def test_a_repeat_while_the_job_is_active_returns_that_job(through):
    with trio.fail_after(10):
        daemon, door = await through()
        first = await door.submit("hang", {"page": 1}, idempotency_key="book-1")
        await daemon.wait_status(first.job["id"], {"running"})
        again = await door.submit("hang", {"page": 1}, idempotency_key="book-1")
    assert first.existing is False
    assert (again.job["id"], again.existing, again.job["status"]) == (
        first.job["id"],
        True,
        "running",
    )


@pytest.mark.parametrize(
    ("kind", "payload", "named"),
    [("hang", {"page": 2}, "payload"), ("noop", {"page": 1}, "kind")],
    ids=["other-payload", "other-kind"],
)
async def test_the_key_of_an_active_job_for_other_work_is_a_conflict(through, kind, payload, named):
    with trio.fail_after(10):
        daemon, door = await through()
        first = await door.submit("hang", {"page": 1}, idempotency_key="book-1")
        other = await door.submit(kind, payload, idempotency_key="book-1")
        assert (await daemon.job(first.job["id"])).status in {"queued", "running"}
    assert other.error is not None
    assert other.error["code"] == "CONFLICT"
    assert HTTP_STATUS[other.error["code"]] == 409
    assert other.error["retryable"] is False
    assert f"belongs to job {first.job['id']}" in other.error["message"]
    assert f"another {named}" in other.error["message"]


async def test_a_finished_jobs_key_starts_a_new_job(through):
    with trio.fail_after(10):
        daemon, door = await through()
        first = await door.submit("noop", {"page": 1}, idempotency_key="book-1")
        await daemon.wait_done(first.job["id"])
        second = await door.submit("noop", {"page": 1}, idempotency_key="book-1")
        done = await daemon.wait_done(second.job["id"])
    assert (second.existing, second.job["status"]) == (False, "queued")
    assert second.job["id"] != first.job["id"]
    assert done.result == {"echo": {"page": 1}}


async def test_within_the_window_a_finished_jobs_key_returns_that_job(through):
    window = '\n[admission]\nidempotency_window = "1h"\n'
    with trio.fail_after(10):
        daemon, door = await through(window)
        first = await door.submit("noop", {"page": 1}, idempotency_key="book-1")
        await daemon.wait_done(first.job["id"])
        again = await door.submit("noop", {"page": 1}, idempotency_key="book-1")
        other = await door.submit("noop", {"page": 2}, idempotency_key="book-1")
    assert (again.job["id"], again.existing) == (first.job["id"], True)
    assert (again.job["status"], again.job["result"]) == ("done", {"echo": {"page": 1}})
    assert other.error is not None
    assert other.error["code"] == "CONFLICT"
    assert f"job {first.job['id']} (done)" in other.error["message"]


async def test_a_repeat_of_an_active_job_is_answered_without_a_rate_token(through):
    with trio.fail_after(10):
        _, door = await through(RATE_OF_ONE)
        first = await door.submit("hang", {"page": 1}, idempotency_key="book-1")
        repeats = [await door.submit("hang", {"page": 1}, idempotency_key="book-1") for _ in "ab"]
        new_work = await door.submit("hang", {"page": 2})
    assert [(r.job["id"], r.existing) for r in repeats] == [(first.job["id"], True)] * 2
    # The bucket is real: the first submission took its only token.
    assert new_work.error is not None
    assert new_work.error["code"] == "RATE_LIMITED"


async def test_a_repeat_spends_no_token_that_new_work_then_lacks(autojump_clock, start_daemon):
    daemon = await start_daemon(KINDS + RATE_OF_ONE.replace("burst = 1", "burst = 2"))
    first = await daemon.submit("hang", {"page": 1}, idempotency_key="book-1")
    for _ in range(5):
        assert (await daemon.submit("hang", {"page": 1}, idempotency_key="book-1")).id == first.id
    # A conflict is answered without a token too.
    with pytest.raises(RequestError) as conflict:
        await daemon.submit("hang", {"page": 9}, idempotency_key="book-1")
    assert conflict.value.body.code == "CONFLICT"
    second = await daemon.submit("hang", {"page": 2}, idempotency_key="book-2")
    assert second.id != first.id
    with pytest.raises(RequestError) as refused:
        await daemon.submit("hang", {"page": 3})
    assert refused.value.body.code == "RATE_LIMITED"


async def test_the_window_ends_and_the_key_starts_a_new_job(autojump_clock, start_daemon):
    daemon = await start_daemon(KINDS + '\n[admission]\nidempotency_window = "10m"\n')
    first = await daemon.submit("noop", {"page": 1}, idempotency_key="book-1")
    finished_at = (await daemon.wait_done(first.id)).finished_at
    assert finished_at is not None
    await trio.sleep(finished_at + 599 - daemon.now)
    assert (await daemon.submit("noop", {"page": 1}, idempotency_key="book-1")).id == first.id
    await trio.sleep(2)
    later = await daemon.submit("noop", {"page": 1}, idempotency_key="book-1")
    assert later.id != first.id
    assert later.status == "queued"


async def test_a_retry_of_a_job_whose_key_is_taken_again_is_a_conflict(start_daemon):
    daemon = await start_daemon(KINDS)
    path = daemon.admin_socket
    with trio.fail_after(10):
        admin = AdminDoor(await trio.open_unix_socket(path))
        failed = await admin.submit("failing", {"fail": True, "seconds": 0}, idempotency_key="k")
        assert (await daemon.wait_done(failed.job["id"])).status == "failed"
        newer = await admin.submit("hang", {}, idempotency_key="k")
        refused = await admin.ask("retry", job=failed.job["id"])
        assert (await daemon.job(failed.job["id"])).status == "failed"
        await admin.ask("cancel", job=newer.job["id"])
        await daemon.wait_done(newer.job["id"])
        retried = await admin.ask("retry", job=failed.job["id"])
    assert newer.existing is False
    assert refused["ok"] is False
    assert refused["error"]["code"] == "CONFLICT"
    assert f"belongs to job {newer.job['id']}" in refused["error"]["message"]
    assert retried["ok"] is True
    assert retried["data"]["job"]["status"] == "queued"


# -- racing submissions against a real daemon -------------------------------------------------


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[DaemonFactory]:
    yield from daemon_factory(tmp_path)


def test_racing_submissions_with_one_key_make_exactly_one_job(daemons):
    """Sixteen clients at once, each on its own connection, so that their submissions land
    in several admission batches and store writes: while the key's job runs, and again
    after it has ended. A rate limit is set, so each first goes through the read that
    answers repeats before the bucket."""
    daemon = daemons(
        {
            "limits": {"rate": "6000/min", "burst": 100},
            "kinds": {"slow": {"handler": "tests.handlers:sleepy"}},
        }
    )

    def submit(kind: str, payload: dict[str, Any]) -> dict[str, Any]:
        with daemon.client() as client:
            return client.call("submit", kind=kind, payload=payload, idempotency_key="race")

    def race(kind: str, payload: dict[str, Any]) -> list[dict[str, Any]]:
        with ThreadPoolExecutor(16) as pool:
            return list(pool.map(lambda _: submit(kind, payload), range(16)))

    while_running = race("slow", {"seconds": 30})
    assert len({reply["job"]["id"] for reply in while_running}) == 1
    assert sorted(reply["existing"] for reply in while_running) == [False] + [True] * 15
    first = while_running[0]["job"]["id"]
    with daemon.client() as client:
        assert client.call("cancel", job=first)["job"]["status"] == "canceled"
    after_it_ended = race("slow", {"seconds": 30})
    ids = {reply["job"]["id"] for reply in after_it_ended}
    assert len(ids) == 1 and first not in ids
    assert sorted(reply["existing"] for reply in after_it_ended) == [False] + [True] * 15
    with daemon.client() as client:
        listed = client.call("jobs", limit=100)["jobs"]
    assert sorted(job["id"] for job in listed) == sorted([first, *ids])
