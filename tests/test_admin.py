"""The admin socket in process: watch completeness under a slow reader, peer rules."""

from __future__ import annotations

import json
import os

import pytest
import trio

from jobwarden.process.admin import peer_allowed

pytestmark = pytest.mark.both_stores

KINDS = """
[kinds.stepper]
handler = "tests.handlers:stepper"
"""


async def request_lines(stream: trio.SocketStream, *requests: dict) -> None:
    await stream.send_all(b"".join(json.dumps(r).encode() + b"\n" for r in requests))


async def read_lines(stream: trio.SocketStream):
    buffer = b""
    async for chunk in stream:
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            yield json.loads(line)


async def ask_admin(daemon, cmd: str, **args: object) -> dict:
    """One request on a connection of its own, and its reply."""
    socket_path = daemon.admin_socket
    stream = await trio.open_unix_socket(socket_path)
    async with stream:
        await request_lines(stream, {"id": 1, "cmd": cmd, "args": args})
        async for message in read_lines(stream):
            return message
    raise AssertionError("the admin socket closed without a reply")


async def test_a_watcher_that_stops_reading_still_gets_every_event_once(start_daemon):
    daemon = await start_daemon(KINDS)
    job = await daemon.submit("stepper", {"steps": 1500, "step_seconds": 0})
    socket_path = daemon.admin_socket
    with trio.fail_after(30):
        stream = await trio.open_unix_socket(socket_path)
        async with stream:
            await request_lines(stream, {"id": "w", "cmd": "watch", "args": {"job": job.id}})
            # Read nothing until the job is over: the hub's buffer overflows meanwhile.
            final = await daemon.wait_done(job.id)
            assert final.status == "done"
            seqs, statuses = [], []
            async for message in read_lines(stream):
                if "event" not in message:
                    assert message["ok"] is True
                    continue
                event = message["event"]
                seqs.append(event["seq"])
                if event["type"] == "status":
                    statuses.append(event["data"]["status"])
                if statuses[-1:] == ["done"]:
                    break
    stored = [e.seq for e in await daemon.events(job.id)]
    assert seqs == stored
    assert len(seqs) == 1500 + 3
    assert statuses == ["queued", "running", "done"]


async def test_requests_on_one_connection_answer_by_id(start_daemon):
    daemon = await start_daemon(KINDS)
    socket_path = daemon.admin_socket
    with trio.fail_after(10):
        stream = await trio.open_unix_socket(socket_path)
        async with stream:
            await request_lines(
                stream,
                *[
                    {"id": n, "cmd": "submit", "args": {"kind": "stepper", "payload": {"steps": 0}}}
                    for n in range(50)
                ],
                {"id": "bad", "cmd": "submit", "args": {"kind": "stepper", "priority": "high"}},
            )
            replies = {}
            async for message in read_lines(stream):
                replies[message["id"]] = message
                if len(replies) == 51:
                    break
    assert all(replies[n]["ok"] for n in range(50))
    assert len({replies[n]["data"]["job"]["id"] for n in range(50)}) == 50
    assert replies["bad"]["error"]["code"] == "INVALID_REQUEST"
    assert "priority" in replies["bad"]["error"]["message"]


@pytest.mark.parametrize(
    ("uid", "gid", "group_gid", "allowed"),
    [
        (0, 0, None, True),
        (os.getuid(), 1234, None, True),
        (4321, 4321, None, False),
        (4321, 777, 777, True),
        (4321, 4321, 777, False),
    ],
    ids=["root", "daemon-user", "stranger", "group-member", "stranger-with-group-set"],
)
def test_peer_rules(uid, gid, group_gid, allowed):
    assert peer_allowed(uid, gid, daemon_uid=os.getuid(), group_gid=group_gid) is allowed


async def test_a_client_that_hangs_up_mid_replies_does_not_hurt_the_daemon(start_daemon):
    daemon = await start_daemon(KINDS)
    socket_path = daemon.admin_socket
    with trio.fail_after(20):
        for _ in range(3):
            stream = await trio.open_unix_socket(socket_path)
            submit = {"cmd": "submit", "args": {"kind": "stepper", "payload": {"steps": 0}}}
            # Far more replies than the socket buffers, never read: the daemon's sends fail.
            with trio.move_on_after(0.5):
                await request_lines(stream, *[{"id": n, **submit} for n in range(3000)])
            await stream.aclose()
        stream = await trio.open_unix_socket(socket_path)
        async with stream:
            await request_lines(stream, {"id": "still-there", "cmd": "ping"})
            async for message in read_lines(stream):
                assert message["id"] == "still-there" and message["ok"] is True
                break


async def test_requests_sent_before_a_half_close_are_still_answered(start_daemon):
    daemon = await start_daemon(KINDS)
    socket_path = daemon.admin_socket
    with trio.fail_after(10):
        stream = await trio.open_unix_socket(socket_path)
        async with stream:
            submit = {"kind": "stepper", "payload": {"steps": 0}}
            await request_lines(
                stream,
                {"id": 1, "cmd": "ping"},
                {"id": 2, "cmd": "submit", "args": submit},
                {"id": 3, "cmd": "watch", "args": {}},
            )
            # As `printf ... | socat - UNIX-CONNECT:...` does: done writing, still reading.
            await stream.send_eof()
            replies = {message["id"]: message async for message in read_lines(stream)}
    assert replies[1]["ok"] and replies[2]["ok"]
    assert replies[2]["data"]["job"]["status"] == "queued"
    # The watch is answered too, and ends at once: its client has stopped sending.
    assert replies[3]["ok"] and replies[3]["data"]["watching"] == "all"


async def test_a_watch_sent_with_a_half_close_is_answered_with_its_history(start_daemon):
    daemon = await start_daemon(KINDS)
    job = await daemon.submit("stepper", {"steps": 0})
    await daemon.wait_done(job.id)
    socket_path = daemon.admin_socket
    with trio.fail_after(10):
        for _ in range(20):
            stream = await trio.open_unix_socket(socket_path)
            async with stream:
                await request_lines(stream, {"id": "w", "cmd": "watch", "args": {"job": job.id}})
                await stream.send_eof()
                replies = [message async for message in read_lines(stream)]
            assert replies[0]["ok"] and replies[0]["data"]["watching"] == job.id


# -- silent peers (the defaults: admin.idle_timeout 60s, admin.line_timeout 10s) -----------


async def test_half_a_line_left_unfinished_is_refused_and_closed_after_line_timeout(
    autojump_clock, start_daemon
):
    daemon = await start_daemon(KINDS)
    socket_path = daemon.admin_socket
    with trio.fail_after(30):
        stream = await trio.open_unix_socket(socket_path)
        async with stream:
            started = trio.current_time()
            await stream.send_all(b'{"id": 1, "cmd": "sta')
            replies = [message async for message in read_lines(stream)]
            waited = trio.current_time() - started
    assert [reply["error"]["code"] for reply in replies] == ["INVALID_REQUEST"]
    assert replies[0]["error"]["message"] == (
        "a request line must end with a newline within 10s; closing"
    )
    assert 10 <= waited < 11


async def test_an_idle_connection_is_closed_after_idle_timeout_but_one_watching_stays(
    autojump_clock, start_daemon
):
    daemon = await start_daemon(KINDS)
    socket_path = daemon.admin_socket
    with trio.fail_after(300):
        idle = await trio.open_unix_socket(socket_path)
        watching = await trio.open_unix_socket(socket_path)
        async with idle, watching:
            await request_lines(idle, {"id": 1, "cmd": "ping"})
            await request_lines(watching, {"id": "w", "cmd": "watch", "args": {}})
            answered = trio.current_time()
            # Read to the end: the daemon closes the idle one a minute after its last reply.
            assert [message["id"] async for message in read_lines(idle)] == [1]
            closed = trio.current_time()
            await trio.sleep(120)
            job = await daemon.submit("stepper", {"steps": 0})
            async for message in read_lines(watching):
                if message.get("event", {}).get("job") == job.id:
                    break
    assert 60 <= closed - answered < 61


async def test_a_client_that_takes_no_replies_loses_its_connection_after_idle_timeout(
    autojump_clock, start_daemon
):
    daemon = await start_daemon(KINDS)
    socket_path = daemon.admin_socket
    with trio.fail_after(600):
        stream = await trio.open_unix_socket(socket_path)
        async with stream:
            # Far more replies than the socket buffers (a status is over a kilobyte), and
            # never a read until the daemon has given up on this reader.
            await request_lines(stream, *[{"id": n, "cmd": "status"} for n in range(2000)])
            await trio.sleep(61)
            replies = [message["id"] async for message in read_lines(stream)]
    assert 0 < len(replies) < 2000


async def test_a_credit_balance_stops_at_the_largest_integer_a_column_holds(start_daemon):
    daemon = await start_daemon(KINDS)
    largest = 2**63 - 1
    with trio.fail_after(10):
        await ask_admin(daemon, "users", action="add", name="bob", credits=largest)
        raised = await ask_admin(daemon, "users", action="credits", name="bob", change=largest)
        lowered = await ask_admin(daemon, "users", action="credits", name="bob", change=-(2**63))
    # Not a float of 1.8e19: the sum past the column's range would have become one.
    assert raised["data"]["user"]["credits"] == largest
    assert lowered["data"]["user"]["credits"] == 0
