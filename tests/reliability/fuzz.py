"""What the admin and WebSocket fuzzers share: seeded hostile input, raw clients, the figures.

The input is generated, not random at run time: `Hostile(seed)` makes the same lines and
frames for the same seed, so a failure is replayed by running the test again. It starts from
valid requests and breaks them the way the findings of issue 14 did: integers outside any
column's range, deep nesting, wrong types, huge strings, invalid UTF-8, truncated JSON,
connections half-closed or dropped mid-request.

The clients are raw sockets, blocking with deadlines, so that they can send what a well-behaved
library never would (a text frame of invalid UTF-8, a reserved opcode, an unmasked frame).
`Probe` asks `status` on a fresh admin connection every quarter second from a thread, to
show that the daemon answers its operator all along.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import random
import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from jobwarden.errors import HTTP_STATUS
from tests.process import DaemonProcess

# The codes a refusal may carry: the request codes (docs/protocol.md lists the same table),
# but INTERNAL, which is the daemon's own fault. Anything else is a finding.
ERROR_CODES = frozenset(HTTP_STATUS) - {"INTERNAL"}
# The close codes the WebSocket documents (docs/protocol.md).
CLOSE_CODES = frozenset({1000, 1001, 1002, 1007, 1008, 1009, 1011})
SEED = 14
# What the daemon may grow by while fuzzed (its caches and heap fill once, then it stays),
# and the log bytes per frame sent (refusals are rate-limited; accepted jobs log their end).
RSS_GROWTH = 64 * 2**20
LOG_BYTES_PER_FRAME = 400
PROBE_EVERY = 0.25
PROBE_LIMIT = 2.0
REPLY_TIMEOUT = 10.0

# Integers and numbers a column or a decoder may choke on, written as JSON text.
EXTREME_NUMBERS = [
    "9223372036854775807",
    "9223372036854775808",
    "-9223372036854775808",
    "-9223372036854775809",
    "18446744073709551616",
    "1" + "0" * 40,
    "1" + "0" * 400,
    "-0",
    "0",
    "-1",
    "1e308",
    "1e400",
    "-1e400",
    "0.5",
    "1.7976931348623157e308",
    "5e-324",
]
WRONG_VALUES = ["null", "true", "false", '""', "[]", "{}", '"x"', '["a", 1]', '{"a": {}}']
STRINGS = [
    "",
    " ",
    "a" * 65,
    "k" * 60_000,
    "\u0000\u0001\u001f",
    "\u202e\u200b\ufeff",
    "é漢🙂",
    "../../etc/passwd",
    "'; DROP TABLE jobs; --",
    "%s%n{0}{}",
]


def long_form() -> tuple[int, int]:
    """The frames and the seed of a long run: JOBWARDEN_FUZZ_FRAMES, JOBWARDEN_FUZZ_SEED."""
    frames = int(os.environ.get("JOBWARDEN_FUZZ_FRAMES", "100000"))
    return frames, int(os.environ.get("JOBWARDEN_FUZZ_SEED", SEED))


def json_text(value: str) -> str:
    return json.dumps(value)


class Hostile:
    """A seeded source of hostile requests, built from valid ones by one or more breaks."""

    def __init__(self, seed: int, *, kinds: list[str]) -> None:
        self.rng = random.Random(seed)
        self.kinds = kinds

    # -- values -----------------------------------------------------------------------------

    def number(self) -> str:
        return self.rng.choice([*EXTREME_NUMBERS, str(self.rng.randint(-5, 5))])

    def string(self) -> str:
        return json_text(self.rng.choice(STRINGS))

    def nested(self) -> str:
        depth = self.rng.choice([10, 60, 64, 65, 200, 5_000, 100_000])
        opening, closing = self.rng.choice([("[", "]"), ('{"a":', "}")])
        return opening * depth + "1" + closing * depth

    def value(self) -> str:
        """Any JSON value a field might be given, sane or not."""
        pick = self.rng.random()
        if pick < 0.35:
            return self.number()
        if pick < 0.6:
            return self.string()
        if pick < 0.85:
            return self.rng.choice(WRONG_VALUES)
        return self.nested()

    def request_id(self) -> str:
        if self.rng.random() < 0.8:
            return str(self.rng.randint(1, 10**6))
        return self.rng.choice(
            ["null", json_text("r1"), "18446744073709551616", json_text("i" * 300), "[1]", "1.5"]
        )

    # -- whole requests -------------------------------------------------------------------

    def fields(self, valid: dict[str, str]) -> dict[str, str]:
        """`valid` (field -> JSON text) with some fields broken, dropped or added."""
        fields = dict(valid)
        for _ in range(self.rng.choice([0, 0, 0, 1, 1, 2, 3])):
            action = self.rng.random()
            names = list(fields)
            if action < 0.6 and names:
                fields[self.rng.choice(names)] = self.value()
            elif action < 0.75 and names:
                del fields[self.rng.choice(names)]
            else:
                fields[self.rng.choice(["extra", "job", "limit", "since", "all", "x" * 100])] = (
                    self.value()
                )
        return fields

    def obj(self, fields: dict[str, str]) -> str:
        return "{" + ", ".join(f"{json_text(k)}: {v}" for k, v in fields.items()) + "}"

    def mangle(self, text: str) -> bytes:
        """Sometimes break the text itself: cut it, flip bytes, make it invalid UTF-8."""
        data = text.encode()
        pick = self.rng.random()
        if pick < 0.06 and data:
            return data[: self.rng.randrange(len(data))]
        if pick < 0.10 and data:
            at = self.rng.randrange(len(data))
            return data[:at] + bytes([self.rng.randrange(256)]) + data[at + 1 :]
        if pick < 0.13:
            return data.replace(b'"', b'"\xff\xfe', 1)
        if pick < 0.15:
            return self.rng.randbytes(self.rng.randint(1, 64)).replace(b"\n", b" ")
        if pick < 0.17:
            return self.rng.choice([b"[]", b"1", b'"ping"', b"null", b"{}", b"{", b"}"])
        return data

    def admin_request(self, request_id: str) -> bytes:
        """One admin request line, without its newline."""
        cmd, args = self.rng.choice(ADMIN_REQUESTS)(self)
        request = {"id": request_id, "cmd": json_text(cmd), "args": self.obj(self.fields(args))}
        return self._broken(request).replace(b"\n", b" ")

    def websocket_op(self, request_id: str) -> bytes:
        """One WebSocket op, the payload of a text frame."""
        op, fields = self.rng.choice(WEBSOCKET_OPS)(self)
        return self._broken({"op": json_text(op), "id": request_id, **self.fields(fields)})

    def _broken(self, request: dict[str, str]) -> bytes:
        """The request, now and then with its own fields broken too, as mangled text."""
        if self.rng.random() < 0.15:
            request = self.fields(request)
        return self.mangle(self.obj(request))


def _job(h: Hostile) -> str:
    return str(h.rng.randint(0, 50))


def _payload(h: Hostile) -> str:
    return h.rng.choice(['{"seconds": 0}', "{}", h.value(), '{"blob": ' + h.string() + "}"])


def _submit(h: Hostile) -> dict[str, str]:
    return {
        "kind": json_text(h.rng.choice([*h.kinds, "nope"])),
        "payload": _payload(h),
        "priority": str(h.rng.randint(-100, 100)),
        "idempotency_key": json_text(f"k{h.rng.randint(0, 30)}"),
    }


ADMIN_REQUESTS = [
    lambda h: ("ping", {}),
    lambda h: ("status", {}),
    lambda h: ("submit", _submit(h)),
    lambda h: ("jobs", {"limit": str(h.rng.randint(1, 100)), "status": '["queued"]'}),
    lambda h: ("show", {"job": _job(h)}),
    lambda h: ("cancel", {"job": _job(h)}),
    lambda h: ("retry", {"job": _job(h)}),
    lambda h: ("watch", {"job": _job(h), "since": "0"}),
    lambda h: ("watch", {}),
    lambda h: ("pause", {"kind": json_text("nope")}),
    lambda h: ("resume", {}),
    lambda h: ("stuck", {"dry_run": "true"}),
    lambda h: ("breakers", {}),
    lambda h: ("breaker", {"service": json_text("nope"), "action": json_text("reset")}),
    lambda h: ("ledger", {"day": json_text("2026-11-22"), "by": json_text("kind")}),
    lambda h: ("budget", {"action": json_text("show")}),
    lambda h: ("users", {"action": json_text("list")}),
    lambda h: ("users", {"action": json_text("show"), "name": json_text("fuzz")}),
    lambda h: (
        "users",
        {"action": json_text("credits"), "name": json_text("fuzz"), "change": h.number()},
    ),
    lambda h: ("users", {"action": json_text("add"), "name": h.string(), "credits": h.number()}),
    lambda h: ("nope", {}),
]
WEBSOCKET_OPS = [
    lambda h: ("submit", _submit(h)),
    lambda h: ("jobs", {"limit": str(h.rng.randint(1, 100))}),
    lambda h: ("cancel", {"job": _job(h)}),
    lambda h: ("watch", {"job": _job(h), "since": "0"}),
    lambda h: ("watch", {"all": "true"}),
    lambda h: ("unwatch", {"all": "true"}),
    lambda h: ("unwatch", {"job": _job(h)}),
    lambda h: ("nope", {}),
]


# -- the admin socket ------------------------------------------------------------------------


def admin_exchange(path: Path, data: bytes, *, half_close: bool) -> tuple[list[dict], bool]:
    """Send `data` on a fresh admin connection, then either shut down the sending side and
    read every line until the daemon closes, or hang up at once. The lines that are not
    events, and whether the daemon closed the connection cleanly (EOF, not a reset)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(REPLY_TIMEOUT)
        sock.connect(str(path))
        sock.sendall(data)
        if not half_close:
            return [], True
        sock.shutdown(socket.SHUT_WR)
        received = b""
        try:
            while chunk := sock.recv(1 << 16):
                received += chunk
        except ConnectionResetError:
            return _lines(received), False
    return _lines(received), True


def _lines(received: bytes) -> list[dict]:
    replies = []
    for raw in received.split(b"\n"):
        if raw.strip():
            message = json.loads(raw)
            if "event" not in message:
                replies.append(message)
    return replies


def requests_in(data: bytes) -> int:
    """How many requests the daemon reads in `data`: its non-blank lines ended by a newline
    (a last line without one was never finished)."""
    return sum(1 for line in data.split(b"\n")[:-1] if line.strip())


# -- the WebSocket ---------------------------------------------------------------------------

TEXT, BINARY, CONTINUATION, CLOSE, PING, PONG = 0x1, 0x2, 0x0, 0x8, 0x9, 0xA


class RawWebSocket:
    """A client that writes frames byte by byte, valid or not."""

    def __init__(self, port: int, token: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=REPLY_TIMEOUT)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            (
                "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                f"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer {token}\r\n\r\n"
            ).encode()
        )
        self._buffer = b""
        while b"\r\n\r\n" not in self._buffer:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("closed during the handshake")
            self._buffer += chunk
        head, _, self._buffer = self._buffer.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 101"):
            raise ConnectionError(head.split(b"\r\n")[0].decode())
        # The close code the daemon sent, once it did; 1006 if it dropped the connection.
        self.close_code: int | None = None

    def send_frame(
        self,
        opcode: int,
        payload: bytes,
        *,
        fin: bool = True,
        masked: bool = True,
        rsv: int = 0,
    ) -> None:
        head = bytes([(0x80 if fin else 0) | (rsv << 4) | opcode])
        mask_bit = 0x80 if masked else 0
        size = len(payload)
        if size < 126:
            head += bytes([mask_bit | size])
        elif size < 1 << 16:
            head += bytes([mask_bit | 126]) + struct.pack("!H", size)
        else:
            head += bytes([mask_bit | 127]) + struct.pack("!Q", size)
        if masked:
            mask = os.urandom(4)
            key = (mask * (size // 4 + 1))[:size]
            payload = (int.from_bytes(payload) ^ int.from_bytes(key)).to_bytes(size)
            head += mask
        self.sock.sendall(head + payload)

    def receive(self, deadline: float) -> dict | None:
        """The next text frame as a dict; None once the connection is closed (see
        close_code). Pings are answered; TimeoutError past `deadline`."""
        while True:
            frame = self._frame(deadline)
            if frame is None:
                self.close_code = self.close_code or 1006
                return None
            opcode, payload = frame
            if opcode == TEXT:
                return json.loads(payload)
            if opcode == CLOSE:
                self.close_code = struct.unpack("!H", payload[:2])[0] if payload else 1005
                return None
            if opcode == PING:
                self.send_frame(PONG, payload)

    def _frame(self, deadline: float) -> tuple[int, bytes] | None:
        head = self._read(2, deadline)
        if head is None:
            return None
        size = head[1] & 0x7F
        if size == 126:
            size = struct.unpack("!H", self._read(2, deadline) or b"\0\0")[0]
        elif size == 127:
            size = struct.unpack("!Q", self._read(8, deadline) or b"\0" * 8)[0]
        payload = self._read(size, deadline)
        return None if payload is None else (head[0] & 0x0F, payload)

    def _read(self, count: int, deadline: float) -> bytes | None:
        while len(self._buffer) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no frame in time")
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(1 << 16)
            except ConnectionResetError:
                return None
            if not chunk:
                return None
            self._buffer += chunk
        data, self._buffer = self._buffer[:count], self._buffer[count:]
        return data

    def close(self) -> None:
        self.sock.close()


# -- the figures -----------------------------------------------------------------------------


class Probe:
    """`status` on a fresh admin connection every PROBE_EVERY, from a thread, while the
    fuzzer runs: the slowest answer, the probes not answered within PROBE_LIMIT, and the
    daemon's RSS at each probe."""

    def __init__(self, daemon: DaemonProcess) -> None:
        self._daemon = daemon
        self._stop = threading.Event()
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self.rss: list[int] = []
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Probe:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(PROBE_LIMIT * 3)

    def _run(self) -> None:
        while True:
            started = time.monotonic()
            try:
                with self._daemon.client(timeout=PROBE_LIMIT) as admin:
                    admin.call("status")
            except Exception as exc:
                self.failures.append(f"{type(exc).__name__}: {exc}")
            latency = time.monotonic() - started
            self.latencies.append(latency)
            with contextlib.suppress(psutil.Error):
                self.rss.append(psutil.Process(self._daemon.pid).memory_info().rss)
            if latency > PROBE_LIMIT:
                self.failures.append(f"answered after {latency:.2f}s")
            if self._stop.wait(PROBE_EVERY):
                return


@dataclass
class Figures:
    """What a fuzzing run prints, for the record of what it did and found."""

    name: str
    daemon: DaemonProcess
    sent: int = 0
    connections: int = 0
    answers: Counter[str] = field(default_factory=Counter)
    close_codes: Counter[int] = field(default_factory=Counter)
    unanswered: list[str] = field(default_factory=list)
    bad_replies: list[str] = field(default_factory=list)
    exits: int = 0
    # Lines the daemon logged at error level: each is a fault of its own, not of the input.
    errors_logged: list[str] = field(default_factory=list)
    rss_before: int = 0
    rss_after: int = 0
    log_before: int = 0
    log_after: int = 0
    seconds: float = 0.0
    probe: Probe = field(init=False)
    _started: float = 0.0
    _lines_before: int = 0

    def start(self) -> None:
        self.rss_before = self._rss()
        self.log_before = self.daemon.log_bytes
        self._lines_before = len(self.daemon.logs())
        self._started = time.monotonic()

    def finish(self, probe: Probe) -> None:
        self.seconds = time.monotonic() - self._started
        self.exits = 0 if self.daemon.running else 1
        self.rss_after = self._rss() if self.daemon.running else 0
        self.log_after = self.daemon.log_bytes
        self.errors_logged = [
            json.dumps(line)[:500]
            for line in self.daemon.logs()[self._lines_before :]
            if line.get("level") in ("error", "critical")
        ]
        self.probe = probe

    def answered(self, reply: Any) -> None:
        """Count one reply; one that carries no code it may carry is a finding."""
        if not isinstance(reply, dict):
            self.bad_replies.append(repr(reply)[:200])
            return
        if reply.get("ok") is True or reply.get("type") not in (None, "error"):
            self.answers["ok"] += 1
            return
        code = (reply.get("error") or {}).get("code")
        self.answers[str(code)] += 1
        if code not in ERROR_CODES:
            self.bad_replies.append(json.dumps(reply)[:300])

    def check(self) -> None:
        """What a run must show: no exit, no error logged, nothing unanswered or answered
        without a documented code, every probe in time, RSS and the log within bounds."""
        assert self.exits == 0, self.daemon.output()[-5000:]
        assert self.unanswered == []
        assert self.bad_replies == []
        assert self.errors_logged == []
        assert self.probe.failures == []
        assert self.rss_after - self.rss_before < RSS_GROWTH
        assert self.log_after - self.log_before < LOG_BYTES_PER_FRAME * self.sent

    @property
    def rss_halfway(self) -> int:
        samples = self.probe.rss
        return samples[len(samples) // 2] if samples else 0

    def _rss(self) -> int:
        return psutil.Process(self.daemon.pid).memory_info().rss

    def report(self) -> str:
        latencies = self.probe.latencies
        lines = [
            f"== {self.name}: {self.sent} frames on {self.connections} connections "
            f"in {self.seconds:.1f}s ==",
            f"answers by code: {dict(sorted(self.answers.items()))}",
            f"close codes: {dict(sorted(self.close_codes.items()))}",
            f"unanswered: {len(self.unanswered)}  replies without a documented code: "
            f"{len(self.bad_replies)}  daemon exits: {self.exits}  "
            f"errors logged: {len(self.errors_logged)}",
            f"probes: {len(latencies)} answered, max latency "
            f"{max(latencies, default=0):.3f}s, {len(self.probe.failures)} failed or over "
            f"{PROBE_LIMIT:g}s",
            f"RSS: {self.rss_before / 2**20:.1f} MB before, {self.rss_halfway / 2**20:.1f} MB "
            f"halfway, {self.rss_after / 2**20:.1f} MB after, "
            f"{max(self.probe.rss, default=0) / 2**20:.1f} MB at most",
            f"log: {self.log_after - self.log_before} bytes written during the run",
        ]
        return "\n".join(lines)
