"""jobwarden on PostgreSQL: 1, 2 and 3 daemons on one database, beside one daemon on SQLite
and beside procrastinate and PgQueuer on the same server, in one run.

    .venv/bin/python tests/bench/cluster.py [--jobs N] [--latency-rate R]

Starts a throwaway PostgreSQL with fsync on (`.ci/postgres start DIR --durable`;
synchronous_commit stays on), each run in a fresh schema of its own. Prints each figure next to
its goal and writes results/<date>-cluster.json. Needs the bench extras procrastinate and
pgqueuer in the venv for the comparison (see pg_peers.py); without them those rows are skipped.

- *throughput*: N no-op jobs submitted over the admin sockets (8 pipelined connections, split
  across the daemons), from the first submission to the last `finished_at`;
- *latency*: one daemon of three takes submissions at a steady rate; accepted → started is
  read from each job's `queued` and first `running` events, so it includes the NOTIFY that
  wakes whichever daemon claims it.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

import psycopg  # noqa: E402
import trio  # noqa: E402

from tests.bench.admin_load import (  # noqa: E402
    CONNECTIONS,
    measure_throughput,
    paced_submit,
    pipeline_submit,
)
from tests.bench.harness import ServeProcess, percentile, shares  # noqa: E402
from tests.postgres import fresh_schema  # noqa: E402

SCRIPT = REPO_ROOT / ".ci" / "postgres"
RESULTS = Path(__file__).resolve().parent / "results"
POLL = 0.05


@contextlib.contextmanager
def durable_server() -> Iterator[str]:
    directory = Path(tempfile.mkdtemp(prefix="jw-bench-pg-"))
    url = subprocess.run(
        [str(SCRIPT), "start", str(directory), "--durable"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    try:
        yield url
    finally:
        subprocess.run([str(SCRIPT), "stop", str(directory)], check=False, capture_output=True)
        subprocess.run(["rm", "-rf", str(directory)], check=False)


@contextlib.contextmanager
def daemons_on(url: str, count: int) -> Iterator[list[ServeProcess]]:
    with contextlib.ExitStack() as stack:
        started = []
        for _ in range(count):
            directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="jw-bench-")))
            daemon = stack.enter_context(ServeProcess(directory, log_level="warning", url=url))
            # One at a time: the first migrates the fresh schema.
            daemon.wait_serving()
            started.append(daemon)
        yield started
        for daemon in started:
            daemon.stop()


def wait_all_done(url: str, jobs: int) -> float:
    """Once `jobs` jobs are done, the last `finished_at`."""
    with psycopg.connect(url, autocommit=True) as conn:
        while True:
            done, last = conn.execute(
                "SELECT COUNT(*), MAX(finished_at) FROM jobs WHERE status = 'done'"
            ).fetchone()
            if done >= jobs:
                return last
            time.sleep(POLL)


def pg_throughput(server: str, daemons: int, jobs: int) -> float:
    with fresh_schema(server) as url, daemons_on(url, daemons) as cluster:

        async def submit_all() -> None:
            async with trio.open_nursery() as nursery:
                for index, count in enumerate(shares(jobs, CONNECTIONS)):
                    socket = cluster[index % daemons].socket_path
                    # A user per connection: one user's row, which every job of theirs
                    # updates (daily count, credits), would make every daemon wait on it.
                    nursery.start_soon(pipeline_submit, socket, count, f"user{index}")

        first_submit_at = time.time()
        trio.run(submit_all)
        return jobs / (wait_all_done(url, jobs) - first_submit_at)


def pg_latency(server: str, rate: float, count: int) -> dict[str, float]:
    with fresh_schema(server) as url, daemons_on(url, 3) as cluster:
        trio.run(paced_submit, cluster[0].socket_path, rate, 100)
        _, job_ids = trio.run(paced_submit, cluster[0].socket_path, rate, count)
        wait_all_done(url, count + 100)
        with psycopg.connect(url, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT job_id, at, data FROM events WHERE type = 'status' "
                "AND job_id BETWEEN %s AND %s ORDER BY seq",
                (min(job_ids), max(job_ids)),
            ).fetchall()
    queued_at: dict[int, float] = {}
    running_at: dict[int, float] = {}
    for job_id, at, data in rows:
        status = json.loads(data)["status"]
        target = queued_at if status == "queued" else running_at if status == "running" else {}
        target.setdefault(job_id, at)
    waits = [running_at[job] - queued_at[job] for job in job_ids]
    return {
        "rate": rate,
        "started_p50_ms": percentile(waits, 0.50) * 1000,
        "started_p99_ms": percentile(waits, 0.99) * 1000,
    }


def peer(server: str, name: str, jobs: int) -> float | None:
    if importlib.util.find_spec(name) is None:
        return None
    from tests.bench import pg_peers

    with fresh_schema(server) as url:
        return getattr(pg_peers, f"{name}_throughput")(url, jobs)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--latency-rate", type=float, default=200.0)
    parser.add_argument("--latency-jobs", type=int, default=2000)
    args = parser.parse_args(argv)
    figures: dict[str, object] = {"jobs": args.jobs, "load_average": os.getloadavg()[0]}
    figures["sqlite_1_daemon"] = measure_throughput(args.jobs)["jobs_per_s"]
    with durable_server() as server:
        for daemons in (1, 2, 3):
            figures[f"postgresql_{daemons}_daemons"] = pg_throughput(server, daemons, args.jobs)
        figures["procrastinate"] = peer(server, "procrastinate", args.jobs)
        figures["pgqueuer"] = peer(server, "pgqueuer", args.jobs)
        figures["latency"] = pg_latency(server, args.latency_rate, args.latency_jobs)
    report(figures)
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y-%m-%d-%H%M")
    (RESULTS / f"{stamp}-cluster.json").write_text(json.dumps(figures, indent=2) + "\n")
    return 0


def report(figures: dict[str, object]) -> None:
    one = figures["postgresql_1_daemons"]
    best_peer = max((figures[name] or 0.0) for name in ("procrastinate", "pgqueuer"))
    rows = [
        ("sqlite, 1 daemon", figures["sqlite_1_daemon"], ""),
        ("postgresql, 1 daemon", one, ""),
        ("postgresql, 2 daemons", figures["postgresql_2_daemons"], "goal: more than 1 daemon"),
        ("postgresql, 3 daemons", figures["postgresql_3_daemons"], "goal: more than 1 daemon"),
        ("procrastinate, 1 worker", figures["procrastinate"], ""),
        ("pgqueuer, 1 worker", figures["pgqueuer"], ""),
    ]
    print(
        f"\nthroughput, {figures['jobs']} no-op jobs (load average {figures['load_average']:.1f})"
    )
    for name, value, goal in rows:
        shown = "skipped (not installed)" if value is None else f"{value:8.0f} jobs/s"
        print(f"  {name:26} {shown}  {goal}")
    if best_peer:
        ratio = one / best_peer
        verdict = "PASS" if ratio > 1 else "MISS"
        print(f"  jobwarden 1 daemon / best peer: {ratio:.2f}x  goal: > 1  {verdict}")
    latency = figures["latency"]
    print(
        f"accepted -> started on postgresql (3 daemons, {latency['rate']:g}/s to one): "
        f"p50 {latency['started_p50_ms']:.1f} ms, p99 {latency['started_p99_ms']:.1f} ms"
    )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
