"""The admin socket in process: watch completeness under a slow reader, peer rules."""

from __future__ import annotations

import json
import os

import pytest
import trio

from jobwarden.process.admin import peer_allowed

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


async def test_a_watcher_that_stops_reading_still_gets_every_event_once(start_daemon):
    daemon = await start_daemon(KINDS)
    job = await daemon.submit("stepper", {"steps": 1500, "step_seconds": 0})
    socket_path = daemon.handle.store.path.replace("jw.db", "admin.sock")
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
    socket_path = daemon.handle.store.path.replace("jw.db", "admin.sock")
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
    socket_path = daemon.handle.store.path.replace("jw.db", "admin.sock")
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
    socket_path = daemon.handle.store.path.replace("jw.db", "admin.sock")
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
