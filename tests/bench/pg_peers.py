"""procrastinate and PgQueuer on the same PostgreSQL, with the same no-op jobs, for comparison.

Each runs in a schema of its own on the server jobwarden is measured on. The figure is the
same as jobwarden's: N jobs from the first enqueue to the last one done, enqueueing included.
Both enqueue the N jobs in batches (one statement for many jobs), which jobwarden's admin
socket does not offer: a shortcut that favours them. Each runs one worker process with 64 jobs
at once, as one jobwarden daemon runs 64 slots. They are bench extras, installed in the venv
by hand (`pip install procrastinate pgqueuer`), not dependencies of jobwarden.
"""

from __future__ import annotations

import asyncio
import time

CONCURRENCY = 64
ENQUEUE_BATCH = 1000


async def _procrastinate(url: str, jobs: int) -> float:
    import procrastinate

    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=url))

    @app.task(name="noop")
    async def noop() -> None:
        return None

    async with app.open_async():
        await app.schema_manager.apply_schema_async()
        started = time.perf_counter()
        for start in range(0, jobs, ENQUEUE_BATCH):
            await noop.batch_defer_async(*[{}] * min(ENQUEUE_BATCH, jobs - start))
        # wait=False: the worker stops once the queue is empty.
        await app.run_worker_async(
            concurrency=CONCURRENCY, wait=False, install_signal_handlers=False
        )
        return jobs / (time.perf_counter() - started)


async def _pgqueuer(url: str, jobs: int) -> float:
    import psycopg
    from pgqueuer import PgQueuer, PsycopgDriver, Queries
    from pgqueuer.types import QueueExecutionMode

    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        driver = PsycopgDriver(conn)
        queries = Queries(driver)
        await queries.install()
        pgq = PgQueuer(driver)

        @pgq.entrypoint("noop")
        async def noop(job: object) -> None:
            return None

        started = time.perf_counter()
        for start in range(0, jobs, ENQUEUE_BATCH):
            count = min(ENQUEUE_BATCH, jobs - start)
            await queries.enqueue(["noop"] * count, [None] * count, [0] * count)
        # drain: the consumer stops once the queue is empty.
        await pgq.run(
            # Its rule: at least twice the batch in flight.
            batch_size=CONCURRENCY // 2,
            max_concurrent_tasks=CONCURRENCY,
            mode=QueueExecutionMode.drain,
        )
        return jobs / (time.perf_counter() - started)


def procrastinate_throughput(url: str, jobs: int) -> float:
    return asyncio.run(_procrastinate(url, jobs))


def pgqueuer_throughput(url: str, jobs: int) -> float:
    return asyncio.run(_pgqueuer(url, jobs))
