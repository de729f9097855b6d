"""Fuzzing the HTTP API of a real `jobwarden serve`, as a hostile client with a token would.

Each request is generated (see fuzz.Hostile): a method, a /v1 path with a hostile id or name,
a hostile query, a hostile body, and a user's token, an operator's, a wrong one or none. Most
go out over httpx on kept-alive connections; some as raw bytes that are no valid HTTP at all
(a broken request line, a Content-Length that lies, a connection dropped mid-body). The daemon
must not exit; every answer must be a documented status whose body, from 400 up, is the
common error shape with a documented code and the status that code means (never INTERNAL),
and `status` on a fresh admin connection must answer within 2 s; RSS and the log must stay
bounded.

The default run sends a few hundred requests; `-m slow` sends JOBWARDEN_FUZZ_FRAMES (100,000).
The figures are printed (`-s` shows them).
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from jobwarden.errors import HTTP_STATUS
from tests.process import DaemonFactory, daemon_factory
from tests.reliability.fuzz import (
    REPLY_TIMEOUT,
    SEED,
    Figures,
    Hostile,
    Probe,
    json_text,
    long_form,
)

CONFIG = {"daemon": {"max_concurrent_jobs": 4}, "http": {"max_body_bytes": 256 * 1024}}
PATHS = [
    "/v1/jobs",
    "/v1/jobs/{id}",
    "/v1/jobs/{id}/cancel",
    "/v1/jobs/{id}/result",
    "/v1/jobs/{id}/retry",
    "/v1/users",
    "/v1/users/{name}",
    "/v1/users/{name}/credits",
    "/v1/budget",
    "/v1/ledger",
    "/v1/breakers/{name}/trip",
    "/v1/pause",
    "/v1/stuck",
    "/v1/nope",
]
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"]
QUERY_NAMES = ["status", "kind", "limit", "cursor", "user", "wait", "day", "by", "since"]
# What no valid HTTP looks like: the server refuses it with a 4xx, or closes.
BROKEN = [
    b"GET\r\n\r\n",
    b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
    b'POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"kind"',
    b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"GET /v1/jobs HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 70_000 + b"\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
    b"GET /v1/jobs/\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n",
]


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[DaemonFactory]:
    yield from daemon_factory(tmp_path)


class HostileHttp:
    def __init__(self, hostile: Hostile, tokens: list[str | None]) -> None:
        self.h = hostile
        self.rng = hostile.rng
        self.tokens = tokens

    def request(self, http: httpx.Client) -> httpx.Request:
        path = self.rng.choice(PATHS)
        path = path.replace("{id}", self._segment(str(self.rng.randint(0, 40))))
        path = path.replace("{name}", self._segment("fuzz"))
        query = {
            self.rng.choice(QUERY_NAMES): json.loads(self.h.string())[:200]
            if self.rng.random() < 0.5
            else self.h.number()
            for _ in range(self.rng.choice([0, 0, 1, 2]))
        }
        token = self.rng.choice(self.tokens)
        headers = {} if token is None else {"Authorization": f"Bearer {token}"}
        if self.rng.random() < 0.1:
            headers["Last-Event-ID"] = self.h.number()
        body = self.h.mangle(self.h.obj(self.h.fields(self._body())))
        method = self.rng.choice(METHODS)
        return http.build_request(method, path, params=query, headers=headers, content=body)

    def _segment(self, sane: str) -> str:
        if self.rng.random() < 0.7:
            return sane
        raw = self.rng.choice([self.h.number(), json.loads(self.h.string())[:300] or "x"])
        return "".join(c if c.isalnum() else f"%{ord(c) & 0xFF:02X}" for c in raw)

    def _body(self) -> dict[str, str]:
        kind = json_text(self.rng.choice(["quick", "nope"]))
        return self.rng.choice(
            [
                {"kind": kind, "payload": '{"seconds": 0}', "priority": self.h.number()},
                {"kind": kind, "payload": self.h.value(), "idempotency_key": self.h.string()},
                {"name": self.h.string(), "credits": self.h.number(), "rate": self.h.string()},
                {"daily_usd": self.h.number()},
                {"change": self.h.number()},
            ]
        )


def check_answer(figures: Figures, response: httpx.Response) -> None:
    if response.status_code < 400:
        figures.answers["ok"] += 1
        return
    try:
        error = response.json()
    except ValueError:
        error = None
    if response.request.method == "HEAD" and not response.content:
        figures.answers[str(response.status_code)] += 1
        return
    if not isinstance(error, dict) or HTTP_STATUS.get(error.get("code")) != response.status_code:
        figures.bad_replies.append(f"{response.status_code} {response.text[:300]}")
        return
    figures.answered({"ok": False, "error": error})


def send_broken(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=REPLY_TIMEOUT) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return received


def fuzz_http(daemons: DaemonFactory, requests: int, seed: int) -> Figures:
    daemon = daemons(CONFIG)
    with daemon.client() as admin:
        user = admin.call("users", action="add", name="fuzz")["token"]
        operator = admin.call("tokens", action="add", name="fuzz")["secret"]
    port = daemon.logs("jobwarden ready")[-1]["http_port"]
    hostile = HostileHttp(Hostile(seed, kinds=["quick"]), [user, operator, "jw_wrong", None])
    figures = Figures("HTTP API", daemon)
    figures.start()
    base = f"http://127.0.0.1:{port}"
    with Probe(daemon) as probe, httpx.Client(base_url=base, timeout=REPLY_TIMEOUT) as http:
        while figures.sent < requests and daemon.running:
            figures.sent += 1
            if hostile.rng.random() < 0.05:
                figures.connections += 1
                data = hostile.rng.choice(BROKEN)
                try:
                    answer = send_broken(port, data)
                except OSError as exc:
                    figures.unanswered.append(f"{type(exc).__name__}: {data[:100]!r}")
                    continue
                # Refused (400, or 401/413 when the headers were enough to decide), or closed.
                if answer and not answer.startswith(b"HTTP/1.1 4"):
                    figures.bad_replies.append(repr(answer[:200]))
                figures.answers["broken HTTP"] += 1
                continue
            request = hostile.request(http)
            try:
                check_answer(figures, http.send(request))
            except httpx.HTTPError as exc:
                figures.unanswered.append(f"{type(exc).__name__}: {request.method} {request.url}")
        figures.finish(probe)
    print(figures.report())
    print(*figures.unanswered[:10], *figures.bad_replies[:10], *figures.errors_logged, sep="\n")
    return figures


def test_a_few_hundred_hostile_http_requests_are_each_answered_and_the_daemon_serves_on(daemons):
    fuzz_http(daemons, requests=400, seed=SEED).check()


@pytest.mark.slow
def test_a_hundred_thousand_hostile_http_requests_are_each_answered_and_the_daemon_serves_on(
    daemons,
):
    requests, seed = long_form()
    fuzz_http(daemons, requests=requests, seed=seed).check()
