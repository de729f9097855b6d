"""The command layer every listener calls: what is wrong with a request, said once; the same
question answered alike on the admin socket and the WebSocket; one error shape for what went
wrong inside; one cap on connections."""

from __future__ import annotations

import json

import pytest
import trio
from structlog.testing import capture_logs

from jobwarden.errors import RequestError
from jobwarden.process import commands
from jobwarden.process.commands import ADMIN, BadRequest, ConnectionCap, Sessions, decode
from jobwarden.store import jobs
from jobwarden.wire.admin import JobsArgs, JobsRequest, PingRequest, SubmitArgs, SubmitRequest
from tests.test_admin import ask_admin, read_lines, request_lines
from tests.test_http import get
from tests.test_websocket import KINDS, Frames, add_user, open_frames

pytestmark = pytest.mark.both_stores

KNOWN_COMMANDS = (
    "breaker, breakers, budget, cancel, cancel_many, drain, hold, jobs, ledger, logs, pause, ping, "
    "release, resume, retry, retry_many, schedules, show, shutdown, status, stuck, submit, "
    "submit_many, tokens, users, watch, webhooks"
)

# -- decoding --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "request_id", "message"),
    [
        (b"hello daemon", None, "not valid JSON: JSON is malformed: invalid character (byte 0)"),
        (b"[1, 2, 3]", None, 'a request is a JSON object, like {"id": 1, "cmd": "ping"}'),
        (b'{"id": 1}', 1, f"no command (known: {KNOWN_COMMANDS})"),
        (
            b'{"id": 2, "cmd": "frobnicate"}',
            2,
            f"unknown command 'frobnicate' (known: {KNOWN_COMMANDS})",
        ),
        (
            b'{"id": 3, "cmd": "show", "args": {"job": "seven"}}',
            3,
            "show: job: Expected `int`, got `str`",
        ),
        (b'{"id": 4, "cmd": "show", "args": {}}', 4, "show: Object missing required field `job`"),
        (b'{"id": 5, "cmd": "show"}', 5, "show: Object missing required field `job`"),
        (
            b'{"id": 6, "cmd": "submit", "args": {"kind": "k", "colour": "red"}}',
            6,
            "submit: colour: unknown key",
        ),
        (
            b'{"id": 7, "cmd": "jobs", "args": {"status": ["bogus"]}}',
            7,
            "jobs: status.0: Invalid enum value 'bogus'",
        ),
        (b'{"id": 8, "cmd": "ping", "extra": 1}', 8, "not a valid request: extra: unknown key"),
        (
            b'{"id": 9, "cmd": "ping", "args": [1]}',
            9,
            "not a valid request: args: Expected `object`, got `array`",
        ),
        (
            b'{"id": [10], "cmd": "ping"}',
            None,
            "not a valid request: id: Expected `int | str | null`, got `array`",
        ),
        (
            b'{"id": 11, "cmd": "show", "args": {"job": 1e400}}',
            None,
            "not a valid request: args.job: Number out of range",
        ),
        (
            b'{"id": 12, "cmd": "show", "args": {"job": 9223372036854775808}}',
            12,
            "show: job: Expected `int` <= 9223372036854775807",
        ),
        (
            b'{"id": 13, "cmd": "submit", "args": {"kind": "k", "priority": 18446744073709551616}}',
            13,
            "submit: priority: Expected `int` <= 9223372036854775807",
        ),
        (
            b'{"id": 14, "cmd": "jobs", "args": {"limit": -9223372036854775809}}',
            14,
            "jobs: limit: Expected `int` >= -9223372036854775808",
        ),
        (
            b'{"id": 18446744073709551616, "cmd": "ping"}',
            None,
            "not a valid request: id: Expected `int` <= 9223372036854775807",
        ),
        (
            b'{"id": 15, "cmd": "submit", "args": {"kind": "k", "payload": '
            + b"[" * 63
            + b"]" * 63
            + b"}}",
            None,
            "arrays and objects nest deeper than 64 levels",
        ),
        (
            b'{"id": 16, "cmd": "ping", "args": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
            None,
            "arrays and objects nest deeper than 64 levels",
        ),
        (
            b'{"id": 17, "cmd": "ping", "extra": 1, "later": "\xff"}',
            None,
            "not valid JSON: Invalid UTF-8 encoded string",
        ),
    ],
    ids=[
        "not-json",
        "not-an-object",
        "no-command",
        "unknown-command",
        "wrong-type",
        "missing-argument",
        "no-args-at-all",
        "unknown-argument",
        "bad-list-item",
        "unknown-field",
        "args-not-an-object",
        "bad-id",
        "number-out-of-range",
        "job-id-no-store-holds",
        "priority-no-store-holds",
        "limit-no-store-holds",
        "request-id-no-store-holds",
        "payload-nested-too-deep",
        "nested-deeper-than-the-stack",
        "invalid-utf8-after-an-unknown-field",
    ],
)
def test_an_admin_request_that_does_not_decode_says_what_is_wrong(line, request_id, message):
    bad = decode(ADMIN, line)
    assert isinstance(bad, BadRequest)
    assert bad.request_id == request_id
    assert (bad.error.code, bad.error.message, bad.error.retryable) == (
        "INVALID_REQUEST",
        message,
        False,
    )
    assert bad.error.error_id


@pytest.mark.parametrize(
    ("line", "typed"),
    [
        (b'{"cmd": "ping"}', PingRequest()),
        (b'{"id": "j", "cmd": "jobs", "args": {}}', JobsRequest(id="j", args=JobsArgs())),
        (
            b'{"args": {"kind": "k"}, "cmd": "submit", "id": 3}',
            SubmitRequest(id=3, args=SubmitArgs(kind="k")),
        ),
        (
            b'{"id": 1, "cmd": "submit", "args": {"kind": "' + b"[{" * 100 + b'"}}',
            SubmitRequest(id=1, args=SubmitArgs(kind="[{" * 100)),
        ),
    ],
    ids=["args-left-out", "defaults", "any-key-order", "brackets-in-a-string-do-not-nest"],
)
def test_an_admin_request_decodes_to_its_command_in_one_step(line, typed):
    assert decode(ADMIN, line) == typed


# -- the same question on every door ---------------------------------------------------------


def without_error_id(error: dict) -> dict:
    assert error["error_id"]
    return {key: value for key, value in error.items() if key != "error_id"}


@pytest.fixture
async def alice_and_daemon(start_daemon):
    daemon = await start_daemon(KINDS)
    return daemon, await add_user(daemon, "alice")


@pytest.mark.parametrize(
    ("cmd", "op", "fields"),
    [
        ("submit", "submit", {"kind": "nope", "payload": {}}),
        ("cancel", "cancel", {"job": 10**6}),
        ("watch", "watch", {"job": 10**6}),
        ("watch", "watch", {"job": 1, "since": -1}),
    ],
    ids=["unknown-kind", "cancel-no-such-job", "watch-no-such-job", "watch-negative-since"],
)
async def test_the_same_refusal_is_the_same_error_on_the_admin_socket_and_the_websocket(
    alice_and_daemon, cmd, op, fields
):
    daemon, token = alice_and_daemon
    with trio.fail_after(10):
        admin = await ask_admin(daemon, cmd, **fields)
        async with open_frames(daemon, token) as ws:
            websocket = await Frames(ws).ask(op=op, id=1, **fields)
    assert (admin["ok"], websocket["type"]) == (False, "error")
    assert without_error_id(admin["error"]) == without_error_id(websocket["error"])


async def test_a_user_lists_fewer_jobs_at_once_than_the_operator(alice_and_daemon):
    daemon, token = alice_and_daemon
    with trio.fail_after(10):
        admin = await ask_admin(daemon, "jobs", limit=5000)
        async with open_frames(daemon, token) as ws:
            websocket = await Frames(ws).ask(op="jobs", id=1, limit=5000)
    assert admin["ok"] is True
    assert websocket["error"]["message"] == "jobs: limit must be within 1..1000"


async def test_a_failure_inside_is_internal_with_an_error_id_logged_once_without_locals(
    alice_and_daemon, monkeypatch
):
    daemon, token = alice_and_daemon

    def broken_list_jobs(conn, **query):
        secret = "a local no log line may show"  # noqa: F841
        raise RuntimeError("the disk is on fire")

    monkeypatch.setattr(jobs, "list_jobs", broken_list_jobs)
    with trio.fail_after(10), capture_logs() as logs:
        admin = (await ask_admin(daemon, "jobs"))["error"]
        async with open_frames(daemon, token) as ws:
            websocket = (await Frames(ws).ask(op="jobs", id=1))["error"]
    assert without_error_id(admin) == without_error_id(websocket)
    assert (admin["code"], admin["retryable"]) == ("INTERNAL", False)
    assert admin["technical_message"] == "the disk is on fire"
    failures = [entry for entry in logs if entry["event"] == "request failed"]
    assert [(entry["listener"], entry["error_id"]) for entry in failures] == [
        ("admin", admin["error_id"]),
        ("websocket", websocket["error_id"]),
    ]
    for entry in failures:
        assert "exc_info" not in entry
        assert entry["error"] == "RuntimeError"
        assert "broken_list_jobs" in entry["traceback"]
        assert "a local no log line may show" not in json.dumps(entry)


# -- connections -----------------------------------------------------------------------------


def test_a_full_cap_refuses_with_queue_full_until_a_slot_is_given_back():
    cap = ConnectionCap(2, "admin clients")
    with cap.admit():
        with cap.admit(), pytest.raises(RequestError) as refused:
            cap.admit()
        # The slot given back is free for the next client.
        with cap.admit():
            pass
    assert (refused.value.body.code, refused.value.body.retryable) == ("QUEUE_FULL", True)
    assert refused.value.body.message == "the daemon serves at most 2 admin clients"


# -- one request's failure is that request's ---------------------------------------------------


async def test_a_failure_while_decoding_is_internal_and_the_connection_answers_on(
    alice_and_daemon, monkeypatch
):
    daemon, _ = alice_and_daemon
    real_decode = commands.decode

    def decode_failing_on_pings(grammar, data):
        if b'"ping"' in data:
            raise RuntimeError("a decoder bug")
        return real_decode(grammar, data)

    monkeypatch.setattr(commands, "decode", decode_failing_on_pings)
    socket_path = daemon.admin_socket
    with trio.fail_after(10), capture_logs():
        stream = await trio.open_unix_socket(socket_path)
        async with stream:
            await request_lines(stream, {"id": 1, "cmd": "ping"}, {"id": 2, "cmd": "status"})
            replies = {}
            async for message in read_lines(stream):
                replies[message["id"]] = message
                if len(replies) == 2:
                    break
    # Its id was never read: the request failed before it was decoded.
    assert replies[None]["error"]["code"] == "INTERNAL"
    assert replies[2]["ok"] is True


# -- refusals ----------------------------------------------------------------------------------


async def test_refusals_are_counted_logged_once_a_connection_and_summed_up_each_minute(
    autojump_clock, alice_and_daemon
):
    daemon, token = alice_and_daemon
    socket_path = daemon.admin_socket
    # A kind name of 51 KB, as the fuzzer sent: it must not reach the log whole.
    huge_kind = "k" * 51_000
    with trio.fail_after(120), capture_logs() as logs:
        stream = await trio.open_unix_socket(socket_path)
        async with stream:
            await request_lines(
                stream,
                *[{"id": n, "cmd": "submit", "args": {"kind": huge_kind}} for n in range(50)],
            )
            replies = 0
            async for _ in read_lines(stream):
                replies += 1
                if replies == 50:
                    break
        async with open_frames(daemon, token) as ws:
            frames = Frames(ws)
            for n in range(30):
                assert (await frames.ask(op="submit", kind=huge_kind, id=n))["type"] == "error"
        await trio.sleep(61)
        _, metrics = await get(daemon.handle.http_port, "/metrics")
    refused = [entry for entry in logs if entry["event"] == "request refused"]
    assert [(entry["listener"], entry["code"]) for entry in refused] == [
        ("admin", "INVALID_REQUEST"),
        ("websocket", "INVALID_REQUEST"),
    ]
    assert all(len(entry["message"]) < 300 for entry in refused)
    summaries = {
        entry["listener"]: entry["by_code"]
        for entry in logs
        if entry["event"] == "requests refused"
    }
    assert summaries == {"admin": {"INVALID_REQUEST": 49}, "websocket": {"INVALID_REQUEST": 29}}
    assert not [entry for entry in logs if entry["event"] == "submit rejected"]
    assert (
        b'jobwarden_requests_refused_total{code="INVALID_REQUEST",listener="admin"} 50.0' in metrics
    )
    assert (
        b'jobwarden_requests_refused_total{code="INVALID_REQUEST",listener="websocket"} 30.0'
        in metrics
    )


# -- sessions --------------------------------------------------------------------------------


class FakeSession:
    def __init__(self) -> None:
        self.ended: list[tuple[int, str]] = []

    def end(self, code: int, reason: str) -> None:
        self.ended.append((code, reason))


def test_revoking_a_user_ends_their_open_sessions_only():
    sessions = Sessions()
    alice, bob = FakeSession(), FakeSession()
    with (
        sessions.open("alice", alice, sessions.opening()),
        sessions.open("bob", bob, sessions.opening()),
    ):
        assert sessions.revoke("alice", "user disabled") == 1
    assert (alice.ended, bob.ended) == ([(1008, "user disabled")], [])


def test_a_session_whose_token_was_revoked_while_it_opened_ends_at_once():
    sessions = Sessions()
    # The token was read, then replaced, before the session was accepted and opened.
    mark = sessions.opening()
    sessions.revoke("alice", "token revoked")
    late, fresh = FakeSession(), FakeSession()
    with sessions.open("alice", late, mark):
        pass
    with sessions.open("alice", fresh, sessions.opening()):
        pass
    assert (late.ended, fresh.ended) == ([(1008, "token revoked")], [])
