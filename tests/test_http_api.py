"""The /v1 HTTP API of a real `jobwarden serve`, spoken to over its port with httpx: statuses,
headers and bodies as an application sees them."""

from __future__ import annotations

import contextlib
import json
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from openapi_spec_validator import validate

from tests.process import DaemonFactory, DaemonProcess, daemon_factory, run_jobwarden

KINDS = {
    "quick": {"handler": "tests.handlers:sleepy"},
    "hang": {"handler": "tests.handlers:hang"},
    "flaky": {"handler": "tests.handlers:flaky", "max_attempts": 1},
    "chatty": {"handler": "tests.handlers:chatty"},
}


@dataclass
class Api:
    daemon: DaemonProcess
    http: httpx.Client
    operator: dict[str, str]

    def user(self, name: str, **limits: object) -> dict[str, str]:
        """Add a user over the API; the headers that speak as them."""
        response = self.http.post("/v1/users", json={"name": name, **limits}, headers=self.operator)
        assert response.status_code == 201, response.text
        return {"Authorization": f"Bearer {response.json()['token']}"}

    def submit(self, headers: dict[str, str], kind: str = "quick", **body: object) -> dict:
        response = self.http.post("/v1/jobs", json={"kind": kind, **body}, headers=headers)
        assert response.status_code == 202, response.text
        return response.json()

    def final(self, headers: dict[str, str], job_id: int) -> dict:
        response = self.http.get(f"/v1/jobs/{job_id}/result?wait=20s", headers=headers)
        assert response.status_code == 200, response.text
        return response.json()


def start_api(daemons: DaemonFactory, config: dict | None = None, *, name: str = "d") -> Api:
    daemon = daemons({"kinds": KINDS, **(config or {})}, name=name)
    added = run_jobwarden(
        "tokens",
        "add",
        "--operator",
        "ci",
        "--config",
        str(daemon.config_path),
        cwd=daemon.directory,
    )
    assert added.returncode == 0, added.stderr
    token = next(line.split()[-1] for line in added.stdout.splitlines() if line.startswith("token"))
    port = daemon.logs("jobwarden ready")[-1]["http_port"]
    http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
    return Api(daemon, http, {"Authorization": f"Bearer {token}"})


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    for daemons in daemon_factory(tmp_path_factory.mktemp("api")):
        started = start_api(daemons)
        with started.http:
            yield started


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[DaemonFactory]:
    yield from daemon_factory(tmp_path)


@contextlib.contextmanager
def post_by_hand(api: Api, rest: str) -> Iterator[socket.socket]:
    """A connection that sent POST /v1/jobs as the operator, its other headers and whatever of
    a body are in `rest`: what a client library never sends."""
    port = api.daemon.logs("jobwarden ready")[-1]["http_port"]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        head = (
            f"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: {api.operator['Authorization']}"
        )
        sock.sendall(f"{head}\r\n{rest}".encode())
        yield sock


def answer_of(sock: socket.socket) -> tuple[bytes, bytes]:
    """The head and body of the answer, read until the daemon closes the connection."""
    answer = b""
    while chunk := sock.recv(65536):
        answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return head, body


def error_of(response: httpx.Response) -> dict:
    """The common error shape, which every refusal carries."""
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert {"code", "message", "retryable", "error_id"} <= set(body), body
    return body


# -- submitting ------------------------------------------------------------------------------


def test_a_submission_is_accepted_with_its_location_and_a_repeat_returns_the_same_job(api):
    alice = api.user("alice")
    submitted = {"kind": "hang", "payload": {"n": 1}, "idempotency_key": "book-1"}
    response = api.http.post("/v1/jobs", json=submitted, headers=alice)
    assert response.status_code == 202
    job = response.json()
    assert response.headers["location"] == f"/v1/jobs/{job['id']}"
    assert response.headers["x-response-time"].endswith("ms")
    assert (job["user"], job["kind"], job["status"]) == ("alice", "hang", "queued")

    again = api.http.post("/v1/jobs", json=submitted, headers=alice)
    assert again.status_code == 200
    assert again.json()["id"] == job["id"]
    assert again.headers["location"] == f"/v1/jobs/{job['id']}"

    changed = api.http.post("/v1/jobs", json={**submitted, "payload": {"n": 2}}, headers=alice)
    assert (changed.status_code, error_of(changed)["code"]) == (409, "CONFLICT")
    api.http.post(f"/v1/jobs/{job['id']}/cancel", headers=alice)


def test_a_body_that_does_not_decode_is_400_naming_the_field(api):
    alice = api.user("alice-400")
    cases = {
        b'{"kind": 3}': "kind: Expected `str`, got `int`",
        b'{"kind": "quick", "priorty": 1}': "priorty: unknown key",
        b'{"payload": {}}': "Object missing required field `kind`",
        b"{not json": "not valid JSON",
        b"": "the body is empty",
        b'{"kind": "nope"}': "unknown kind 'nope'",
    }
    for body, message in cases.items():
        response = api.http.post("/v1/jobs", content=body, headers=alice)
        assert response.status_code == 400, body
        error = error_of(response)
        assert error["code"] == "INVALID_REQUEST"
        assert message in error["message"], (body, error)


# -- who may see what ------------------------------------------------------------------------


def test_a_user_sees_and_touches_only_their_own_jobs_and_the_operator_all(api):
    carol, dave = api.user("carol"), api.user("dave")
    job = api.submit(carol, "hang")

    for method, path in [
        ("GET", f"/v1/jobs/{job['id']}"),
        ("POST", f"/v1/jobs/{job['id']}/cancel"),
        ("GET", f"/v1/jobs/{job['id']}/result"),
        ("GET", f"/v1/jobs/{job['id']}/events"),
    ]:
        response = api.http.request(method, path, headers=dave)
        assert (response.status_code, error_of(response)["code"]) == (404, "NOT_FOUND"), path
    assert api.http.get("/v1/jobs", headers=dave).json() == {"jobs": [], "next_cursor": None}
    others = api.http.get("/v1/jobs?user=carol", headers=dave)
    assert (others.status_code, error_of(others)["code"]) == (403, "FORBIDDEN")
    as_carol = api.http.post("/v1/jobs", json={"kind": "quick", "user": "carol"}, headers=dave)
    assert as_carol.status_code == 403

    listed = api.http.get("/v1/jobs?user=carol", headers=api.operator).json()["jobs"]
    assert [each["id"] for each in listed] == [job["id"]]
    for_erin = api.http.post(
        "/v1/jobs", json={"kind": "quick", "user": "erin"}, headers=api.operator
    )
    assert (for_erin.status_code, for_erin.json()["user"]) == (202, "erin")

    canceled = api.http.post(f"/v1/jobs/{job['id']}/cancel", headers=carol)
    assert canceled.status_code == 200
    result = api.http.get(f"/v1/jobs/{job['id']}/result?wait=10s", headers=carol)
    assert result.status_code == 200
    assert result.json()["status"] == "canceled"


def test_tokens_missing_wrong_revoked_or_of_a_user_on_an_operators_route(api):
    response = api.http.get("/v1/jobs")
    assert (response.status_code, response.headers["www-authenticate"]) == (401, "Bearer")
    assert error_of(response)["code"] == "UNAUTHENTICATED"
    for token in ("jw_nope", "jwo_nope", "Basic abc"):
        response = api.http.get("/v1/jobs", headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 401, token

    frank = api.user("frank")
    for method, path in [
        ("GET", "/v1/breakers"),
        ("GET", "/v1/users"),
        ("PUT", "/v1/budget"),
        ("POST", "/v1/pause"),
        ("GET", "/v1/status"),
    ]:
        response = api.http.request(method, path, headers=frank)
        assert (response.status_code, error_of(response)["code"]) == (403, "FORBIDDEN"), path

    disabled = api.http.patch("/v1/users/frank", json={"disabled": True}, headers=api.operator)
    assert (disabled.status_code, disabled.json()["user"]["disabled"]) == (200, True)
    assert api.http.get("/v1/jobs", headers=frank).status_code == 401

    config = ["--config", str(api.daemon.config_path)]
    cwd = api.daemon.directory
    added = run_jobwarden("tokens", "add", "--operator", "temp", *config, cwd=cwd)
    temp = {"Authorization": f"Bearer {added.stdout.split('token')[1].split()[0]}"}
    assert api.http.get("/v1/breakers", headers=temp).status_code == 200
    listed = run_jobwarden("tokens", "list", "--json", *config, cwd=cwd)
    names = [token["name"] for token in json.loads(listed.stdout)["tokens"]]
    assert names == ["ci", "temp"]
    assert "jwo_" not in listed.stdout
    assert run_jobwarden("tokens", "revoke", "temp", *config, cwd=cwd).returncode == 0
    assert api.http.get("/v1/breakers", headers=temp).status_code == 401
    again = run_jobwarden("tokens", "revoke", "temp", *config, cwd=cwd)
    assert again.returncode == 2 and "no operator token 'temp'" in again.stderr


# -- listing, results, events ----------------------------------------------------------------


def test_jobs_are_listed_newest_first_a_page_at_a_time(api):
    grace = api.user("grace")
    ids = [api.submit(grace, payload={"seconds": 0})["id"] for _ in range(5)]
    for job_id in ids:
        api.final(grace, job_id)

    seen, cursor = [], None
    while True:
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = api.http.get("/v1/jobs", params=params, headers=grace)
        assert page.status_code == 200
        seen += [job["id"] for job in page.json()["jobs"]]
        cursor = page.json()["next_cursor"]
        if cursor is None:
            break
    assert seen == sorted(ids, reverse=True)

    done = api.http.get("/v1/jobs?status=done,failed&kind=quick", headers=grace).json()["jobs"]
    assert len(done) == 5
    assert api.http.get("/v1/jobs?status=running", headers=grace).json()["jobs"] == []
    wrong = api.http.get("/v1/jobs?status=finished", headers=grace)
    assert wrong.status_code == 400
    assert error_of(wrong)["message"].startswith("status: expected one of queued, running")
    assert api.http.get("/v1/jobs?limit=0", headers=grace).status_code == 400
    assert api.http.get("/v1/jobs?cursor=abc", headers=grace).status_code == 400


def test_the_result_waits_until_the_job_is_final(api):
    heidi = api.user("heidi")
    done = api.submit(heidi, payload={"seconds": 0.2})
    response = api.http.get(f"/v1/jobs/{done['id']}/result?wait=20s", headers=heidi)
    assert response.status_code == 200
    assert response.json() == {"id": done["id"], "status": "done", "result": {"slept": 0.2}}

    failed = api.submit(heidi, "flaky")
    body = api.final(heidi, failed["id"])
    assert body["status"] == "failed"
    assert body["error"]["code"] and body["error"]["error_id"]

    waiting = api.submit(heidi, "hang")
    response = api.http.get(f"/v1/jobs/{waiting['id']}/result?wait=500ms", headers=heidi)
    assert response.status_code == 202
    assert response.json()["status"] in ("queued", "running")
    wrong = api.http.get(f"/v1/jobs/{waiting['id']}/result?wait=soon", headers=heidi)
    assert wrong.status_code == 400 and "wait:" in error_of(wrong)["message"]
    api.http.post(f"/v1/jobs/{waiting['id']}/cancel", headers=heidi)


def sse_frames(text: str) -> list[dict[str, str]]:
    frames = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        frames.append(fields)
    return frames


def test_events_stream_as_sse_and_resume_after_the_last_event_id(api):
    ivan = api.user("ivan")
    job = api.submit(ivan, payload={"seconds": 0})
    api.final(ivan, job["id"])

    with api.http.stream("GET", f"/v1/jobs/{job['id']}/events", headers=ivan) as stream:
        assert stream.status_code == 200
        assert stream.headers["content-type"] == "text/event-stream; charset=utf-8"
        assert stream.headers["cache-control"] == "no-cache"
        text = stream.read().decode()
    frames = sse_frames(text)
    statuses = [json.loads(frame["data"])["data"]["status"] for frame in frames]
    assert statuses == ["queued", "running", "done"]
    assert [frame["event"] for frame in frames] == ["status"] * 3
    seqs = [int(frame["id"]) for frame in frames]
    assert seqs == sorted(seqs)

    resumed = api.http.get(
        f"/v1/jobs/{job['id']}/events", headers={**ivan, "Last-Event-ID": str(seqs[0])}
    )
    assert [int(frame["id"]) for frame in sse_frames(resumed.text)] == seqs[1:]


def test_an_idle_event_stream_sends_keep_alive_comments_and_waits_are_not_slow_requests(
    daemons,
):
    api = start_api(daemons, {"http": {"keepalive": "100ms"}, "monitor": {"slow_request": "1s"}})
    judy = api.user("judy")
    job = api.submit(judy, "hang")
    with api.http.stream("GET", f"/v1/jobs/{job['id']}/events", headers=judy) as stream:
        lines = stream.iter_lines()
        seen = [next(lines) for _ in range(32)]
    assert seen.count(": keep-alive") >= 10  # a second and more of them
    waited = api.http.get(f"/v1/jobs/{job['id']}/result?wait=1500ms", headers=judy)
    assert waited.status_code == 202

    # Both took longer than monitor.slow_request, on purpose: neither is logged as slow. The
    # log is in order, so once a later refusal is there, a slow request line would be too.
    api.http.get("/v1/jobs/1", headers={"Authorization": "Bearer jw_marker"})
    api.daemon.wait_for_log(lambda line: line.get("code") == "UNAUTHENTICATED")
    assert [line for line in api.daemon.logs() if "slow request" in line["event"]] == []


# -- refusals with their HTTP statuses and headers ---------------------------------------------


def test_405_says_which_methods_a_path_has_and_404_is_the_common_shape(api):
    response = api.http.delete("/v1/jobs", headers=api.operator)
    assert response.status_code == 405
    assert response.headers["allow"] == "GET, HEAD, POST"
    assert error_of(response)["code"] == "METHOD_NOT_ALLOWED"
    missing = api.http.get("/v1/nothing-here", headers=api.operator)
    assert (missing.status_code, error_of(missing)["code"]) == (404, "NOT_FOUND")
    for job_id in ("99999", "abc", str(2**70)):
        response = api.http.get(f"/v1/jobs/{job_id}", headers=api.operator)
        assert (response.status_code, error_of(response)["code"]) == (404, "NOT_FOUND")


def test_413_is_decided_from_content_length_before_the_body_is_read(daemons):
    api = start_api(daemons, {"http": {"max_body_bytes": 1000}})
    # Not a byte of the body is sent: the answer comes anyway.
    with post_by_hand(api, "Content-Length: 1000000000\r\n\r\n") as sock:
        head, body = answer_of(sock)
    assert head.startswith(b"HTTP/1.1 413")
    assert b"connection: close" in head.lower()
    assert json.loads(body)["code"] == "PAYLOAD_TOO_LARGE"

    def chunks() -> Iterator[bytes]:
        yield b'{"kind": "quick", "payload": "'
        for _ in range(10):
            yield b"x" * 500
        yield b'"}'

    chunked = api.http.post("/v1/jobs", content=chunks(), headers=api.operator)
    assert (chunked.status_code, error_of(chunked)["code"]) == (413, "PAYLOAD_TOO_LARGE")
    small = api.http.post("/v1/jobs", json={"kind": "quick"}, headers=api.operator)
    assert small.status_code == 202


def test_guards_answer_429_402_and_503_with_retry_after(daemons):
    api = start_api(
        daemons, {"limits": {"max_queued": 2, "burst": 1}, "daemon": {"max_concurrent_jobs": 1}}
    )
    limited = api.user("kim", rate="1/min")
    assert api.http.post("/v1/jobs", json={"kind": "hang"}, headers=limited).status_code == 202
    response = api.http.post("/v1/jobs", json={"kind": "hang"}, headers=limited)
    assert (response.status_code, error_of(response)["code"]) == (429, "RATE_LIMITED")
    assert 50 <= int(response.headers["retry-after"]) <= 60
    assert error_of(response)["retryable"] is True

    broke = api.user("lee", credits=0)
    response = api.http.post("/v1/jobs", json={"kind": "quick"}, headers=broke)
    assert (response.status_code, error_of(response)["code"]) == (402, "INSUFFICIENT_CREDITS")
    assert "retry-after" not in response.headers

    for _ in range(2):
        api.http.post("/v1/jobs", json={"kind": "hang"}, headers=api.operator)
    full = api.http.post("/v1/jobs", json={"kind": "hang"}, headers=api.operator)
    assert (full.status_code, error_of(full)["code"]) == (503, "QUEUE_FULL")
    assert int(full.headers["retry-after"]) >= 1

    metrics = api.http.get("/metrics").text
    for code in ("RATE_LIMITED", "INSUFFICIENT_CREDITS", "QUEUE_FULL"):
        assert f'jobwarden_requests_refused_total{{code="{code}",listener="http"}} 1.0' in metrics

    with api.daemon.client() as admin:
        admin.call("drain")
    draining = api.http.post("/v1/jobs", json={"kind": "quick"}, headers=api.operator)
    assert (draining.status_code, error_of(draining)["code"]) == (503, "DRAINING")
    assert int(draining.headers["retry-after"]) >= 1


# -- the operator's routes -------------------------------------------------------------------


def test_the_operator_does_over_http_what_the_admin_socket_does(api):
    op = api.operator
    assert api.http.post("/v1/pause?kind=quick", headers=op).status_code == 200
    mallory = api.user("mallory")
    job = api.submit(mallory, payload={"seconds": 0})
    shown = api.http.get(f"/v1/jobs/{job['id']}", headers=mallory).json()
    assert shown["job"]["status"] == "queued"
    assert "paused" in json.dumps(shown["waiting"])
    assert api.http.post("/v1/resume?kind=quick", headers=op).status_code == 200
    api.final(mallory, job["id"])
    wrong = api.http.post("/v1/pause?kind=nope", headers=op)
    assert wrong.status_code == 400 and "unknown kind 'nope'" in error_of(wrong)["message"]

    failed = api.submit(mallory, "flaky")
    assert api.final(mallory, failed["id"])["status"] == "failed"
    retried = api.http.post(f"/v1/jobs/{failed['id']}/retry", headers=op)
    assert retried.status_code == 200, retried.text
    assert retried.json()["status"] == "queued"

    budget = api.http.put("/v1/budget", json={"daily_usd": 12.5}, headers=op)
    assert budget.status_code == 200
    assert api.http.get("/v1/budget", headers=op).json()["daily_usd"] == 12.5
    negative = api.http.put("/v1/budget", json={"daily_usd": -1}, headers=op)
    assert negative.status_code == 400 and "daily_usd" in error_of(negative)["message"]
    assert api.http.get("/v1/ledger?by=user", headers=op).status_code == 200
    bad_day = api.http.get("/v1/ledger?day=yesterday", headers=op)
    assert bad_day.status_code == 400 and "YYYY-MM-DD" in error_of(bad_day)["message"]

    assert api.http.get("/v1/breakers", headers=op).status_code == 200
    assert api.http.get("/v1/stuck", headers=op).json()["dry_run"] is True
    assert api.http.get("/v1/status", headers=op).json()["jobs"]["done"] >= 1

    credits = api.http.post("/v1/users/mallory/credits", json={"change": 5}, headers=op)
    assert credits.status_code == 200
    renewed = api.http.post("/v1/users/mallory/token", headers=op).json()
    assert api.http.get("/v1/jobs", headers=mallory).status_code == 401
    fresh = {"Authorization": f"Bearer {renewed['token']}"}
    assert api.http.get("/v1/jobs", headers=fresh).status_code == 200
    assert api.http.get("/v1/users/nobody", headers=op).status_code == 404
    taken = api.http.post("/v1/users", json={"name": "mallory"}, headers=op)
    assert taken.status_code == 400


def test_the_openapi_document_is_valid_and_names_every_route(api):
    response = api.http.get("/v1/openapi.json")
    assert response.status_code == 200
    document = response.json()
    validate(document)
    assert document["openapi"] == "3.1.0"
    assert {"SubmitBody", "JobView", "JobPage", "JobResult", "ErrorBody"} <= set(
        document["components"]["schemas"]
    )
    assert {"/v1/jobs:batch", "/v1/jobs:cancel", "/v1/jobs:retry", "/v1/jobs/{id}/logs"} <= set(
        document["paths"]
    )
    submit = document["paths"]["/v1/jobs"]["post"]
    assert {"202", "200", "400", "401", "413", "429", "503"} <= set(submit["responses"])
    assert submit["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/SubmitBody"
    }


def test_a_body_that_does_not_arrive_in_time_is_408_and_requests_over_the_cap_503(daemons):
    api = start_api(daemons, {"http": {"body_timeout": "300ms", "max_requests": 1}})
    with post_by_hand(api, 'Content-Length: 100\r\n\r\n{"kind": ') as sock:
        # The request holds the one slot while its body is awaited: another is refused.
        with httpx.Client(base_url=str(api.http.base_url), timeout=10) as other:
            busy = other.get("/v1/jobs", headers=api.operator)
        head, body = answer_of(sock)
    assert (busy.status_code, error_of(busy)["code"]) == (503, "QUEUE_FULL")
    assert busy.headers["retry-after"] == "1"
    assert head.startswith(b"HTTP/1.1 408")
    assert json.loads(body)["code"] == "REQUEST_TIMEOUT"
    # The slot is free again.
    assert api.http.get("/v1/jobs", headers=api.operator).status_code == 200


def test_event_streams_end_cleanly_when_the_daemon_stops(daemons):
    api = start_api(daemons, {"daemon": {"shutdown_grace": "200ms"}})
    job = api.submit(api.operator, "hang")
    with api.http.stream("GET", f"/v1/jobs/{job['id']}/events", headers=api.operator) as stream:
        lines = stream.iter_lines()
        while '"status":"running"' not in next(lines):
            pass
        api.daemon.terminate()
        # The last event comes, and the stream ends with its final chunk (an abrupt close would
        # raise here), rather than waiting on for events that never come.
        rest = [line for line in lines if line.startswith("data: ")]
    assert api.daemon.wait() == 0
    assert [json.loads(line[6:])["data"]["reason"] for line in rest] == ["INTERRUPTED"]


def test_delays_tags_and_holds_work_over_http_as_on_the_other_doors(api):
    alice = api.user("dora")
    later = api.submit(alice, "quick", payload={"seconds": 0}, delay="1h", tags=["nightly"])
    assert later["run_at"] > later["created_at"] + 3500
    tagged = api.http.get("/v1/jobs?tag=nightly", headers=alice).json()["jobs"]
    assert [job["id"] for job in tagged] == [later["id"]]
    response = api.http.post(f"/v1/jobs/{later['id']}/hold", headers=api.operator)
    assert response.status_code == 200, response.text
    shown = api.http.get(f"/v1/jobs/{later['id']}", headers=alice).json()
    assert shown["job"]["held"] is True
    assert shown["waiting"]["reason"] == "held by an operator"
    # A user's token may not release it: the operator's route.
    assert api.http.post(f"/v1/jobs/{later['id']}/release", headers=alice).status_code == 403
    released = api.http.post(f"/v1/jobs/{later['id']}/release", headers=api.operator)
    assert (released.status_code, released.json().get("held", False)) == (200, False)
    api.http.post(f"/v1/jobs/{later['id']}/cancel", headers=alice)
    on_hold = api.http.post("/v1/users/dora/hold", headers=api.operator)
    assert (on_hold.status_code, on_hold.json()["user"]["held"]) == (200, True)
    assert api.http.get("/v1/schedules", headers=api.operator).json() == {"schedules": []}
    missing = api.http.post("/v1/schedules/nightly/trigger", headers=api.operator)
    assert missing.status_code == 404


# -- batches, bulk actions, logs -------------------------------------------------------------


def test_a_batch_answers_each_item_and_an_atomic_one_is_all_or_none(api):
    bea = api.user("bea")
    items = [
        {"kind": "hang", "tags": ["bea-batch"]},
        {"kind": "nope"},
        {"kind": "quick", "payload": {"seconds": 0}, "delay": "1h"},
    ]
    response = api.http.post("/v1/jobs:batch", json={"items": items}, headers=bea)
    assert response.status_code == 200, response.text
    batch = response.json()
    assert (batch["accepted"], batch["existing"], batch["refused"]) == (2, 0, 1)
    first, refused, delayed = batch["results"]
    assert (first["job"]["user"], first["job"]["tags"]) == ("bea", ["bea-batch"])
    assert refused["error"]["code"] == "INVALID_REQUEST"
    assert delayed["job"]["run_at"] > delayed["job"]["created_at"] + 3500

    atomic = api.http.post("/v1/jobs:batch", json={"items": items, "atomic": True}, headers=bea)
    assert atomic.status_code == 400
    assert error_of(atomic)["message"].startswith("item 1: unknown kind 'nope'")
    listed = api.http.get("/v1/jobs?user=bea", headers=bea).json()["jobs"]
    assert len(listed) == 2  # the atomic batch left nothing behind

    for_other = api.http.post(
        "/v1/jobs:batch", json={"items": items[:1], "user": "cleo"}, headers=bea
    )
    assert (for_other.status_code, error_of(for_other)["code"]) == (403, "FORBIDDEN")
    by_operator = api.http.post(
        "/v1/jobs:batch",
        json={"items": [{"kind": "quick", "payload": {"seconds": 0}}], "user": "bea-2"},
        headers=api.operator,
    )
    assert by_operator.json()["results"][0]["job"]["user"] == "bea-2"
    empty = api.http.post("/v1/jobs:batch", json={"items": []}, headers=bea)
    assert (empty.status_code, error_of(empty)["code"]) == (400, "INVALID_REQUEST")
    api.http.post(f"/v1/jobs/{first['job']['id']}/cancel", headers=bea)
    api.http.post(f"/v1/jobs/{delayed['job']['id']}/cancel", headers=bea)


def test_bulk_cancel_takes_a_users_own_jobs_and_bulk_retry_is_the_operators(api):
    cleo, dan = api.user("cleo"), api.user("dan")
    hers = [api.submit(cleo, "hang", tags=["bulk-http"])["id"] for _ in range(2)]
    his = api.submit(dan, "hang", tags=["bulk-http"])["id"]
    by_tag = {"filter": {"tag": "bulk-http"}}

    preview = api.http.post("/v1/jobs:cancel", json={**by_tag, "dry_run": True}, headers=cleo)
    assert preview.status_code == 200, preview.text
    assert (preview.json()["matched"], preview.json()["ids"]) == (2, hers)
    assert api.http.get(f"/v1/jobs/{hers[0]}", headers=cleo).json()["job"]["status"] != "canceled"

    canceled = api.http.post("/v1/jobs:cancel", json=by_tag, headers=cleo).json()
    assert (canceled["action"], canceled["changed"], canceled["ids"]) == ("cancel", 2, hers)
    assert api.final(cleo, hers[1])["status"] == "canceled"
    assert api.http.get(f"/v1/jobs/{his}", headers=dan).json()["job"]["status"] != "canceled"

    refused = api.http.post("/v1/jobs:retry", json=by_tag, headers=cleo)
    assert (refused.status_code, error_of(refused)["code"]) == (403, "FORBIDDEN")
    everything = api.http.post("/v1/jobs:cancel", json={"filter": {}}, headers=cleo)
    assert (everything.status_code, error_of(everything)["code"]) == (400, "INVALID_REQUEST")
    dry = api.http.post("/v1/jobs:retry", json={**by_tag, "dry_run": True}, headers=api.operator)
    assert (dry.json()["dry_run"], dry.json()["matched"]) == (True, 2)
    retried = api.http.post("/v1/jobs:retry", json=by_tag, headers=api.operator).json()
    assert (retried["changed"], retried["ids"]) == (2, hers)
    assert (
        api.http.post("/v1/jobs:cancel", json=by_tag, headers=api.operator).json()["changed"] == 3
    )


def test_a_jobs_log_is_read_a_page_at_a_time_and_followed_as_sse(api):
    lena, max_ = api.user("lena"), api.user("max")
    done = api.submit(lena, "chatty", payload={"lines": 3})
    assert api.final(lena, done["id"])["status"] == "done"
    page = api.http.get(f"/v1/jobs/{done['id']}/logs", headers=lena)
    assert page.status_code == 200, page.text
    lines = page.json()["lines"]
    assert page.json()["dropped"] == 0
    assert [line["line"] for line in lines[:3]] == ["line 0", "line 1", "line 2"]
    second = api.http.get(
        f"/v1/jobs/{done['id']}/logs?after={lines[0]['id']}&limit=1", headers=lena
    )
    assert [line["line"] for line in second.json()["lines"]] == ["line 1"]
    for path in (f"/v1/jobs/{done['id']}/logs", f"/v1/jobs/{done['id']}/logs?follow=1"):
        other = api.http.get(path, headers=max_)
        assert (other.status_code, error_of(other)["code"]) == (404, "NOT_FOUND")

    running = api.submit(lena, "chatty", payload={"lines": 3, "every": 0.2})
    path = f"/v1/jobs/{running['id']}/logs?follow=1"
    with api.http.stream("GET", path, headers=lena) as stream:
        assert stream.headers["content-type"] == "text/event-stream; charset=utf-8"
        frames = sse_frames(stream.read().decode())
    logged = [frame for frame in frames if frame["event"] == "log"]
    assert [json.loads(frame["data"])["line"] for frame in logged[:3]] == [
        "line 0",
        "line 1",
        "line 2",
    ]
    assert frames[-1]["event"] == "end"
    assert json.loads(frames[-1]["data"])["status"] == "done"
    resumed = api.http.get(path, headers={**lena, "Last-Event-ID": logged[0]["id"]})
    assert [frame["id"] for frame in sse_frames(resumed.text)[:-1]] == [
        frame["id"] for frame in logged[1:]
    ]
