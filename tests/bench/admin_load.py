"""Load on a real `jobwarden serve` through its admin socket.

Throughput: several connections, each pipelining submissions up to a window of requests in
flight; the figure is jobs accepted → done per second, from the first request to the last
`finished_at` in the store. Latency: submissions paced at a fixed rate on one connection
(open loop: a late send never delays the next one's schedule); submit → accepted is measured
per request by the client, accepted → started from the job's `queued` and `running` events.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import msgspec
import trio

from tests.bench.harness import (
    NOOP_KIND,
    any_unfinished,
    last_finished_at,
    open_database,
    percentile,
    serving,
    shares,
)

CONNECTIONS = 8
# The daemon serves at most this many requests of one connection at once.
WINDOW = 256
WARMUP_SUBMISSIONS = 200
FINISH_POLL_INTERVAL = 0.05


class _JobRef(msgspec.Struct):
    id: int


class _Submitted(msgspec.Struct):
    job: _JobRef


class _SubmitReply(msgspec.Struct):
    id: int
    ok: bool
    data: _Submitted | None = None


_decode_reply = msgspec.json.Decoder(_SubmitReply).decode


def _submit_line(request_id: int, user: str = "local") -> bytes:
    return b'{"id":%d,"cmd":"submit","args":{"kind":"%s","user":"%s"}}\n' % (
        request_id,
        NOOP_KIND.encode(),
        user.encode(),
    )


async def _read_replies(
    stream: trio.SocketStream, count: int, on_reply: Callable[[_SubmitReply], None]
) -> None:
    """Hand each of `count` replies to `on_reply` as it arrives."""
    received = 0
    buffer = b""
    while received < count:
        chunk = await stream.receive_some()
        if not chunk:
            raise RuntimeError("the daemon closed the connection")
        *lines, buffer = (buffer + chunk).split(b"\n")
        for line in lines:
            reply = _decode_reply(line)
            if not reply.ok:
                raise RuntimeError(f"submit refused: {line.decode()}")
            on_reply(reply)
        received += len(lines)


async def pipeline_submit(socket_path: Path, count: int, user: str = "local") -> None:
    """Submit `count` jobs for `user` on one connection, keeping up to WINDOW requests in
    flight."""
    free = trio.Semaphore(WINDOW)
    async with (
        await trio.open_unix_socket(str(socket_path)) as stream,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(_read_replies, stream, count, lambda _: free.release())
        sent = 0
        while sent < count:
            await free.acquire()
            batch = 1
            while sent + batch < count and free.value > 0:
                free.acquire_nowait()
                batch += 1
            lines = (_submit_line(request_id, user) for request_id in range(sent, sent + batch))
            await stream.send_all(b"".join(lines))
            sent += batch


async def paced_submit(socket_path: Path, rate: float, count: int) -> tuple[list[float], list[int]]:
    """Submit `count` jobs at `rate` per second; their submit → accepted times (s) and ids."""
    sent_at = [0.0] * count
    latencies = [0.0] * count
    job_ids = [0] * count

    def record(reply: _SubmitReply) -> None:
        assert reply.data is not None
        latencies[reply.id] = trio.current_time() - sent_at[reply.id]
        job_ids[reply.id] = reply.data.job.id

    async with (
        await trio.open_unix_socket(str(socket_path)) as stream,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(_read_replies, stream, count, record)
        start = trio.current_time()
        for request_id in range(count):
            await trio.sleep_until(start + request_id / rate)
            sent_at[request_id] = trio.current_time()
            await stream.send_all(_submit_line(request_id))
    return latencies, job_ids


def _wait_until_finished(db_path: Path) -> float:
    """Once every job is done, the last `finished_at`."""
    with open_database(db_path) as conn:
        while any_unfinished(conn):
            time.sleep(FINISH_POLL_INTERVAL)
        return last_finished_at(conn)


def queued_to_running(db_path: Path, job_ids: list[int]) -> list[float]:
    """Per job: from its `queued` event to its first `running` event, in seconds."""
    queued_at: dict[int, float] = {}
    running_at: dict[int, float] = {}
    with open_database(db_path) as conn:
        rows = conn.execute(
            "SELECT job_id, at, data FROM events WHERE type = 'status' AND job_id BETWEEN ? AND ?"
            " ORDER BY seq",
            (min(job_ids), max(job_ids)),
        )
        for job_id, at, data in rows:
            status = json.loads(data)["status"]
            if status == "queued":
                queued_at.setdefault(job_id, at)
            elif status == "running":
                running_at.setdefault(job_id, at)
    return [running_at[job_id] - queued_at[job_id] for job_id in job_ids]


def measure_throughput(jobs: int) -> dict[str, float]:
    """`jobs` no-op jobs submitted over CONNECTIONS pipelined connections, accepted → done."""
    with serving(log_level="warning") as daemon:

        async def submit_all() -> None:
            async with trio.open_nursery() as nursery:
                for count in shares(jobs, CONNECTIONS):
                    nursery.start_soon(pipeline_submit, daemon.socket_path, count)

        first_submit_at = time.time()
        trio.run(submit_all)
        all_accepted_at = time.time()
        all_done_at = _wait_until_finished(daemon.db_path)
        daemon.stop()
    return {
        "jobs_per_s": jobs / (all_done_at - first_submit_at),
        "accepted_per_s": jobs / (all_accepted_at - first_submit_at),
    }


def measure_latency(rate: float, count: int) -> dict[str, float]:
    """Submit → accepted and accepted → started, in ms, at `rate` submissions per second."""
    with serving(log_level="warning") as daemon:
        trio.run(paced_submit, daemon.socket_path, rate, WARMUP_SUBMISSIONS)
        latencies, job_ids = trio.run(paced_submit, daemon.socket_path, rate, count)
        _wait_until_finished(daemon.db_path)
        waits = queued_to_running(daemon.db_path, job_ids)
        daemon.stop()
    return {
        "rate": rate,
        "submissions": count,
        "accepted_p50_ms": percentile(latencies, 0.50) * 1000,
        "accepted_p99_ms": percentile(latencies, 0.99) * 1000,
        "started_p50_ms": percentile(waits, 0.50) * 1000,
        "started_p99_ms": percentile(waits, 0.99) * 1000,
    }
