"""Admission: the only way a job enters the queue.

Consumes `Submit` and `Requeue` from the listeners and `StopAdmitting`/`Reconfigure` from the
supervisor. Validates the kind and payload, applies the request guards (draining, payload
size), deduplicates by idempotency key, and has the store commit the job before the caller
hears "accepted". Produces `JobQueued` for the scheduler.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from typing import Any

import msgspec
import structlog
import trio

from actors.ledger import BudgetState
from actors.scheduler import JobQueued
from daemon import jobs
from daemon.clock import WallClock
from daemon.config import Config
from daemon.errors import RequestError
from daemon.handlers import validate_payload
from daemon.jobs import NewJob
from daemon.mailbox import ReplySlot
from daemon.metrics import Metrics
from daemon.protocol import JobView
from daemon.store import Store

log = structlog.get_logger("admission")


class Submit(msgspec.Struct):
    kind: str
    payload: Any
    user: str
    reply: ReplySlot[tuple[JobView, bool]]
    priority: int | None = None
    idempotency_key: str | None = None


class Requeue(msgspec.Struct):
    """An operator's retry of a failed or canceled job."""

    job_id: int
    reply: ReplySlot[JobView]


class StopAdmitting(msgspec.Struct):
    pass


class Reconfigure(msgspec.Struct):
    config: Config


AdmissionMessage = Submit | Requeue | StopAdmitting | Reconfigure | BudgetState

_encoder = msgspec.json.Encoder()
# Most submissions folded into one store write.
MAX_BATCH = 512


def check_submit(
    config: Config, msg: Submit, *, draining: bool, budget: BudgetState, now: float
) -> str:
    """The request guards, as a plain function. Returns the payload as stored JSON."""
    if draining:
        raise RequestError("DRAINING", "the daemon is shutting down and accepts no new jobs")
    if budget.stopped:
        retry_after = None if budget.until is None else max(0.0, round(budget.until - now, 3))
        raise RequestError(
            "BUDGET_EXHAUSTED",
            f"spending is stopped: {budget.reason}",
            retryable=True,
            retry_after=retry_after,
        )
    kind = config.kinds.get(msg.kind)
    if kind is None:
        known = ", ".join(sorted(config.kinds)) or "none"
        raise RequestError("INVALID_REQUEST", f"unknown kind '{msg.kind}' (known: {known})")
    try:
        payload_json = _encoder.encode(msg.payload)
    except (TypeError, msgspec.EncodeError) as exc:
        raise RequestError("INVALID_REQUEST", f"payload is not JSON: {exc}") from None
    limit = config.admission.max_payload_bytes
    if len(payload_json) > limit:
        raise RequestError(
            "PAYLOAD_TOO_LARGE",
            f"payload is {len(payload_json)} bytes; the limit is {limit} bytes",
        )
    try:
        validate_payload(kind, msg.payload)
    except ValueError as exc:
        raise RequestError("INVALID_REQUEST", str(exc)) from None
    if not 0 < len(msg.user) <= 64 or not msg.user.isprintable():
        raise RequestError("INVALID_REQUEST", "user must be 1 to 64 printable characters")
    if msg.idempotency_key is not None and not 0 < len(msg.idempotency_key) <= 200:
        raise RequestError("INVALID_REQUEST", "idempotency_key must be 1 to 200 characters")
    if msg.priority is not None and not -100 <= msg.priority <= 100:
        raise RequestError("INVALID_REQUEST", "priority must be within -100..100")
    return payload_json.decode()


class Admission:
    def __init__(
        self,
        *,
        config: Config,
        store: Store,
        clock: WallClock,
        inbox: trio.MemoryReceiveChannel[AdmissionMessage],
        scheduler: trio.MemorySendChannel[Any],
        metrics: Metrics,
    ) -> None:
        self._config = config
        self._store = store
        self._clock = clock
        self._inbox = inbox
        self._scheduler = scheduler
        self._metrics = metrics
        self._draining = False
        self._budget = BudgetState(stopped=False)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with self._inbox, self._scheduler, trio.open_nursery() as nursery:
            task_status.started()
            async for first in self._inbox:
                accepted: list[tuple[Submit, NewJob]] = []
                # Everything already waiting is handled in order; the submissions that pass
                # the guards go to the store as one write.
                for msg in self._waiting(first):
                    match msg:
                        case Submit():
                            new = self._check(msg)
                            if new is not None:
                                accepted.append((msg, new))
                        case Requeue():
                            nursery.start_soon(self._requeue, msg)
                        case StopAdmitting():
                            self._draining = True
                        case Reconfigure(config=config):
                            self._config = config
                        case BudgetState():
                            self._budget = msg
                if accepted:
                    nursery.start_soon(self._insert, accepted)
            nursery.cancel_scope.cancel()

    def _waiting(self, first: AdmissionMessage) -> Iterator[AdmissionMessage]:
        yield first
        for _ in range(MAX_BATCH - 1):
            try:
                yield self._inbox.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                return

    def _check(self, msg: Submit) -> NewJob | None:
        try:
            payload_json = check_submit(
                self._config,
                msg,
                draining=self._draining,
                budget=self._budget,
                now=self._clock.now(),
            )
        except RequestError as exc:
            self._metrics.rejected.labels(exc.body.code).inc()
            log.info("submit rejected", code=exc.body.code, kind=msg.kind, user=msg.user)
            msg.reply.fail(exc)
            return None
        kind = self._config.kinds[msg.kind]
        return NewJob(
            kind=msg.kind,
            user=msg.user,
            payload_json=payload_json,
            priority=kind.priority if msg.priority is None else msg.priority,
            idempotency_key=msg.idempotency_key,
            max_attempts=self._config.retry_policy(msg.kind).max_attempts,
        )

    async def _insert(self, accepted: list[tuple[Submit, NewJob]]) -> None:
        write = partial(jobs.insert_many, batch=[new for _, new in accepted], now=self._clock.now())
        try:
            results = await self._store.write(write)
        except Exception as exc:
            log.error("submissions failed in the store", error=str(exc), count=len(accepted))
            results = [exc] * len(accepted)
        queued_kinds = set()
        for (msg, _), result in zip(accepted, results, strict=True):
            if isinstance(result, Exception):
                log.error("submit failed in the store", error=str(result), kind=msg.kind)
                msg.reply.fail(RequestError("INTERNAL", "the job could not be stored"))
                continue
            job, existing = result
            msg.reply.set((job, existing))
            if not existing:
                queued_kinds.add(job.kind)
        for kind in sorted(queued_kinds):
            await self._scheduler.send(JobQueued(kind=kind))

    async def _requeue(self, msg: Requeue) -> None:
        if self._draining:
            msg.reply.fail(RequestError("DRAINING", "the daemon is shutting down"))
            return
        current = await self._store.read(partial(jobs.get_job, job_id=msg.job_id))
        if current is None:
            msg.reply.fail(RequestError("NOT_FOUND", f"no job {msg.job_id}"))
            return
        if current.kind not in self._config.kinds:
            msg.reply.fail(
                RequestError("INVALID_REQUEST", f"kind '{current.kind}' is no longer configured")
            )
            return
        job = await self._store.write(
            partial(
                jobs.requeue_manual,
                job_id=msg.job_id,
                max_attempts=self._config.retry_policy(current.kind).max_attempts,
                now=self._clock.now(),
            )
        )
        if job is None:
            msg.reply.fail(
                RequestError(
                    "INVALID_REQUEST",
                    f"job {msg.job_id} is {current.status}; only failed or canceled jobs retry",
                )
            )
            return
        msg.reply.set(job)
        await self._scheduler.send(JobQueued(kind=job.kind))
