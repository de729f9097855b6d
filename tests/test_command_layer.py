"""The command layer every listener calls: what is wrong with a request, said once; the same
question answered alike on the admin socket and the WebSocket; one error shape for what went
wrong inside; one cap on connections."""

from __future__ import annotations

import json

import pytest
import trio
from structlog.testing import capture_logs

from jobwarden.errors import RequestError
from jobwarden.process.commands import ADMIN, BadRequest, ConnectionCap, decode
from jobwarden.store import jobs
from jobwarden.wire.admin import JobsArgs, JobsRequest, PingRequest, SubmitArgs, SubmitRequest
from tests.test_admin import read_lines, request_lines
from tests.test_websocket import KINDS, Frames, add_user, open_frames

KNOWN_COMMANDS = (
    "breaker, breakers, budget, cancel, drain, jobs, ledger, pause, ping, resume, retry, show, "
    "shutdown, status, stuck, submit, users, watch"
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
    ],
    ids=["args-left-out", "defaults", "any-key-order"],
)
def test_an_admin_request_decodes_to_its_command_in_one_step(line, typed):
    assert decode(ADMIN, line) == typed


# -- the same question on every door ---------------------------------------------------------


async def ask_admin(daemon, cmd: str, **args: object) -> dict:
    socket_path = daemon.handle.store.path.replace("jw.db", "admin.sock")
    stream = await trio.open_unix_socket(socket_path)
    async with stream:
        await request_lines(stream, {"id": 1, "cmd": cmd, "args": args})
        async for message in read_lines(stream):
            return message
    raise AssertionError("the admin socket closed without a reply")


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
