"""Job logs: what a job writes besides its protocol, kept with the job.

Three sources feed one `JobLogs` the pool owns: a command's stderr and the stdout lines that
are no protocol line (actors/handlers.py), a python handler's `ctx.log(...)`, and records of
the standard `logging` emitted inside a job's task (`JobLogHandler`, on the root logger while
the pool runs: the task's context says whose job it is, so a handler's own child tasks count
too, and nothing outside a job is taken). Lines are untrusted: each is made printable and
clipped where it comes in.

`add` never blocks and never writes: lines wait in memory, and `run` writes all that waited
as one store write every `flush_every` (the engine's group commit folds it with the rest). A
job that ends has its lines handed to the store ahead of its outcome (`hand_over_for`), so a
reader who sees the job final sees all its lines. At most MAX_PENDING lines wait: past that,
while the store is slow or faulted, new lines are dropped and counted in the log.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from functools import partial

import structlog
import trio

from jobwarden.clock import WallClock
from jobwarden.config import JobLogsSection
from jobwarden.errors import StoreError
from jobwarden.logs import clip, printable
from jobwarden.store import Engine, joblogs
from jobwarden.store.joblogs import NewLine

log = structlog.get_logger("joblogs")

# Lines waiting for their write, over all jobs: a bound on memory while the store is slow.
MAX_PENDING = 50_000


class JobLogs:
    """Collects jobs' log lines and writes them in batches."""

    def __init__(self, *, store: Engine, clock: WallClock, config: JobLogsSection) -> None:
        self._store = store
        self._clock = clock
        self.config = config
        self._pending: list[NewLine] = []
        self._waiting = trio.Event()
        # Lines dropped since the last flush because too many waited.
        self._overflow = 0
        # Counts flushes, so a reader waiting for new lines misses none.
        self.flushes = 0
        self._flushed = trio.Event()

    def add(self, job_id: int, attempt: int, stream: str, text: str) -> None:
        if len(self._pending) >= MAX_PENDING:
            self._overflow += 1
            return
        line = clip(printable(text.rstrip("\r\n")), self.config.max_line_chars)
        self._pending.append(NewLine(job_id, attempt, self._clock.now(), stream, line))
        self._waiting.set()

    def hand_over_for(self, job_ids: set[int]) -> None:
        """Hand the store the lines of jobs that ended, ahead of their outcomes' write."""
        ended = [line for line in self._pending if line.job_id in job_ids]
        if not ended:
            return
        self._pending = [line for line in self._pending if line.job_id not in job_ids]
        self._store.hand_over(self._append(ended))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        try:
            while True:
                await self._waiting.wait()
                await trio.sleep(self.config.flush_every)
                await self.flush()
        finally:
            # What waited still goes to the store as the pool stops (shielded: it is late).
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                await self.flush()

    async def flush(self) -> None:
        lines, self._pending = self._pending, []
        self._waiting = trio.Event()
        if self._overflow:
            log.warning(
                "job log lines dropped: too many waited for the store", lines=self._overflow
            )
            self._overflow = 0
        if lines:
            try:
                await self._store.write(self._append(lines))
            except StoreError as exc:
                log.warning(
                    "job log lines lost: the store takes no writes",
                    lines=len(lines),
                    error=str(exc),
                )
        self.flushes += 1
        self._flushed.set()
        self._flushed = trio.Event()

    async def wait_flushed(self, seen: int) -> None:
        """Return once a flush after the `seen`-th has happened."""
        while self.flushes == seen:
            await self._flushed.wait()

    def _append(self, lines: list[NewLine]) -> partial[int]:
        # Grouped by job, in order: one UPDATE of each job's counts per write.
        lines.sort(key=lambda line: line.job_id)
        return partial(joblogs.append, lines=lines, max_bytes=self.config.max_bytes)


# The job whose task is running, with the sink its lines go to.
_current: ContextVar[tuple[JobLogs, int, int] | None] = ContextVar("jobwarden_job", default=None)


@contextmanager
def logging_for(logs: JobLogs, job_id: int, attempt: int) -> Iterator[None]:
    """Within the context, records of the standard logging go to this job's log."""
    token = _current.set((logs, job_id, attempt))
    try:
        yield
    finally:
        _current.reset(token)


class JobLogHandler(logging.Handler):
    """Routes a record emitted inside a job's task to that job's log; ignores the rest."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        current = _current.get()
        if current is None:
            return
        logs, job_id, attempt = current
        try:
            text = self.format(record)
        except Exception:  # a record whose message does not format: say so, not raise
            text = f"{record.levelname} {record.name}: (unformattable message {record.msg!r})"
        for line in text.splitlines() or [""]:
            logs.add(job_id, attempt, "log", line)


@contextmanager
def capture_logging() -> Iterator[None]:
    """While the pool runs: the root logger passes INFO records on to `JobLogHandler`."""
    root = logging.getLogger()
    handler = JobLogHandler()
    level = root.level
    root.addHandler(handler)
    if root.level > logging.INFO:
        root.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
