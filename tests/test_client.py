"""The HTTP client as an application uses it: a sync script, an asyncio web app and a trio
program each submit a job and get its result from a real daemon over its real HTTP port."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from jobwarden.client import AsyncClient, Client, JobCanceled, JobFailed, Refused
from tests.process import DaemonFactory, DaemonProcess, daemon_env, daemon_factory, free_port

CONFIG: dict[str, Any] = {
    "kinds": {
        "quick": {"handler": "tests.handlers:sleepy"},
        "steps": {"handler": "tests.handlers:stepper"},
        "broken": {"handler": "tests.handlers:crashing", "max_attempts": 1},
        "hang": {"handler": "tests.handlers:hang"},
        "chatty": {"handler": "tests.handlers:chatty"},
    },
}


# A user's own rate with no burst: the second submission within the rate's interval waits.
ONE_AT_A_TIME = {**CONFIG, "limits": {"burst": 1}}


class Api:
    """A running daemon's HTTP API and a user's token for it."""

    def __init__(self, daemon: DaemonProcess, name: str = "alice", **limits: Any) -> None:
        ready = daemon.wait_for_log(lambda line: line.get("event") == "jobwarden ready")
        self.url = f"http://127.0.0.1:{ready['http_port']}"
        self.daemon = daemon
        with daemon.client() as admin:
            self.token = admin.call("users", action="add", name=name, **limits)["token"]


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[DaemonFactory]:
    yield from daemon_factory(tmp_path)


@pytest.fixture
def api(daemons: DaemonFactory) -> Api:
    return Api(daemons(CONFIG))


def test_a_sync_client_submits_and_gets_the_result(api: Api) -> None:
    with Client(api.url, api.token) as client:
        job = client.submit("quick", {"seconds": 0.05})
        assert not job.existing
        assert job.result(timeout=20) == {"slept": 0.05}
        assert client.get(job.id).status == "done"
        assert [listed.id for listed in client.jobs(status="done")] == [job.id]


def test_a_failed_job_raises_job_failed_with_its_code_and_error_id(api: Api) -> None:
    with Client(api.url, api.token) as client:
        job = client.submit("broken", {})
        with pytest.raises(JobFailed) as failed:
            job.result(timeout=20)
    assert failed.value.code == "HANDLER_ERROR"
    assert failed.value.error_id
    assert "division by zero" in failed.value.error_message


def test_a_canceled_job_raises_job_canceled(api: Api) -> None:
    with Client(api.url, api.token) as client:
        job = client.submit("hang", {})
        with pytest.raises(TimeoutError):
            job.result(timeout=0.2)
        job.cancel()
        with pytest.raises(JobCanceled):
            job.result(timeout=20)


def test_events_follow_a_job_from_queued_to_done_in_order(api: Api) -> None:
    with Client(api.url, api.token) as client:
        job = client.submit("steps", {"steps": 3, "step_seconds": 0.05})
        events = list(job.events())
    seqs = [event.seq for event in events]
    assert seqs == sorted(set(seqs))
    statuses = [event.data["status"] for event in events if event.type == "status"]
    assert statuses == ["queued", "running", "done"]
    assert [e.data["fraction"] for e in events if e.type == "progress"][-1] == pytest.approx(1.0)


def test_the_same_idempotency_key_gives_the_same_job(api: Api) -> None:
    with Client(api.url, api.token) as client:
        first = client.submit("hang", {}, idempotency_key="order-7")
        again = client.submit("hang", {}, idempotency_key="order-7")
        first.cancel()
    assert (again.id, again.existing) == (first.id, True)


def test_a_refusal_raises_refused_with_code_and_retry_after(daemons: DaemonFactory) -> None:
    api = Api(daemons(ONE_AT_A_TIME), rate="1/min")
    with Client(api.url, api.token) as client:
        client.submit("quick", {"seconds": 0})
        with pytest.raises(Refused) as refused:
            client.submit("quick", {"seconds": 0})
    assert refused.value.code == "RATE_LIMITED"
    assert refused.value.status == 429
    assert refused.value.retry_after is not None and refused.value.retry_after > 0


def test_wait_if_limited_honours_retry_after(daemons: DaemonFactory) -> None:
    # One token a second: the second submission waits about a second, then goes in.
    api = Api(daemons(ONE_AT_A_TIME), rate="60/min")
    with Client(api.url, api.token) as client:
        jobs = [
            client.submit("quick", {"seconds": 0}, wait_if_limited=True, limited_timeout=30)
            for _ in range(3)
        ]
    assert len({job.id for job in jobs}) == 3


def test_a_wrong_token_is_refused_as_unauthenticated(api: Api) -> None:
    with Client(api.url, "jw_not-a-token") as client, pytest.raises(Refused) as refused:
        client.submit("quick", {})
    assert (refused.value.status, refused.value.code) == (401, "UNAUTHENTICATED")


def test_an_asyncio_web_app_submits_and_awaits_the_result(api: Api) -> None:
    """The FastAPI shape of docs/client.md, on Starlette (FastAPI's base) under asyncio."""

    async def render(request: Request) -> JSONResponse:
        async with AsyncClient(api.url, api.token) as jobs:
            job = await jobs.submit("quick", {"seconds": 0.05})
            return JSONResponse({"job": job.id, "result": await job.result(timeout=20)})

    app = Starlette(routes=[Route("/render", render, methods=["POST"])])

    async def main() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as browser:
            return await browser.post("/render")

    response = asyncio.run(main())
    assert response.status_code == 200
    assert response.json()["result"] == {"slept": 0.05}


async def test_the_async_client_runs_under_trio_too(api: Api) -> None:
    async with AsyncClient(api.url, api.token) as client:
        job = await client.submit("steps", {"steps": 2, "step_seconds": 0.01})
        seen = [event.type async for event in job.events()]
        assert await job.result(timeout=20) is not None
        assert [listed.id async for listed in client.jobs()] == [job.id]
    assert seen[0] == "status" and "progress" in seen


def test_a_plain_sync_script_gets_its_result(api: Api, tmp_path: Path) -> None:
    script = tmp_path / "script.py"
    script.write_text(
        textwrap.dedent(
            f"""
            from jobwarden.client import Client

            with Client({api.url!r}, {api.token!r}) as client:
                job = client.submit("quick", {{"seconds": 0.01}})
                print(job.result(timeout=20))
            """
        )
    )
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=daemon_env(), timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "{'slept': 0.01}"


def test_the_cli_submits_and_watches_over_the_http_api(api: Api, tmp_path: Path) -> None:
    done = subprocess.run(
        [
            *(sys.executable, "-m", "jobwarden.cli", "submit", "quick", '{"seconds": 0.01}'),
            *("--url", api.url, "--watch", "--json"),
        ],
        capture_output=True,
        text=True,
        env={**daemon_env(), "JOBWARDEN_TOKEN": api.token},
        cwd=tmp_path,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert '"status":"done"' in done.stdout.replace(" ", "")


def test_events_resume_across_a_daemon_restart_without_gap_or_duplicate(
    daemons: DaemonFactory,
) -> None:
    port = free_port()
    daemon = daemons({**CONFIG, "http": {"listen": f"127.0.0.1:{port}"}})
    api = Api(daemon)
    events = []
    with Client(api.url, api.token) as client:
        job = client.submit("steps", {"steps": 4, "step_seconds": 0.3})
        for event in job.events():
            events.append(event)
            if event.type == "progress" and event.data["fraction"] == 0.25:
                # The stream breaks under the client; the job is recovered by the restart and
                # resumes from its checkpoint.
                daemon.kill9()
                daemon.start()
    seqs = [event.seq for event in events]
    assert seqs == sorted(set(seqs)), "every event once, in order"
    statuses = [event.data["status"] for event in events if event.type == "status"]
    assert statuses[-1] == "done"
    assert "queued" in statuses[1:], "the recovery after the restart was followed"


def test_a_batch_goes_in_one_request_and_a_job_s_log_is_read(api: Api) -> None:
    with Client(api.url, api.token) as client:
        batch = client.submit_many(
            [
                {"kind": "chatty", "payload": {"lines": 2}},
                {"kind": "quick", "payload": {"seconds": 0}},
                {"kind": "no-such-kind", "payload": {}},
            ]
        )
        assert (batch.accepted, batch.refused) == (2, 1)
        assert batch.results[2].error.code == "INVALID_REQUEST"
        chatty = client.get(batch.results[0].job.id)
        chatty.result(timeout=20)
        lines = [line.line for line in chatty.logs().lines]
    assert lines[:2] == ["line 0", "line 1"]
