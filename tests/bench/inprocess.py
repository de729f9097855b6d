"""Throughput through the in-process API: the real supervisor, threaded store and actors.

Many submitters send `Submit` to admission (as tests/conftest.py's `Daemon.submit` does) and
wait for "accepted"; every job then runs the no-op handler. The figure is jobs accepted → done
per second: from the first submission to the last `finished_at` in the store.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import trio

from jobwarden.actors.messages import Submit
from jobwarden.config import Config, load_config_text
from jobwarden.logs import configure_logging
from jobwarden.mailbox import ReplySlot
from jobwarden.process.admin import Stop
from jobwarden.process.supervisor import DaemonHandle, Supervisor
from tests.bench.harness import NOOP_KIND, any_unfinished, config_text, last_finished_at, shares

SUBMITTERS = 128
FINISH_POLL_INTERVAL = 0.05


async def _submit(admission: trio.MemorySendChannel[Any], count: int) -> None:
    for _ in range(count):
        reply: ReplySlot[Any] = ReplySlot()
        await admission.send(Submit(kind=NOOP_KIND, payload={}, user="bench", reply=reply))
        await reply.wait()


async def _run(config: Config, jobs: int) -> dict[str, float]:
    async with trio.open_nursery() as nursery:
        handle: DaemonHandle = await nursery.start(Supervisor(config).run)
        first_submit_at = handle.clock.now()
        async with trio.open_nursery() as submitters:
            for count in shares(jobs, SUBMITTERS):
                submitters.start_soon(_submit, handle.admission, count)
        all_accepted_at = handle.clock.now()
        while await handle.store.read(any_unfinished):
            await trio.sleep(FINISH_POLL_INTERVAL)
        all_done_at = await handle.store.read(last_finished_at)
        writes_per_commit = handle.store.writes / handle.store.batches
        await handle.control.send(Stop())
    return {
        "jobs_per_s": jobs / (all_done_at - first_submit_at),
        "accepted_per_s": jobs / (all_accepted_at - first_submit_at),
        "writes_per_commit": writes_per_commit,
    }


def measure_throughput(jobs: int, synchronous: str) -> dict[str, float]:
    """`jobs` no-op jobs accepted → done in process, at this `[store] synchronous` level."""
    configure_logging("json", "warning")
    with tempfile.TemporaryDirectory(prefix="jobwarden-bench-") as directory:
        config = load_config_text(
            config_text(synchronous=synchronous, log_level="warning"), base_dir=Path(directory)
        )
        return trio.run(_run, config, jobs)
