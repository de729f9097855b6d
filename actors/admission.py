"""Admission: the only way a job enters the queue.

Consumes `Submit` and `Requeue` from the listeners, `UserRate` from the admin `users` commands,
`BudgetState` from the ledger and `StopAdmitting`/`Reconfigure` from the supervisor. Produces
`JobQueued` for the scheduler.

The guards run in two places. Here, in memory: draining, a store that takes no writes
(`STORAGE_FULL`/`STORAGE_ERROR`, as the engine's health says), budget, kind, payload size and
schema, a kind's memory requirement this machine can never meet (its total memory, as the
daemon's one sampler read it at start), and the per-user rate limit (a `TokenBucket` on trio's
clock; buckets may be lost on restart, as a rate is about the last minute). In the store,
inside the transaction that inserts the job, so they survive restarts and never race a refund:
user exists and is enabled, daily job limit, queue depth (global and per kind), credits
(reserved there, spent or refunded when the job ends). The store commits the job before the
caller hears "accepted".

Idempotency: a submission whose key holds a job (the user's active job with that key, its own
finished job when a client sends it again, or one that finished within
`admission.idempotency_window`) gets that job, or CONFLICT for other work, and no guard of the
store applies to it. Nor does the rate limit: a keyed submission of a rate-limited user takes
its token only after a read of the store has found no such job, batched like the inserts.

Adaptive shedding (seed 002): once the queue is past `limits.shed_at` of its limit, the store
says for each accepted job whether its user holds more than a fair share of the queue; such a
user's bucket refills at `shed_rate_factor` of their rate for a minute, so the heaviest writers
are slowed first and light users keep going.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from functools import partial
from typing import Any, NamedTuple

import msgspec
import structlog
import trio

from jobwarden.actors.bucket import TokenBucket
from jobwarden.actors.budget import BudgetCalendar
from jobwarden.actors.handlers import validate_payload
from jobwarden.actors.messages import (
    AdmissionMessage,
    BudgetState,
    JobQueued,
    Reconfigure,
    Requeue,
    RequeueMatching,
    StopAdmitting,
    Submit,
    SubmitMany,
    UserRate,
)
from jobwarden.clock import WallClock
from jobwarden.config import Config, format_size, parse_rate
from jobwarden.errors import RequestError, StoreError
from jobwarden.metrics import Metrics
from jobwarden.store import Engine, jobs, users
from jobwarden.store.jobs import Admitted, BatchRefused, NewJob, Quota, Refused
from jobwarden.wire.views import BulkOutcome, ErrorBody

log = structlog.get_logger("admission")


_encoder = msgspec.json.Encoder()
# Most submissions folded into one store write.
MAX_BATCH = 512
# How long a user found above their fair share of a nearly full queue stays slowed.
SHED_FOR = 60.0
# Buckets kept before full ones (which a new bucket equals) are dropped.
MAX_BUCKETS = 10_000


def check_submit(
    config: Config,
    msg: Submit,
    *,
    draining: bool,
    budget: BudgetState,
    now: float,
    total_memory: int,
    store_fault: StoreError | None = None,
) -> str:
    """The request guards, as a plain function. Returns the payload as stored JSON."""
    if draining:
        raise RequestError("DRAINING", "the daemon is shutting down and accepts no new jobs")
    if store_fault is not None:
        # The job could not be committed, so it could not be accepted.
        raise store_fault.refusal()
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
    for name, value in (
        ("idempotency_key", msg.idempotency_key),
        ("submission_id", msg.submission_id),
    ):
        if value is not None and not 0 < len(value) <= 200:
            raise RequestError("INVALID_REQUEST", f"{name} must be 1 to 200 characters")
    if msg.submission_id is not None and msg.idempotency_key is None:
        raise RequestError("INVALID_REQUEST", "submission_id needs an idempotency_key")
    if msg.priority is not None and not -100 <= msg.priority <= 100:
        raise RequestError("INVALID_REQUEST", "priority must be within -100..100")
    if kind.min_memory is not None and kind.min_memory > total_memory:
        raise RequestError(
            "INVALID_REQUEST",
            f"kind '{msg.kind}' needs {format_size(kind.min_memory)} free, and this machine "
            f"has {format_size(total_memory)} of memory in total: it could never start",
        )
    return payload_json.decode()


class Admission:
    def __init__(
        self,
        *,
        config: Config,
        store: Engine,
        clock: WallClock,
        inbox: trio.MemoryReceiveChannel[AdmissionMessage],
        scheduler: trio.MemorySendChannel[Any],
        metrics: Metrics,
        total_memory: int,
    ) -> None:
        self._config = config
        self._store = store
        self._clock = clock
        self._inbox = inbox
        self._scheduler = scheduler
        self._metrics = metrics
        self._draining = False
        self._budget = BudgetState(stopped=False)
        self._calendar = BudgetCalendar(config.limits.day_zone(config.budget))
        self._total_memory = total_memory
        self._buckets: dict[str, TokenBucket] = {}
        # Users' own rates (per second), where they differ from the default.
        self._rates: dict[str, float] = {}
        self._slowed_until: dict[str, float] = {}

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        for name, rate in (await self._store.read(users.own_rates)).items():
            self._rates[name] = parse_rate(rate)
        async with self._inbox, self._scheduler, trio.open_nursery() as nursery:
            task_status.started()
            async for first in self._inbox:
                accepted: list[Checked] = []
                # Everything already waiting is handled in order; the submissions that pass
                # the guards go to the store as one write.
                for msg in self._waiting(first):
                    match msg:
                        case Submit():
                            checked = self._check(msg)
                            if checked is not None:
                                accepted.append(checked)
                        case SubmitMany():
                            if not self._batch_fits(msg):
                                continue
                            if msg.atomic:
                                nursery.start_soon(self._insert_all_or_none, msg)
                                continue
                            # The items join this round's one store write.
                            for item in msg.items:
                                checked = self._check(item)
                                if checked is not None:
                                    accepted.append(checked)
                            msg.reply.set(None)
                        case Requeue():
                            nursery.start_soon(self._requeue, msg)
                        case RequeueMatching():
                            nursery.start_soon(self._requeue_matching, msg)
                        case StopAdmitting():
                            self._draining = True
                        case Reconfigure(config=config):
                            self._config = config
                            self._calendar = BudgetCalendar(config.limits.day_zone(config.budget))
                        case BudgetState():
                            self._budget = msg
                        case UserRate(user=user, rate=rate):
                            if rate is None:
                                self._rates.pop(user, None)
                            else:
                                self._rates[user] = parse_rate(rate)
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

    def _refuse(self, msg: Submit, exc: RequestError) -> None:
        # Counted here by code; the listener that asked logs it, rate-limited (a client that
        # submits nothing but refusals must not flood the log).
        self._metrics.rejected.labels(exc.body.code).inc()
        msg.reply.fail(exc)

    def _check(self, msg: Submit) -> Checked | None:
        now = self._clock.now()
        # A keyed submission may repeat a job, which costs no token: it takes its token once
        # the store has said it does not (see _answer_repeats).
        owes_token = msg.idempotency_key is not None and not math.isinf(self._rate(msg.user))
        try:
            new = self._checked(msg, now)
            if not owes_token:
                self._take_token(msg.user, now)
        except RequestError as exc:
            self._refuse(msg, exc)
            return None
        return Checked(msg, new, owes_token)

    def _checked(self, msg: Submit, now: float) -> NewJob:
        """The job `msg` asks for, once the guards in memory but the rate let it through."""
        payload_json = check_submit(
            self._config,
            msg,
            draining=self._draining,
            budget=self._budget,
            now=now,
            total_memory=self._total_memory,
            store_fault=self._store.health.error(),
        )
        kind = self._config.kinds[msg.kind]
        return NewJob(
            kind=msg.kind,
            user=msg.user,
            payload_json=payload_json,
            priority=kind.priority if msg.priority is None else msg.priority,
            idempotency_key=msg.idempotency_key,
            max_attempts=self._config.retry_policy(msg.kind).max_attempts,
            submission_id=msg.submission_id,
        )

    def _batch_fits(self, batch: SubmitMany) -> bool:
        """Whether a batch has 1 to max_batch_items items; it is refused as a whole if not."""
        limit = self._config.admission.max_batch_items
        if 0 < len(batch.items) <= limit:
            return True
        error = RequestError(
            "INVALID_REQUEST",
            f"submit_many: a batch has 1 to {limit} items, this one has {len(batch.items)}",
        )
        self._metrics.rejected.labels(error.body.code).inc()
        batch.reply.fail(error)
        return False

    def _rate(self, user: str) -> float:
        return self._rates.get(user, self._config.limits.rate)

    def _take_token(self, user: str, now: float) -> None:
        limits = self._config.limits
        rate = self._rate(user)
        if math.isinf(rate):
            return
        slowed = self._slowed_until.get(user, -math.inf) > now
        if slowed:
            rate *= limits.shed_rate_factor
        if len(self._buckets) > MAX_BUCKETS:
            self._buckets = {
                name: bucket for name, bucket in self._buckets.items() if not bucket.full(now)
            }
        bucket = self._buckets.get(user)
        if bucket is None:
            bucket = self._buckets[user] = TokenBucket(rate=rate, burst=limits.burst, now=now)
        # The user may have been slowed, re-rated or reloaded since their last submission.
        bucket.rate, bucket.burst = rate, limits.burst
        wait = bucket.take(now)
        if wait:
            why = " (slowed: you hold more than a fair share of a nearly full queue)"
            raise RequestError(
                "RATE_LIMITED",
                f"user '{user}' may submit {_per_minute(rate)} jobs a minute"
                + (why if slowed else ""),
                retry_after=round(wait, 3),
            )

    def _quota(self, now: float) -> Quota:
        limits = self._config.limits
        kinds = self._config.kinds
        return Quota(
            day=self._calendar.day(now),
            daily_jobs=limits.daily_jobs,
            default_credits=None if limits.credits == "unlimited" else limits.credits,
            create_users=limits.create_users,
            max_queued=limits.max_queued,
            kind_max_queued={name: kind.max_queued for name, kind in kinds.items()},
            kind_credits={name: kind.credits for name, kind in kinds.items()},
            shed_depth=math.ceil(limits.max_queued * limits.shed_at),
        )

    def _refused(self, refused: Refused, now: float) -> RequestError:
        retry_after = refused.retry_after
        if refused.code == "DAILY_LIMIT":
            retry_after = round(self._calendar.next_day(now) - now, 3)
        return RequestError(refused.code, refused.message, retry_after=retry_after)

    async def _insert(self, accepted: list[Checked]) -> None:
        if any(checked.owes_token for checked in accepted):
            accepted = await self._answer_repeats(accepted)
            if not accepted:
                return
        now = self._clock.now()
        write = partial(
            jobs.insert_many,
            batch=[checked.new for checked in accepted],
            now=now,
            quota=self._quota(now),
            idempotency_window=self._config.admission.idempotency_window,
        )
        try:
            results = await self._store.write(write)
        except StoreError as exc:
            results = [exc] * len(accepted)
        except Exception as exc:
            log.error("submissions failed in the store", error=str(exc), count=len(accepted))
            results = [exc] * len(accepted)
        queued_kinds = set()
        for checked, result in zip(accepted, results, strict=True):
            msg = checked.msg
            match result:
                case Admitted(job=job, existing=True):
                    msg.reply.set((job, True))
                case Admitted(job=job, heavy=heavy):
                    msg.reply.set((job, False))
                    queued_kinds.add(job.kind)
                    if heavy:
                        self._slowed_until[msg.user] = now + SHED_FOR
                    else:
                        self._slowed_until.pop(msg.user, None)
                case Refused():
                    self._refuse(msg, self._refused(result, now))
                case StoreError():
                    self._refuse(msg, result.refusal())
                case _:
                    log.error("submit failed in the store", error=str(result), kind=msg.kind)
                    msg.reply.fail(RequestError("INTERNAL", "the job could not be stored"))
        for kind in sorted(queued_kinds):
            await self._scheduler.send(JobQueued(kind=kind))

    async def _answer_repeats(self, accepted: list[Checked]) -> list[Checked]:
        """Answer the submissions that owe a token and repeat a job (or conflict with one)
        from one read of the store; the others take their token now. What is left goes on to
        the insert, which looks for repeats again in its transaction: a job may have been
        made or finished since this read."""
        owing = [checked.new for checked in accepted if checked.owes_token]
        read = partial(
            jobs.find_repeats,
            batch=owing,
            now=self._clock.now(),
            idempotency_window=self._config.admission.idempotency_window,
        )
        try:
            repeats = iter(await self._store.read(read))
        except Exception as exc:
            # The insert's own lookup still answers repeats; they cost a token meanwhile.
            log.warning("looking up repeated submissions failed", error=str(exc))
            repeats = iter([None] * len(owing))
        now = self._clock.now()
        left = []
        for checked in accepted:
            if checked.owes_token:
                repeat = next(repeats)
                if isinstance(repeat, Admitted):
                    checked.msg.reply.set((repeat.job, True))
                    continue
                if isinstance(repeat, Refused):
                    self._refuse(checked.msg, self._refused(repeat, now))
                    continue
                try:
                    self._take_token(checked.msg.user, now)
                except RequestError as exc:
                    self._refuse(checked.msg, exc)
                    continue
            left.append(checked)
        return left

    def _give_back(self, user: str, tokens: int) -> None:
        """Return rate tokens taken for submissions that were not made after all."""
        bucket = self._buckets.get(user)
        if bucket is not None:
            bucket.tokens = min(bucket.burst, bucket.tokens + tokens)

    async def _insert_all_or_none(self, batch: SubmitMany) -> None:
        """An atomic batch: every item passes the guards (in memory, then in the store, in
        one write) or none is submitted, and the batch fails with the first refusal, named by
        its item's index. Each item takes its rate token, keyed or not (the tokens go back
        when the batch is refused): a repeat is known only inside the write."""
        now = self._clock.now()
        taken: dict[str, int] = {}
        try:
            news = []
            for index, item in enumerate(batch.items):
                try:
                    news.append(self._checked(item, now))
                    self._take_token(item.user, now)
                except RequestError as exc:
                    raise _item_error(index, exc.body) from None
                taken[item.user] = taken.get(item.user, 0) + 1
            write = partial(
                jobs.insert_all_or_none,
                batch=news,
                now=now,
                quota=self._quota(now),
                idempotency_window=self._config.admission.idempotency_window,
            )
            try:
                admitted = await self._store.write(write)
            except BatchRefused as exc:
                if isinstance(exc.refusal, Refused):
                    body = self._refused(exc.refusal, now).body
                else:
                    log.error("a batch item failed in the store", error=str(exc.refusal))
                    body = RequestError("INTERNAL", "the job could not be stored").body
                raise _item_error(exc.index, body) from None
            except StoreError as exc:
                raise exc.refusal() from None
            except Exception as exc:
                log.error("a batch failed in the store", error=str(exc), count=len(news))
                raise RequestError("INTERNAL", "the jobs could not be stored") from None
        except RequestError as exc:
            for user, count in taken.items():
                self._give_back(user, count)
            self._metrics.rejected.labels(exc.body.code).inc()
            batch.reply.fail(exc)
            return
        for item, result in zip(batch.items, admitted, strict=True):
            item.reply.set((result.job, result.existing))
        batch.reply.set(None)
        for kind in sorted({result.job.kind for result in admitted if not result.existing}):
            await self._scheduler.send(JobQueued(kind=kind))

    async def _requeue_matching(self, msg: RequeueMatching) -> None:
        """Retry every failed or canceled job the filter matches, BULK_BATCH a write."""
        if self._draining:
            msg.reply.fail(RequestError("DRAINING", "the daemon is shutting down"))
            return
        outcome = BulkOutcome(action="retry", dry_run=False, matched=0)
        after_id = 0
        more = True
        while more:
            policies = {
                name: (self._config.retry_policy(name).max_attempts, kind.credits)
                for name, kind in self._config.kinds.items()
            }
            try:
                batch = await self._store.write(
                    partial(
                        jobs.requeue_matching,
                        job_filter=msg.job_filter,
                        now=self._clock.now(),
                        after_id=after_id,
                        limit=jobs.BULK_BATCH,
                        policies=policies,
                    )
                )
            except StoreError as exc:
                # What was retried so far stays retried; the operator runs it again later.
                msg.reply.fail(exc.refusal())
                return
            after_id, more = batch.last_id, batch.more
            outcome.changed += len(batch.changed)
            outcome.ids += [job.id for job in batch.changed][: msg.show - len(outcome.ids)]
            for code, count in batch.refused.items():
                outcome.refused[code] = outcome.refused.get(code, 0) + count
            for kind in sorted({job.kind for job in batch.changed}):
                await self._scheduler.send(JobQueued(kind=kind))
        outcome.matched = outcome.changed + sum(outcome.refused.values())
        msg.reply.set(outcome)

    async def _requeue(self, msg: Requeue) -> None:
        if self._draining:
            msg.reply.fail(RequestError("DRAINING", "the daemon is shutting down"))
            return
        current = await self._store.read(partial(jobs.get_job, job_id=msg.job_id))
        if current is None:
            msg.reply.fail(RequestError("NOT_FOUND", f"no job {msg.job_id}"))
            return
        kind = self._config.kinds.get(current.kind)
        if kind is None:
            msg.reply.fail(
                RequestError("INVALID_REQUEST", f"kind '{current.kind}' is no longer configured")
            )
            return
        now = self._clock.now()
        try:
            job = await self._store.write(
                partial(
                    jobs.requeue_manual,
                    job_id=msg.job_id,
                    max_attempts=self._config.retry_policy(current.kind).max_attempts,
                    credits=kind.credits,
                    now=now,
                )
            )
        except StoreError as exc:
            msg.reply.fail(exc.refusal())
            return
        if isinstance(job, Refused):
            msg.reply.fail(self._refused(job, now))
            return
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


class Checked(NamedTuple):
    """A submission that passed the guards in memory, and whether it owes a rate token."""

    msg: Submit
    new: NewJob
    owes_token: bool


def _item_error(index: int, body: ErrorBody) -> RequestError:
    """An item's refusal as its whole batch's: the same code, the item named."""
    return RequestError(
        body.code,
        f"item {index}: {body.message}",
        retryable=body.retryable,
        retry_after=body.retry_after,
    )


def _per_minute(rate: float) -> str:
    return f"{rate * 60:g}"
