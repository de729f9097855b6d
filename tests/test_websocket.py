"""The WebSocket listener on a real port (0), in process: what a user's client sees.

Every test that does I/O runs under a trio deadline, and none sleeps on the real clock: it
waits for the frame, the close or the job it expects.
"""

from __future__ import annotations

import contextlib
import json
import socket
import sys
from functools import partial
from pathlib import Path

import pytest
import trio
import trio_websocket
import wsproto
import wsproto.events
from structlog.testing import capture_logs

from jobwarden.actors.messages import BreakerTrip, HealthQuery
from jobwarden.cli import main
from jobwarden.client import DaemonError, DaemonUnreachable, connect
from jobwarden.config import load_config_text
from jobwarden.errors import ConfigError
from jobwarden.mailbox import ask
from jobwarden.store import jobs, users
from jobwarden.wire.views import TERMINAL_STATUSES
from tests.test_admin import ask_admin

pytestmark = pytest.mark.both_stores

KINDS = """
[kinds.stepper]
handler = "tests.handlers:stepper"

[kinds.quick]
handler = "tests.handlers:sleepy"

[kinds.hang]
handler = "tests.handlers:hang"

[kinds.typed]
handler = "tests.handlers:typed"

[services.paid]
price_usd = 0.1
"""
REPO_ROOT = Path(__file__).resolve().parent.parent

KNOWN_OPS = "cancel, cancel_many, jobs, logs, submit, submit_many, unwatch, watch"


async def add_user(daemon, name: str) -> str:
    """A user with a token, made in the store as `jobwarden users add` will."""
    token = users.new_token()
    await daemon.handle.store.write(
        partial(
            users.create,
            name=name,
            credits=None,
            limits=users.UserLimits(),
            token_hash=users.hash_token(token),
            now=daemon.now,
        )
    )
    return token


def websocket(*settings: str) -> str:
    """A [websocket] table for a test of these settings."""
    return "\n".join(["[websocket]", 'listen = "127.0.0.1:0"', *settings, ""])


def url_of(daemon) -> str:
    return f"ws://127.0.0.1:{daemon.handle.websocket_port}/"


def bearer(token: str) -> list[tuple[bytes, bytes]]:
    return [(b"authorization", f"Bearer {token}".encode())]


class Frames:
    """A raw connection that sends ops and reads frames as dicts."""

    def __init__(self, ws: trio_websocket.WebSocketConnection) -> None:
        self.ws = ws
        # Frames that came while `ask` waited for its answer, in order.
        self.early: list[dict] = []
        # Every frame read from the socket, in order.
        self.received: list[dict] = []

    async def send(self, **op: object) -> None:
        await self.ws.send_message(json.dumps(op))

    async def receive(self) -> dict:
        if self.early:
            return self.early.pop(0)
        return await self._read()

    async def ask(self, **op: object) -> dict:
        """Send an op and return the frame that answers it."""
        await self.send(**op)
        while True:
            frame = await self._read()
            if frame.get("id") == op.get("id") and "seq" not in frame:
                return frame
            self.early.append(frame)

    async def _read(self) -> dict:
        frame = json.loads(await self.ws.get_message())
        self.received.append(frame)
        return frame

    async def events_until_done(self, watch: object) -> list[dict]:
        """The events of `watch` up to its job's final status; other frames are left out."""
        events = []
        while True:
            frame = await self.receive()
            if frame.get("watch") == watch and "seq" in frame:
                events.append(frame)
                if frame["type"] == "status" and frame["data"]["status"] in TERMINAL_STATUSES:
                    return events


def open_frames(daemon, token: str | None, **options):
    headers = bearer(token) if token is not None else []
    return trio_websocket.open_websocket_url(
        url_of(daemon), extra_headers=headers + options.pop("headers", []), **options
    )


async def stored_seqs(daemon, job_id: int) -> list[int]:
    return [event.seq for event in await daemon.events(job_id)]


@pytest.fixture
async def alice(start_daemon):
    daemon = await start_daemon(KINDS, max_concurrent_jobs=20)
    return daemon, await add_user(daemon, "alice")


# -- the client library ----------------------------------------------------------------------


async def test_a_submitted_job_is_watched_to_its_result(alice):
    daemon, token = alice
    with trio.fail_after(20):
        async with connect(url_of(daemon), token) as client:
            job = await client.submit("stepper", {"steps": 5, "step_seconds": 0.01})
            assert (job.user, job.status, job.existing) == ("alice", "queued", False)
            watch = client.watch(job.id)
            events = [event async for event in watch]
            again = await client.submit(
                "stepper", {"steps": 5}, idempotency_key=job.idempotency_key
            )
    assert [event.seq for event in events] == await stored_seqs(daemon, job.id)
    assert [e.data["fraction"] for e in events if e.type == "progress"] == [0.2, 0.4, 0.6, 0.8, 1.0]
    assert events[-1].data["status"] == "done"
    assert events[-1].data["result"] == {"steps": 5, "resumed_from": 0}
    # The key's job has finished: the key is free again and starts a new job.
    assert (again.id, again.existing) == (job.id + 1, False)


async def test_a_watch_of_a_retried_job_follows_it_past_its_old_failure(alice):
    daemon, token = alice
    job = await daemon.submit("quick", {"seconds": 0, "fail": True}, user="alice")
    with trio.fail_after(20):
        await daemon.wait_done(job.id)
        retried = await ask_admin(daemon, "retry", job=job.id)
        assert retried["data"]["job"]["status"] == "queued"
        await daemon.wait_done(job.id)
        async with connect(url_of(daemon), token) as client:
            events = [event async for event in client.watch(job.id)]
    statuses = [event.data["status"] for event in events if event.type == "status"]
    assert statuses == ["queued", "running", "failed", "queued", "running", "failed"]
    assert [event.seq for event in events] == await stored_seqs(daemon, job.id)


async def test_a_wrong_token_is_refused_by_the_client_library(alice):
    daemon, _ = alice
    with trio.fail_after(10), pytest.raises(DaemonError) as refused:
        async with connect(url_of(daemon), "jw_not-a-token"):
            pass
    assert refused.value.error.code == "UNAUTHENTICATED"
    assert refused.value.error.retryable is False


async def test_no_daemon_there_is_unreachable(alice):
    _, token = alice
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    with trio.fail_after(10), pytest.raises(DaemonUnreachable, match="connection refused"):
        async with connect(f"ws://127.0.0.1:{port}/", token):
            pass


# -- the handshake ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("token", "path", "message"),
    [
        (None, "/", "no token"),
        ("jw_wrong", "/", "the token is not valid"),
        (None, "/?token=jw_wrong", "the token is not valid"),
    ],
    ids=["no-token", "wrong-bearer", "wrong-query"],
)
async def test_a_missing_or_wrong_token_is_refused_with_401(alice, token, path, message):
    daemon, _ = alice
    url = url_of(daemon).rstrip("/") + path
    with trio.fail_after(10), pytest.raises(trio_websocket.ConnectionRejected) as refused:
        headers = bearer(token) if token else []
        async with trio_websocket.open_websocket_url(url, extra_headers=headers):
            pass
    body = json.loads(refused.value.body)
    assert refused.value.status_code == 401
    assert body["code"] == "UNAUTHENTICATED" and body["message"].startswith(message)
    assert body["error_id"]


async def test_the_token_of_a_disabled_user_is_refused(alice):
    daemon, token = alice
    await daemon.handle.store.write(partial(users.update, name="alice", disabled=True))
    with trio.fail_after(10), pytest.raises(DaemonError) as refused:
        async with connect(url_of(daemon), token):
            pass
    assert refused.value.error.code == "UNAUTHENTICATED"


async def test_a_browser_passes_the_token_in_the_query(alice):
    daemon, token = alice
    with trio.fail_after(10):
        url = f"{url_of(daemon)}?token={token}"
        async with trio_websocket.open_websocket_url(url) as ws:
            reply = await Frames(ws).ask(op="jobs", id=1)
    assert reply == {"type": "jobs", "id": 1, "jobs": []}


async def test_pages_from_other_origins_are_refused_with_403(start_daemon):
    daemon = await start_daemon(KINDS + websocket('origins = ["https://app.example"]'))
    token = await add_user(daemon, "alice")
    with trio.fail_after(10):
        with pytest.raises(trio_websocket.ConnectionRejected) as refused:
            async with open_frames(daemon, token, headers=[(b"origin", b"https://evil.example")]):
                pass
        for origin in ([(b"origin", b"https://app.example")], []):
            async with open_frames(daemon, token, headers=origin) as ws:
                assert (await Frames(ws).ask(op="jobs", id=1))["type"] == "jobs"
    assert refused.value.status_code == 403
    assert json.loads(refused.value.body)["code"] == "FORBIDDEN"


async def test_a_full_listener_refuses_with_503_until_a_client_leaves(start_daemon):
    daemon = await start_daemon(KINDS + websocket("max_connections = 2"))
    token = await add_user(daemon, "alice")
    with trio.fail_after(10):
        async with open_frames(daemon, token) as first, open_frames(daemon, token):
            with pytest.raises(trio_websocket.ConnectionRejected) as refused:
                async with open_frames(daemon, token):
                    pass
            await first.aclose()
            async with open_frames(daemon, token) as third:
                assert (await Frames(third).ask(op="jobs", id=1))["type"] == "jobs"
    assert refused.value.status_code == 503
    body = json.loads(refused.value.body)
    assert (body["code"], body["retryable"]) == ("QUEUE_FULL", True)


# -- what a user may see and touch -----------------------------------------------------------


async def test_a_user_sees_and_touches_only_their_own_jobs(alice):
    daemon, _ = alice
    bob_token = await add_user(daemon, "bob")
    alices = await daemon.submit("hang", user="alice")
    with trio.fail_after(20):
        async with open_frames(daemon, bob_token) as ws:
            bob = Frames(ws)
            assert (await bob.ask(op="watch", all=True, id="all"))["type"] == "watching"
            await daemon.wait_status(alices.id, {"running"})
            await ask(daemon.handle.breaker, BreakerTrip, service="paid")
            refusals = [
                await bob.ask(op="watch", job=alices.id, id="watch"),
                await bob.ask(op="cancel", job=alices.id, id="cancel"),
                await bob.ask(op="watch", job=10**6, id="absent"),
            ]
            listed = await bob.ask(op="jobs", id="jobs")
            bobs = (await bob.ask(op="submit", kind="quick", payload={"seconds": 0}, id="s"))["job"]
            seen = await bob.events_until_done("all")
    assert [(r["id"], r["error"]["code"], r["error"]["message"]) for r in refusals] == [
        ("watch", "NOT_FOUND", f"no job {alices.id}"),
        ("cancel", "NOT_FOUND", f"no job {alices.id}"),
        ("absent", "NOT_FOUND", f"no job {10**6}"),
    ]
    assert listed["jobs"] == []
    # Alice's job and the breaker's trip came first in seq order; bob's stream holds neither.
    assert {event["job"] for event in seen} == {bobs["id"]}
    assert [event["seq"] for event in seen] == await stored_seqs(daemon, bobs["id"])
    assert (await daemon.job(alices.id)).status == "running"


async def test_cancel_stops_a_running_job(alice):
    daemon, token = alice
    with trio.fail_after(20):
        async with connect(url_of(daemon), token) as client:
            job = await client.submit("hang")
            await daemon.wait_status(job.id, {"running"})
            canceled = await client.cancel(job.id)
            events = [event async for event in client.watch(job.id)]
    assert (canceled.status, canceled.reason) == ("canceled", "CANCELED")
    assert [e.data["status"] for e in events] == ["queued", "running", "canceled"]


async def test_after_unwatched_no_event_of_that_watch_arrives(alice):
    daemon, token = alice
    with trio.fail_after(20):
        async with open_frames(daemon, token) as ws:
            frames = Frames(ws)
            await frames.ask(op="watch", all=True, id="all")
            busy = await daemon.submit("stepper", {"steps": 50, "step_seconds": 0.001})
            unwatched = await frames.ask(op="unwatch", all=True, id="un")
            mark = len(frames.received)
            job = (await frames.ask(op="submit", kind="quick", payload={"seconds": 0}, id="s"))[
                "job"
            ]
            await frames.ask(op="watch", job=job["id"], id="one")
            await frames.events_until_done(job["id"])
            await daemon.wait_done(busy.id)
            await frames.ask(op="jobs", id="flush")
            after = frames.received[mark:]
    assert unwatched == {"type": "unwatched", "id": "un", "watch": "all"}
    assert all(frame.get("watch") != "all" for frame in after)


async def test_a_watch_unwatched_at_once_is_still_answered_before_its_unwatched(alice):
    daemon, token = alice
    with trio.fail_after(20):
        async with open_frames(daemon, token) as ws:
            frames = Frames(ws)
            for n in range(50):
                # Sent together, not waiting for the first answer: they race inside.
                await frames.send(op="watch", all=True, id=f"w{n}")
                await frames.send(op="unwatch", all=True, id=f"u{n}")
                answers = [await frames.receive(), await frames.receive()]
                assert [answer["id"] for answer in answers] == [f"w{n}", f"u{n}"]
                assert answers[0]["type"] in ("watching", "error")
                assert answers[1]["type"] == "unwatched"


# -- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("frame", "reply_id", "message"),
    [
        ("not json", None, "not valid JSON"),
        ("[1, 2]", None, 'a frame is a JSON object, like {"op": "jobs"}'),
        (
            '{"op": "fly", "id": 7}',
            7,
            f"unknown op 'fly' (known: {KNOWN_OPS})",
        ),
        ('{"id": "x"}', "x", f"no op (known: {KNOWN_OPS})"),
        (
            '{"op": "watch", "id": 7, "job": "one"}',
            7,
            "watch: job: Expected `int | null`, got `str`",
        ),
        ('{"op": "jobs", "id": 7, "colour": "red"}', 7, "jobs: colour: unknown key"),
        ('{"op": "watch", "id": 7}', 7, 'give either "job": ID or "all": true'),
        ('{"op": "watch", "id": 7, "job": 1, "since": -1}', 7, "watch: since must be 0 or more"),
        ('{"op": "jobs", "id": 7, "limit": 0}', 7, "jobs: limit must be within 1..1000"),
        ('{"op": "submit", "id": 7, "kind": "nope"}', 7, "unknown kind 'nope'"),
        ('{"op": "submit", "id": 7, "kind": "typed", "payload": {"n": "x"}}', 7, "payload.n"),
        (b"\x00\x01", None, "binary frames are not accepted: send JSON text frames"),
        ('{"op": "jobs", "id": 7, "limit": 1e400}', None, "limit: Number out of range"),
        (
            '{"op": "cancel", "id": 7, "job": 9223372036854775808}',
            7,
            "cancel: job: Expected `int` <= 9223372036854775807",
        ),
    ],
    ids=[
        "not-json",
        "not-an-object",
        "unknown-op",
        "no-op",
        "wrong-type",
        "unknown-field",
        "no-watch-target",
        "negative-since",
        "limit-out-of-range",
        "unknown-kind",
        "payload-schema",
        "binary",
        "number-out-of-range",
        "job-id-no-store-holds",
    ],
)
async def test_a_bad_frame_gets_an_error_frame_and_the_connection_stays(
    alice, frame, reply_id, message
):
    daemon, token = alice
    with trio.fail_after(10):
        async with open_frames(daemon, token) as ws:
            await ws.send_message(frame)
            error = json.loads(await ws.get_message())
            still = await Frames(ws).ask(op="jobs", id="after")
    assert error["type"] == "error" and error.get("id") == reply_id
    assert error["error"]["code"] == "INVALID_REQUEST"
    assert message in error["error"]["message"]
    assert error["error"]["retryable"] is False
    assert still["type"] == "jobs"


async def test_a_second_watch_of_the_same_jobs_and_one_too_many_are_refused(start_daemon):
    daemon = await start_daemon(KINDS + websocket("max_watches = 2"))
    token = await add_user(daemon, "alice")
    job = await daemon.submit("quick", {"seconds": 0}, user="alice")
    with trio.fail_after(10):
        async with open_frames(daemon, token) as ws:
            frames = Frames(ws)
            replies = [
                await frames.ask(op="watch", all=True, id=1),
                await frames.ask(op="watch", all=True, id=2),
                await frames.ask(op="watch", job=job.id, id=3),
                await frames.ask(op="watch", job=10**6, id=4),
            ]
    assert [reply["type"] for reply in replies] == ["watching", "error", "watching", "error"]
    assert replies[1]["error"]["message"] == "watch: already watching all jobs"
    assert replies[3]["error"]["message"] == "watch: at most 2 watches per connection"


@pytest.mark.parametrize(
    ("setting", "complaint"),
    [
        (
            'listen = "8765"',
            'websocket.listen: expected "host:port" (port 0 to 65535) or "", got "8765"',
        ),
        ("queue = 0", "websocket.queue: Expected `int` >= 1"),
        ('ping_interval = "soon"', 'websocket.ping_interval: expected a duration like "15m"'),
        ("colour = 1", "websocket.colour: unknown key"),
    ],
    ids=["listen", "queue", "duration", "unknown"],
)
def test_a_bad_websocket_setting_names_its_key(setting, complaint):
    with pytest.raises(ConfigError) as error:
        load_config_text(f"[websocket]\n{setting}\n")
    assert complaint in str(error.value)


async def test_an_oversized_frame_closes_with_1009_and_the_daemon_serves_on(start_daemon):
    daemon = await start_daemon(KINDS + websocket("max_frame_bytes = 1024"))
    token = await add_user(daemon, "alice")
    with trio.fail_after(10):
        async with open_frames(daemon, token) as ws:
            payload = {"text": "x" * 2000}
            await ws.send_message(json.dumps({"op": "submit", "kind": "quick", "payload": payload}))
            with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                await ws.get_message()
        async with open_frames(daemon, token) as ws:
            assert (await Frames(ws).ask(op="jobs", id=1))["jobs"] == []
    assert closed.value.reason.code == 1009


async def test_ops_over_the_rate_are_refused_with_retry_after(start_daemon):
    daemon = await start_daemon(KINDS + websocket("max_messages_per_second = 1"))
    token = await add_user(daemon, "alice")
    with trio.fail_after(10):
        async with open_frames(daemon, token) as ws:
            frames = Frames(ws)
            for n in range(3):
                await frames.send(op="jobs", id=n)
            replies = {frame["id"]: frame for frame in [await frames.receive() for _ in range(3)]}
    assert replies[0]["type"] == "jobs"
    for n in (1, 2):
        assert replies[n]["error"]["code"] == "RATE_LIMITED"
        assert 0 < replies[n]["error"]["retry_after"] <= 1


async def test_a_client_that_never_answers_pings_is_closed_with_1011(start_daemon):
    daemon = await start_daemon(
        KINDS + websocket('ping_interval = "50ms"', 'ping_timeout = "100ms"')
    )
    token = await add_user(daemon, "alice")
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", daemon.handle.websocket_port)
        async with stream:
            # wsproto alone answers nothing by itself: this client hears the ping and stays mute.
            client = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
            request = wsproto.events.Request(
                host="127.0.0.1", target="/", extra_headers=bearer(token)
            )
            await stream.send_all(client.send(request))
            seen = []
            async for chunk in stream:
                client.receive_data(chunk)
                seen.extend(client.events())
    closes = [event for event in seen if isinstance(event, wsproto.events.CloseConnection)]
    assert any(isinstance(event, wsproto.events.Ping) for event in seen)
    assert [close.code for close in closes] == [1011]


async def close_code_after(daemon, token: str, frame: bytes, *, first: bytes = b"") -> int | None:
    """Send `first`, then one raw frame after the first frame the daemon sends back (the
    reply to `first`, if any); the code of the daemon's close frame (None: it hung up
    without one)."""
    stream = await trio.open_tcp_stream("127.0.0.1", daemon.handle.websocket_port)
    async with stream:
        client = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
        request = wsproto.events.Request(host="127.0.0.1", target="/", extra_headers=bearer(token))
        await stream.send_all(client.send(request))
        sent = False
        async for chunk in stream:
            client.receive_data(chunk)
            for event in client.events():
                if isinstance(event, wsproto.events.AcceptConnection) and first:
                    await stream.send_all(first)
                elif not sent and isinstance(
                    event, wsproto.events.AcceptConnection | wsproto.events.TextMessage
                ):
                    sent = True
                    await stream.send_all(frame)
                if isinstance(event, wsproto.events.CloseConnection) and sent:
                    return event.code
    return None


def masked_frame(first_byte: int, payload: bytes) -> bytes:
    """A client frame of up to 125 bytes, masked with a zero key (which leaves it as is)."""
    return bytes([first_byte, 0x80 | len(payload)]) + b"\0\0\0\0" + payload


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (masked_frame(0x81, b'{"op": "jobs", "id": "\xff\xfe"}'), 1007),
        (masked_frame(0x83, b"{}"), 1002),
        (masked_frame(0xC1, b'{"op": "jobs"}'), 1002),
    ],
    ids=["invalid-utf8-text", "reserved-opcode", "reserved-bit"],
)
async def test_a_frame_the_protocol_forbids_is_answered_with_its_close_code(alice, frame, code):
    daemon, token = alice
    with trio.fail_after(10):
        assert await close_code_after(daemon, token, frame) == code
        async with open_frames(daemon, token) as ws:
            assert (await Frames(ws).ask(op="jobs", id=1))["type"] == "jobs"


async def test_a_forbidden_frame_amid_a_stream_of_events_closes_without_a_fault(alice):
    daemon, token = alice
    job = await daemon.submit("stepper", {"steps": 20_000, "step_seconds": 0}, user="alice")
    watch = masked_frame(0x81, json.dumps({"op": "watch", "job": job.id, "since": 0}).encode())
    with trio.fail_after(20), capture_logs() as logs:
        for _ in range(5):
            bad_text = masked_frame(0x81, b'"\xff"')
            assert await close_code_after(daemon, token, bad_text, first=watch) == 1007
    assert [entry for entry in logs if entry["log_level"] == "error"] == []


@pytest.mark.parametrize(
    ("action", "reason"),
    [("token", "token revoked"), ("disable", "user disabled")],
    ids=["new-token", "disabled"],
)
async def test_revoking_a_token_closes_the_sessions_it_opened_with_1008(alice, action, reason):
    daemon, token = alice
    bob_token = await add_user(daemon, "bob")
    with trio.fail_after(10):
        async with open_frames(daemon, token) as old, open_frames(daemon, bob_token) as bob:
            assert (await Frames(old).ask(op="jobs", id=1))["type"] == "jobs"
            changed = await ask_admin(daemon, "users", action=action, name="alice")
            assert changed["ok"] is True
            with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                await Frames(old).ask(op="submit", kind="quick", id=2)
            # Another user's session goes on.
            assert (await Frames(bob).ask(op="jobs", id=3))["type"] == "jobs"
    assert (closed.value.reason.code, closed.value.reason.reason) == (1008, reason)
    with pytest.raises(trio_websocket.ConnectionRejected) as refused:
        async with open_frames(daemon, token):
            pass
    assert refused.value.status_code == 401


async def test_stopping_the_daemon_closes_connections_with_1001(alice):
    daemon, token = alice
    with trio.fail_after(10):
        async with open_frames(daemon, token) as ws:
            await daemon.stop()
            with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                await ws.get_message()
    assert closed.value.reason.code == 1001


# -- every event, once, in order -------------------------------------------------------------


async def test_two_hundred_watchers_each_get_every_event_of_their_job_once_in_order(alice):
    daemon, token = alice
    jobs = [
        await daemon.submit("stepper", {"steps": 10, "step_seconds": 0.01}, user="alice")
        for _ in range(20)
    ]
    seen: dict[int, list[int]] = {}

    async def watcher(n: int, job_id: int) -> None:
        async with connect(url_of(daemon), token) as client:
            seen[n] = [event.seq async for event in client.watch(job_id)]

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for n in range(200):
                nursery.start_soon(watcher, n, jobs[n % 20].id)
    stored = {job.id: await stored_seqs(daemon, job.id) for job in jobs}
    assert len(seen) == 200
    for n, seqs in seen.items():
        assert seqs == stored[jobs[n % 20].id]
    assert all(len(seqs) >= 13 for seqs in stored.values())


async def test_the_client_follows_a_resync_without_a_gap(start_daemon):
    daemon = await start_daemon(KINDS + websocket("queue = 1"), max_concurrent_jobs=10)
    token = await add_user(daemon, "alice")
    seqs, finished = [], set()
    with trio.fail_after(30), capture_logs() as logs:
        async with connect(url_of(daemon), token) as client, client.watch_all(since=0) as watch:
            for _ in range(10):
                await client.submit("stepper", {"steps": 30, "step_seconds": 0})
            async for event in watch:
                seqs.append(event.seq)
                if event.type == "status" and event.data["status"] in TERMINAL_STATUSES:
                    finished.add(event.job)
                    if len(finished) == 10:
                        break
    stored = [seq for job in range(1, 11) for seq in await stored_seqs(daemon, job)]
    assert seqs == sorted(stored)
    assert "websocket watcher fell behind" in [entry["event"] for entry in logs]


class Proxy:
    """A TCP relay in front of the daemon's WebSocket: `cut()` drops every connection at once,
    as a network failure does, and `target` can point it at a restarted daemon. While `deaf`,
    what the daemon sends is lost on the way, as before a connection is seen to be dead."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.connections = 0
        self.deaf = False
        self._relays: set[trio.CancelScope] = set()

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        await trio.serve_listeners(self._relay, listeners, task_status=task_status)

    def cut(self) -> None:
        for relay in self._relays:
            relay.cancel()

    async def _relay(self, client: trio.SocketStream) -> None:
        self.connections += 1
        with trio.CancelScope() as relay:
            self._relays.add(relay)
            try:
                upstream = await trio.open_tcp_stream("127.0.0.1", self.target)
            except OSError:
                await client.aclose()
                return
            async with client, upstream, trio.open_nursery() as nursery:
                nursery.start_soon(_pipe, client, upstream, nursery.cancel_scope)
                nursery.start_soon(_pipe, upstream, client, nursery.cancel_scope, self)
        self._relays.discard(relay)


async def _pipe(
    source: trio.SocketStream,
    sink: trio.SocketStream,
    relay: trio.CancelScope,
    deafened_by: Proxy | None = None,
):
    try:
        async for data in source:
            if deafened_by is None or not deafened_by.deaf:
                await sink.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    relay.cancel()


@pytest.fixture
async def proxied(alice, nursery):
    """Alice's daemon, her token, and a proxy in front of the daemon's WebSocket."""
    daemon, token = alice
    proxy = Proxy(daemon.handle.websocket_port)
    await nursery.start(proxy.run)
    return daemon, token, proxy


async def test_a_dropped_connection_resumes_without_gap_or_duplicate(proxied):
    daemon, token, proxy = proxied
    events = []
    with trio.fail_after(30):
        async with connect(f"ws://127.0.0.1:{proxy.port}/", token) as client:
            job = await client.submit("stepper", {"steps": 40, "step_seconds": 0.005})
            async for event in client.watch(job.id):
                events.append(event.seq)
                if len(events) in (3, 15, 30):
                    proxy.cut()
    assert events == await stored_seqs(daemon, job.id)
    # A cut may find the client between attempts: at least one drop was lived through.
    assert proxy.connections >= 2


async def test_a_submit_sent_again_after_its_job_finished_gets_that_job(proxied):
    """The reply to a submit is lost with its connection, and the job runs to its end before
    the client is back. The client sends the submit again: it gets the finished job, and no
    second run, although a finished job's key is free for new work."""
    daemon, token, proxy = proxied
    with trio.fail_after(30), daemon.handle.hub.subscribe(user="alice") as events:
        async with connect(f"ws://127.0.0.1:{proxy.port}/", token) as client:
            proxy.deaf = True
            answers = []

            async def submit() -> None:
                answers.append(await client.submit("quick", {"seconds": 0}))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(submit)
                while (event := await events.events.receive()).data.get("status") != "done":
                    pass
                proxy.deaf = False
                proxy.cut()
    jobs_made = await daemon.handle.store.read(
        partial(jobs.list_jobs, statuses=None, kind=None, user="alice", limit=10)
    )
    assert [job.id for job in jobs_made] == [event.job]
    assert (answers[0].id, answers[0].existing, answers[0].status) == (event.job, True, "done")
    assert proxy.connections >= 2


async def test_a_watch_resumes_from_the_store_across_a_daemon_restart(start_daemon, proxied):
    daemon, token, proxy = proxied
    events = []
    with trio.fail_after(30):
        async with connect(f"ws://127.0.0.1:{proxy.port}/", token) as client:
            job = await client.submit("stepper", {"steps": 6, "step_seconds": 0.02})
            async for event in client.watch(job.id):
                events.append(event)
                if event.type == "progress" and event.data["fraction"] == 0.5:
                    await daemon.stop(grace=0)
                    daemon = await start_daemon(KINDS, max_concurrent_jobs=20)
                    proxy.target = daemon.handle.websocket_port
    assert [event.seq for event in events] == await stored_seqs(daemon, job.id)
    statuses = [(e.data["status"], e.data.get("reason")) for e in events if e.type == "status"]
    assert statuses == [
        ("queued", None),
        ("running", None),
        ("queued", "INTERRUPTED"),
        ("running", None),
        ("done", None),
    ]
    assert events[-1].data["result"] == {"steps": 6, "resumed_from": 3}


async def test_a_client_that_stops_reading_is_told_to_resync_and_costs_a_bounded_buffer(
    start_daemon, nursery
):
    daemon = await start_daemon(KINDS + websocket("queue = 16"))
    token = await add_user(daemon, "alice")
    job = await daemon.submit("stepper", {"steps": 1000, "step_seconds": 0}, user="alice")
    with trio.fail_after(30):
        sock = trio.socket.socket()
        # A small receive window, so the daemon's sends stall soon after the client stops.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        await sock.connect(("127.0.0.1", daemon.handle.websocket_port))
        ws = await trio_websocket.wrap_client_stream(
            nursery, trio.SocketStream(sock), "127.0.0.1", "/", extra_headers=bearer(token)
        )
        frames = Frames(ws)
        await frames.send(op="watch", job=job.id, id="w")
        await daemon.wait_done(job.id)
        stalled = (await ask(daemon.handle.monitor, HealthQuery))["websocket"]
        first = []
        while (frame := await frames.receive())["type"] != "resync":
            first.extend([frame["seq"]] if "seq" in frame else [])
        after = (await ask(daemon.handle.monitor, HealthQuery))["websocket"]
        await frames.send(op="watch", job=job.id, since=frame["since"], id="again")
        rest = [event["seq"] for event in await frames.events_until_done(job.id)]
        await ws.aclose()
    stored = await stored_seqs(daemon, job.id)
    assert stalled["connections"] == 1 and stalled["buffered_frames"] <= 16
    assert frame == {"type": "resync", "watch": job.id, "since": first[-1]}
    assert len(first) < len(stored) and after["watches"] == 0
    assert first + rest == stored


async def test_a_far_end_that_hangs_up_in_the_handshake_fails_the_attempt_at_once(nursery):
    async def hang_up(stream: trio.SocketStream) -> None:
        await stream.aclose()

    listeners = await nursery.start(partial(trio.serve_tcp, hang_up, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    # Well before the attempt's own timeout: nothing waits for an answer that cannot come.
    with trio.fail_after(5), pytest.raises(DaemonUnreachable, match="during the handshake"):
        async with connect(f"ws://127.0.0.1:{port}/", "jw_token", timeout=30):
            pass


async def test_the_client_passes_over_a_type_of_event_newer_than_itself(nursery):
    event = {"watch": 7, "job": 7, "user": "ada", "kind": "k", "at": 1.0}

    async def newer_daemon(request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept()
        watch = json.loads(await ws.get_message())
        frames = [
            {"type": "watching", "id": watch["id"], "watch": 7, "since": 0},
            {**event, "type": "forecast", "seq": 1, "data": {"eta": 12.5}},
            {**event, "type": "status", "seq": 2, "data": {"status": "done", "attempt": 1}},
        ]
        for frame in frames:
            await ws.send_message(json.dumps(frame))
        with contextlib.suppress(trio_websocket.ConnectionClosed):
            while True:
                await ws.get_message()  # until the client has gone

    server = await nursery.start(trio_websocket.serve_websocket, newer_daemon, "127.0.0.1", 0, None)
    with trio.fail_after(10):
        async with connect(f"ws://127.0.0.1:{server.port}/", "jw_token") as client:
            seen = [(event.seq, event.type) async for event in client.watch(7)]
    assert seen == [(2, "status")]


# -- the CLI over --url ----------------------------------------------------------------------


class Output:
    out = ""
    err = ""


@contextlib.contextmanager
def cli_output(capsys):
    """What the CLI printed. The daemon logs to stdout in this process as well, so its log is
    caught meanwhile, and the CLI's output read before it stops being caught."""
    capsys.readouterr()
    output = Output()
    with trio.fail_after(30), capture_logs():
        yield output
        output.out, output.err = capsys.readouterr()


async def jobwarden(*argv: str) -> int:
    """`jobwarden ARGV` in a thread of its own: the CLI runs its own trio loop."""
    return await trio.to_thread.run_sync(main, list(argv))


async def test_cli_submit_watch_over_websocket_follows_the_job_to_its_result(alice, capsys):
    daemon, token = alice
    payload = '{"steps": 2, "step_seconds": 0.01}'
    with cli_output(capsys) as output:
        code = await jobwarden(
            "submit", "stepper", payload, "--watch", "--url", url_of(daemon), "--token", token
        )
    assert code == 0
    assert output.out.splitlines() == [
        "submitted job 1",
        "job 1 status queued attempt 0",
        "job 1 status running attempt 1",
        "job 1 progress 50% step 1/2",
        "job 1 progress 100% step 2/2",
        "job 1 status done attempt 1",
        "{",
        '  "steps": 2,',
        '  "resumed_from": 0',
        "}",
    ]


async def test_cli_watch_over_websocket_exits_1_with_the_error_of_a_failed_job(
    alice, capsys, monkeypatch
):
    daemon, token = alice
    job = await daemon.submit("quick", {"seconds": 0, "fail": True}, user="alice")
    await daemon.wait_done(job.id)
    monkeypatch.setenv("JOBWARDEN_TOKEN", token)
    with cli_output(capsys) as output:
        code = await jobwarden("watch", str(job.id), "--json", "--url", url_of(daemon))
    statuses = [json.loads(line)["data"]["status"] for line in output.out.splitlines()]
    assert (code, statuses) == (1, ["queued", "running", "failed"])
    assert output.err == ""


@pytest.mark.parametrize(
    ("argv", "exit_code", "complaint"),
    [
        (["watch", "{job}", "--url", "{url}", "--token", "jw_wrong"], 1, "error UNAUTHENTICATED"),
        (["watch", "{job}", "--url", "{url}", "--token", "{token}"], 2, "error NOT_FOUND: no job"),
        (["watch", "1", "--url", "{url}"], 2, "--url needs your token"),
        (["watch", "1", "--token", "{token}"], 2, "--token goes with --url"),
        (["watch", "1", "--url", "ftp://x", "--token", "t"], 2, "--url: expected ws://"),
        (
            ["submit", "quick", "{{}}", "--url", "{url}", "--token", "t", "--user", "bob"],
            2,
            "--user",
        ),
        (["watch", "1", "--url", "ws://127.0.0.1:{closed}", "--token", "t"], 3, "refused"),
    ],
    ids=["wrong-token", "someone-elses", "no-token", "token-alone", "ftp", "user", "no-daemon"],
)
async def test_cli_over_websocket_exit_codes(alice, capsys, argv, exit_code, complaint):
    daemon, token = alice
    bobs = await daemon.submit("quick", {"seconds": 0}, user="bob")
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        closed = unused.getsockname()[1]
    fields = {"url": url_of(daemon), "token": token, "job": bobs.id, "closed": closed}
    with cli_output(capsys) as output:
        code = await jobwarden(*(arg.format(**fields) for arg in argv))
    assert code == exit_code
    assert complaint in output.err


# -- another client library ------------------------------------------------------------------


async def test_the_acceptance_script_passes_with_an_independent_client_library(alice):
    daemon, token = alice
    script = REPO_ROOT / "tests" / "ws_acceptance.py"
    payload = json.dumps({"steps": 20, "step_seconds": 0.01})
    argv = ["--url", url_of(daemon), "--token", token, "--kind", "stepper", "--payload", payload]
    with trio.fail_after(60):
        done = await trio.run_process(
            [sys.executable, str(script), *argv, "--drop-after", "5"],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    events = len(await daemon.events(1))
    assert (done.returncode, done.stderr.decode()) == (0, "")
    assert done.stdout.decode().startswith(f"ok: job 1 done, {events} events in order once each")
