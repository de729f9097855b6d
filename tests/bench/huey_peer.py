"""Huey's side of the benchmark; run by run.py with the Python of tests/bench/.venv-peers.

Enqueues N no-op tasks into a SqliteHuey (results stored, `None` included, as jobwarden
stores every job's outcome), then runs Huey's real consumer with thread workers on a copy of
that queue, once per worker count, until every task has completed. SQLite's `synchronous`
level is set on every connection Huey opens. Prints one JSON object:
`{"jobs", "synchronous", "huey", "enqueue_per_s", "completed_per_s": {workers: rate}}`.

Standard library and huey only: it runs outside jobwarden's environment.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import huey
from huey import SqliteHuey
from huey.api import TaskWrapper
from huey.consumer import Consumer
from huey.signals import SIGNAL_COMPLETE
from huey.storage import SqliteStorage

# How often the consumer polls an empty queue: at first, and at most after backing off.
# Huey's defaults (0.1 s, 10 s) would only add idle time at the start and the stop of a run.
POLL_DELAY = 0.001
MAX_POLL_DELAY = 0.1


class SynchronousSqliteStorage(SqliteStorage):
    """SqliteStorage with `PRAGMA synchronous` set on each connection (Huey offers only
    `fsync=True`, FULL, or `fsync=False`, OFF)."""

    def __init__(self, *args: object, synchronous: str, **kwargs: object) -> None:
        self.synchronous = synchronous
        super().__init__(*args, **kwargs)

    def _create_connection(self):
        conn = super()._create_connection()
        conn.execute(f"PRAGMA synchronous={self.synchronous}")
        return conn


def noop() -> None:
    return None


def open_huey(path: Path, synchronous: str) -> tuple[SqliteHuey, TaskWrapper]:
    """The queue, and the no-op task registered on it (calling that enqueues one)."""
    queue = SqliteHuey(
        "bench",
        filename=str(path),
        store_none=True,
        storage_class=SynchronousSqliteStorage,
        synchronous=synchronous,
    )
    return queue, queue.task(name="noop")(noop)


def enqueue(path: Path, synchronous: str, jobs: int) -> float:
    """Enqueue `jobs` no-op tasks; enqueues per second."""
    queue, task = open_huey(path, synchronous)
    started = time.perf_counter()
    for _ in range(jobs):
        task()
    elapsed = time.perf_counter() - started
    queue.storage.close()
    return jobs / elapsed


def consume(path: Path, synchronous: str, jobs: int, workers: int) -> float:
    """Run the consumer until `jobs` tasks have completed; completions per second."""
    queue, _ = open_huey(path, synchronous)
    completed = 0
    all_completed = threading.Event()
    lock = threading.Lock()

    @queue.signal(SIGNAL_COMPLETE)
    def count(signal: str, task: object) -> None:
        nonlocal completed
        with lock:
            completed += 1
            if completed == jobs:
                all_completed.set()

    consumer = Consumer(
        queue,
        workers=workers,
        worker_type="thread",
        periodic=False,
        initial_delay=POLL_DELAY,
        max_delay=MAX_POLL_DELAY,
        check_worker_health=False,
    )
    started = time.perf_counter()
    consumer.start()
    all_completed.wait()
    elapsed = time.perf_counter() - started
    consumer.stop(graceful=True)
    stored = queue.result_count()
    queue.storage.close()
    if stored != jobs:
        raise RuntimeError(f"{stored} results stored for {jobs} tasks")
    return jobs / elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, required=True)
    parser.add_argument("--synchronous", choices=("NORMAL", "FULL"), required=True)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="huey-bench-") as directory:
        queued = Path(directory, "queued.db")
        enqueue_per_s = enqueue(queued, args.synchronous, args.jobs)
        completed_per_s = {}
        for workers in args.workers:
            copy = Path(directory, f"consume-{workers}.db")
            shutil.copyfile(queued, copy)
            completed_per_s[workers] = consume(copy, args.synchronous, args.jobs, workers)
    json.dump(
        {
            "jobs": args.jobs,
            "synchronous": args.synchronous,
            "huey": huey.__version__,
            "enqueue_per_s": enqueue_per_s,
            "completed_per_s": completed_per_s,
        },
        sys.stdout,
    )
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
