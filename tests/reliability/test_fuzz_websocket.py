"""Fuzzing the WebSocket of a real `jobwarden serve`, as a hostile user with a token would.

Each connection sends a few generated ops (see fuzz.Hostile) as text frames, some binary,
some fragmented, pings between them, and waits for a reply to each; then it may end with a
frame the protocol forbids, or drop the TCP connection mid-frame, or close properly. The
daemon must not exit, every op must be answered with a documented code, every close must
carry the documented close code for its cause, and `status` on a fresh admin connection must
answer within 2 s; RSS and the log must stay bounded.

The default run sends a few hundred frames; `-m slow` sends JOBWARDEN_FUZZ_FRAMES (100,000).
The figures are printed (`-s` shows them).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.process import DaemonFactory, DaemonProcess, daemon_factory
from tests.reliability.fuzz import (
    BINARY,
    CLOSE,
    CLOSE_CODES,
    CONTINUATION,
    PING,
    REPLY_TIMEOUT,
    SEED,
    TEXT,
    Figures,
    Hostile,
    Probe,
    RawWebSocket,
    long_form,
)

MAX_FRAME_BYTES = 1024 * 1024
CONFIG = {
    "websocket": {"max_frame_bytes": MAX_FRAME_BYTES, "max_messages_per_second": 1000},
    "daemon": {"max_concurrent_jobs": 4},
}


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[DaemonFactory]:
    yield from daemon_factory(tmp_path)


def _invalid_utf8(ws: RawWebSocket) -> None:
    ws.send_frame(TEXT, b'{"op": "jobs", "id": "\xff\xfe"}')


def _reserved_opcode(ws: RawWebSocket) -> None:
    ws.send_frame(0x3, b"{}")


def _reserved_bits(ws: RawWebSocket) -> None:
    ws.send_frame(TEXT, b'{"op": "jobs"}', rsv=0b010)


def _unmasked(ws: RawWebSocket) -> None:
    ws.send_frame(TEXT, b'{"op": "jobs"}', masked=False)


def _oversized(ws: RawWebSocket) -> None:
    # One byte over: the daemon reads all of it before it refuses, so the close frame is not
    # lost to a reset for data it never read.
    ws.send_frame(TEXT, b'"' + b"a" * (MAX_FRAME_BYTES - 1) + b'"')


def _long_ping(ws: RawWebSocket) -> None:
    ws.send_frame(PING, b"p" * 200)


def _continuation_first(ws: RawWebSocket) -> None:
    ws.send_frame(CONTINUATION, b"{}")


def _close_normally(ws: RawWebSocket) -> None:
    ws.send_frame(CLOSE, (1000).to_bytes(2, "big") + b"bye")


# How a connection may end, and the close code the daemon must answer it with.
ENDINGS: list[tuple[Callable[[RawWebSocket], None], int]] = [
    (_invalid_utf8, 1007),
    (_reserved_opcode, 1002),
    (_reserved_bits, 1002),
    (_unmasked, 1002),
    (_oversized, 1009),
    (_long_ping, 1002),
    (_continuation_first, 1002),
    (_close_normally, 1000),
]


def exchange(
    ws: RawWebSocket, hostile: Hostile, rng: random.Random, figures: Figures, count: int
) -> None:
    """Send `count` ops in the ways a client may (text, fragmented, binary, with pings
    between), and read until each has its reply."""
    for _ in range(count):
        op = hostile.websocket_op(hostile.request_id())
        while len(op) > MAX_FRAME_BYTES:
            # Too large a frame is how a connection may end (see ENDINGS), not an op.
            op = hostile.websocket_op(hostile.request_id())
        try:
            op.decode()
        except UnicodeDecodeError:
            # Invalid UTF-8 cannot be a text frame; as a binary one it is refused as one.
            ws.send_frame(BINARY, op)
        else:
            way = rng.random()
            if way < 0.1 and len(op) > 2:
                cut = rng.randrange(1, len(op))
                ws.send_frame(TEXT, op[:cut], fin=False)
                if rng.random() < 0.5:
                    ws.send_frame(PING, b"between")
                ws.send_frame(CONTINUATION, op[cut:])
            elif way < 0.15:
                ws.send_frame(BINARY, op)
            else:
                ws.send_frame(TEXT, op)
        figures.sent += 1
    deadline = time.monotonic() + REPLY_TIMEOUT
    replies = 0
    while replies < count:
        frame = ws.receive(deadline)
        if frame is None:
            figures.unanswered.append(f"closed with {ws.close_code} after {replies}/{count}")
            return
        # Events of a watch carry their seq; a resync ends a watch; the rest answer an op.
        if "seq" in frame or frame.get("type") == "resync":
            continue
        replies += 1
        figures.answered(frame)


def end(ws: RawWebSocket, rng: random.Random, figures: Figures) -> None:
    if rng.random() < 0.1:
        # Gone mid-frame, as a client whose network fails.
        ws.sock.sendall(bytes([0x81, 0x80 | 100]) + b"\0\0\0\0" + b"{")
        figures.sent += 1
        return
    ending, expected = rng.choice(ENDINGS)
    ending(ws)
    figures.sent += 1
    deadline = time.monotonic() + REPLY_TIMEOUT
    try:
        while ws.receive(deadline) is not None:
            pass
    except TimeoutError:
        figures.unanswered.append(f"{ending.__name__}: not closed within {REPLY_TIMEOUT:g}s")
        return
    figures.close_codes[ws.close_code or 0] += 1
    if ws.close_code != expected or ws.close_code not in CLOSE_CODES:
        figures.unanswered.append(f"{ending.__name__}: closed {ws.close_code}, not {expected}")


def fuzz_websocket(daemons: DaemonFactory, frames: int, seed: int) -> Figures:
    daemon: DaemonProcess = daemons(CONFIG)
    with daemon.client() as admin:
        token = admin.call("users", action="add", name="fuzz")["token"]
    port = daemon.wait_for_log(lambda line: line.get("event") == "websocket listening")["port"]
    rng = random.Random(seed)
    hostile = Hostile(seed, kinds=["quick"])
    figures = Figures("websocket", daemon)
    figures.start()
    with Probe(daemon) as probe:
        while figures.sent < frames and daemon.running:
            try:
                ws = RawWebSocket(port, token)
            except (OSError, ConnectionError) as exc:
                figures.unanswered.append(f"handshake: {exc}")
                continue
            figures.connections += 1
            try:
                exchange(ws, hostile, rng, figures, rng.randint(1, 8))
                end(ws, rng, figures)
            except (TimeoutError, OSError) as exc:
                figures.unanswered.append(f"{type(exc).__name__}: {exc}")
            finally:
                ws.close()
        figures.finish(probe)
    print(figures.report())
    return figures


def test_a_few_hundred_hostile_frames_are_each_answered_or_closed_with_their_code(daemons):
    fuzz_websocket(daemons, frames=400, seed=SEED).check()


@pytest.mark.slow
def test_a_hundred_thousand_hostile_frames_are_each_answered_or_closed_with_their_code(
    daemons,
):
    frames, seed = long_form()
    fuzz_websocket(daemons, frames=frames, seed=seed).check()
