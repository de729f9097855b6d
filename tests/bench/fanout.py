"""Fan-out over the WebSocket: 100 watchers of one user's jobs on a real `jobwarden serve`.

The watchers (trio-websocket connections in this process) watch all of the user's jobs before
the emitter jobs are submitted; together the emitters report progress at a fixed rate, and
every event goes to every watcher. Figures: events delivered per second across all watchers,
the delay from an event's commit (its `at`) to its arrival at a watcher, p50 and p99, and the
daemon's CPU time per delivered event, which says how far one core would carry the fan-out
whatever the watchers' process manages. A watcher that falls behind is told to resync; those
are counted, and it catches up from the store as a client does.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec
import psutil
import trio
import trio_websocket

from jobwarden.store import users
from tests.bench.harness import ServeProcess, daemon_config, open_database, percentile
from tests.process import merge, toml_text

WATCHERS = 100
EMITTERS = 4
# Progress events per second, all emitters together: 100 × 100 = 10,000 deliveries a second.
RATE = 100
KIND = "progress"


class _Frame(msgspec.Struct):
    type: str
    seq: int = 0
    at: float = 0.0
    since: int = 0


_decode = msgspec.json.Decoder(_Frame).decode


class _Watcher:
    def __init__(self) -> None:
        self.delays: list[float] = []
        self.resyncs = 0

    async def run(
        self, url: str, headers: list[tuple[bytes, bytes]], ready: trio.Semaphore, events: int
    ) -> None:
        async with trio_websocket.open_websocket_url(url, extra_headers=headers) as ws:
            await ws.send_message(json.dumps({"op": "watch", "all": True}))
            await ws.get_message()  # watching
            ready.release()
            last = 0
            while len(self.delays) < events:
                frame = _decode(await ws.get_message())
                if frame.type == "progress" and frame.seq > last:
                    last = frame.seq
                    self.delays.append(time.time() - frame.at)
                elif frame.type == "resync":
                    self.resyncs += 1
                    resume = {"op": "watch", "all": True, "since": frame.since}
                    await ws.send_message(json.dumps(resume))


def _user_with_token(db_path: Path) -> str:
    token = users.new_token()
    with open_database(db_path) as conn:
        users.create(
            conn,
            [],
            name="fanout",
            credits=None,
            limits=users.UserLimits(),
            token_hash=users.hash_token(token),
            now=time.time(),
        )
    return token


async def _run(url: str, token: str, events: int, daemon: psutil.Process) -> dict[str, Any]:
    headers = [(b"authorization", f"Bearer {token}".encode())]
    watchers = [_Watcher() for _ in range(WATCHERS)]
    ready = trio.Semaphore(0)
    async with trio.open_nursery() as nursery:
        for watcher in watchers:
            nursery.start_soon(watcher.run, url, headers, ready, events)
        for _ in range(WATCHERS):
            await ready.acquire()
        cpu_before = sum(daemon.cpu_times()[:2])
        started = time.time()
        payload = {"events": events // EMITTERS, "interval": EMITTERS / RATE}
        async with trio_websocket.open_websocket_url(url, extra_headers=headers) as ws:
            for n in range(EMITTERS):
                await ws.send_message(
                    json.dumps({"op": "submit", "id": n, "kind": KIND, "payload": payload})
                )
            for _ in range(EMITTERS):
                await ws.get_message()
    finished = time.time()
    delays = [delay for watcher in watchers for delay in watcher.delays]
    return {
        "watchers": WATCHERS,
        "events": events,
        "offered_per_s": RATE,
        "delivered_per_s": len(delays) / (finished - started),
        "latency_p50_ms": percentile(delays, 0.50) * 1000,
        "latency_p99_ms": percentile(delays, 0.99) * 1000,
        "daemon_cpu_us_per_delivery": (sum(daemon.cpu_times()[:2]) - cpu_before)
        / len(delays)
        * 1e6,
        "resyncs": sum(watcher.resyncs for watcher in watchers),
    }


def measure_fan_out(events: int) -> dict[str, Any]:
    """`events` progress events at RATE a second, each to WATCHERS watchers."""
    config = merge(
        daemon_config(log_level="info"),
        {
            "websocket": {"listen": "127.0.0.1:0"},
            "kinds": {KIND: {"handler": "tests.bench.kinds:progress"}},
        },
    )
    with tempfile.TemporaryDirectory(prefix="jobwarden-bench-") as directory:
        daemon = ServeProcess(Path(directory), log_level="info")
        daemon.config_path.write_text(toml_text(config), encoding="utf-8")
        with daemon:
            daemon.wait_ready_line()
            port = daemon.logged("websocket listening")["port"]
            token = _user_with_token(daemon.db_path)
            figures = trio.run(
                _run, f"ws://127.0.0.1:{port}/", token, events, psutil.Process(daemon.pid)
            )
            daemon.stop()
    return figures
