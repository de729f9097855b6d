"""Scale: dispatch rate, memory and start-up time against the number of jobs in the database.

For each size the database is filled directly (one bulk INSERT, the daemon's own schema), then
`jobwarden serve` starts on it twice: first at log level warning, to time how fast it dispatches
and finishes the first jobs while sampling its RSS; then at level info, to time a restart from
the spawn to the "jobwarden ready" line. Recovery is the start-up time on a database
that a `kill -9` left with many `running` jobs.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from tests.bench.harness import ServeProcess, done_jobs, open_database, prefill

DISPATCH_SAMPLE = 5_000
RECOVERY_RUNNING = 10_000
SAMPLE_INTERVAL = 0.02


def _time_to_ready(directory: Path) -> float:
    with ServeProcess(directory, log_level="info") as daemon:
        seconds = daemon.wait_ready_line()
        daemon.stop()
    return seconds


def _dispatch(directory: Path, sample: int) -> dict[str, float]:
    """The first `sample` jobs of a fresh queue: their rate, and the daemon's peak RSS."""
    with ServeProcess(directory, log_level="warning") as daemon:
        with open_database(daemon.db_path) as conn:
            daemon.wait_serving()
            peak_rss = daemon.rss_bytes()
            while done_jobs(conn) < sample:
                peak_rss = max(peak_rss, daemon.rss_bytes())
                time.sleep(SAMPLE_INTERVAL)
            first_started, last_finished = conn.execute(
                "SELECT MIN(started_at), MAX(finished_at) FROM (SELECT started_at, finished_at"
                " FROM jobs WHERE status = 'done' ORDER BY finished_at LIMIT ?)",
                (sample,),
            ).fetchone()
        daemon.stop()
    return {
        "dispatch_per_s": sample / (last_finished - first_started),
        "peak_rss_mb": peak_rss / 2**20,
    }


def measure_size(queued: int) -> dict[str, float]:
    """Start-up time, dispatch rate and peak RSS with `queued` jobs waiting."""
    with tempfile.TemporaryDirectory(prefix="jobwarden-bench-") as name:
        directory = Path(name)
        started = time.monotonic()
        prefill(directory / "jw.db", queued=queued)
        prefill_s = time.monotonic() - started
        figures = _dispatch(directory, min(DISPATCH_SAMPLE, queued))
        ready_s = _time_to_ready(directory)
    return {"queued": queued, "prefill_s": prefill_s, **figures, "ready_s": ready_s}


def measure_recovery(running: int = RECOVERY_RUNNING) -> dict[str, float]:
    """Start-up time on a database holding `running` jobs that a crash left running."""
    with tempfile.TemporaryDirectory(prefix="jobwarden-bench-") as name:
        directory = Path(name)
        prefill(directory / "jw.db", queued=0, running=running)
        with ServeProcess(directory, log_level="info") as daemon:
            ready_s = daemon.wait_ready_line()
            recovered = daemon.logged("start-up recovery done")["recovered"]
            daemon.stop()
    if recovered != running:
        raise RuntimeError(f"recovered {recovered} of {running} running jobs")
    return {"running": running, "ready_s": ready_s}
