"""The dashboard's routes over real HTTP, against the real daemon: the page and its files,
what they are sent with, who may read what, and the stream of every job's events."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from jobwarden.process.http.dashboard import FILES
from tests.process import DaemonFactory, daemon_factory

CONFIG = {
    "kinds": {"quick": {"handler": "tests.handlers:sleepy"}},
    "services": {"images": {"price_usd": 0.04, "breaker": {"failures": 3}}},
}


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[DaemonFactory]:
    yield from daemon_factory(tmp_path)


@pytest.fixture
def site(daemons: DaemonFactory) -> Iterator[tuple[httpx.Client, dict[str, str], object]]:
    daemon = daemons(CONFIG)
    port = daemon.logs("jobwarden ready")[0]["http_port"]
    with daemon.client() as admin:
        tokens = {
            "ops": admin.call("tokens", action="add", name="ops")["secret"],
            **{
                name: admin.call("users", action="add", name=name)["token"]
                for name in ("alice", "bob")
            },
        }
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
        yield client, tokens, daemon


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_the_root_leads_to_the_page(site):
    client, _, _ = site

    response = client.get("/")

    assert response.status_code == 307
    assert response.headers["location"] == "/ui/"


def test_the_page_lets_only_the_daemons_own_scripts_run(site):
    client, _, _ = site

    response = client.get("/ui/")

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    policy = response.headers["content-security-policy"]
    assert "script-src 'self'" in policy
    assert "connect-src 'self'" in policy
    assert "unsafe-inline" not in policy
    assert response.headers["x-content-type-options"] == "nosniff"
    assert '<script type="module" src="/ui/static/app.js">' in response.text


def test_every_script_the_page_imports_is_served_as_javascript(site):
    client, _, _ = site
    scripts = [name for name in FILES if name.endswith(".js")]
    assert {"app.js", "live.js", "pages/job.js"} <= set(scripts)

    for name in scripts:
        response = client.get(f"/ui/static/{name}")
        assert response.status_code == 200, name
        assert response.headers["content-type"] == "text/javascript; charset=utf-8"


def test_a_file_the_browser_has_is_not_sent_again(site):
    client, _, _ = site
    first = client.get("/ui/static/app.css")

    again = client.get("/ui/static/app.css", headers={"If-None-Match": first.headers["etag"]})

    assert again.status_code == 304
    assert again.content == b""


def test_a_file_that_is_not_there_is_404_in_the_common_shape(site):
    client, _, _ = site

    response = client.get("/ui/static/../dashboard.py")

    assert response.status_code == 404
    assert response.json()["code"] == "NOT_FOUND"


def test_the_session_says_who_the_token_names(site):
    client, tokens, _ = site

    assert client.get("/ui/api/session", headers=bearer(tokens["alice"])).json() == {
        "name": "alice",
        "operator": False,
    }
    assert client.get("/ui/api/session", headers=bearer(tokens["ops"])).json()["operator"]
    refused = client.get("/ui/api/session", headers=bearer("jw_wrong"))
    assert refused.status_code == 401
    assert refused.headers["www-authenticate"] == "Bearer"


def test_the_overview_is_for_operators_only(site):
    client, tokens, _ = site

    assert client.get("/ui/api/overview").status_code == 401
    assert client.get("/ui/api/overview", headers=bearer(tokens["alice"])).status_code == 403
    overview = client.get("/ui/api/overview", headers=bearer(tokens["ops"])).json()
    assert overview["kinds"] == ["quick"]
    assert len(overview["finished_last_hour"]["spans"]) == 12


def test_a_jobs_cost_is_its_users_to_read_and_no_one_elses(site):
    client, tokens, daemon = site
    with daemon.client() as admin:
        job = admin.call("submit", kind="quick", payload={}, user="alice")["job"]["id"]

    mine = client.get(f"/ui/api/jobs/{job}/cost", headers=bearer(tokens["alice"]))
    theirs = client.get(f"/ui/api/jobs/{job}/cost", headers=bearer(tokens["bob"]))

    assert (mine.status_code, mine.json()) == (200, {"usd": 0})
    assert theirs.status_code == 404


def events_of(response: httpx.Response) -> Iterator[dict]:
    """The events of an SSE response as they come, each with its SSE fields under "sse"."""
    fields: dict[str, str] = {}
    for line in response.iter_lines():
        if line.startswith(":"):
            continue
        if line:
            name, _, value = line.partition(": ")
            fields[name] = value
            continue
        if "data" in fields:
            yield {**json.loads(fields["data"]), "sse": fields}
        fields = {}


def take(events: Iterator[dict], count: int) -> list[dict]:
    return [next(events) for _ in range(count)]


def test_every_job_stream_sends_a_user_their_own_jobs_events_past_each_jobs_end(site):
    client, tokens, daemon = site
    with (
        client.stream("GET", "/v1/events", headers=bearer(tokens["alice"])) as stream,
        daemon.client() as admin,
    ):
        assert stream.headers["content-type"].startswith("text/event-stream")
        admin.call("submit", kind="quick", payload={}, user="bob")
        first = admin.call("submit", kind="quick", payload={}, user="alice")["job"]["id"]
        arriving = events_of(stream)
        events = take(arriving, 3)
        second = admin.call("submit", kind="quick", payload={}, user="alice")["job"]["id"]
        events += take(arriving, 3)

    assert [(event["job"], event["data"]["status"]) for event in events] == [
        (first, "queued"),
        (first, "running"),
        (first, "done"),
        (second, "queued"),
        (second, "running"),
        (second, "done"),
    ]
    assert [event["sse"]["id"] for event in events] == [str(event["seq"]) for event in events]


def test_every_job_stream_resumes_after_the_last_event_id_and_carries_breaker_changes(site):
    client, tokens, daemon = site
    with daemon.client() as admin:
        job = admin.call("submit", kind="quick", payload={}, user="alice")["job"]["id"]
        admin.call("breaker", service="images", action="trip")
    with client.stream(
        "GET", "/v1/events", headers={**bearer(tokens["ops"]), "Last-Event-ID": "0"}
    ) as stream:
        events = take(events_of(stream), 4)

    assert sorted((event["job"], event["type"]) for event in events) == [
        (0, "breaker"),
        (job, "status"),
        (job, "status"),
        (job, "status"),
    ]
    seqs = [event["seq"] for event in events]
    assert seqs == sorted(seqs)
