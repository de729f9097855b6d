"""Admission: the only way a job enters the queue.

Consumes `Submit`, `SubmitMany` (a batch: its items join the round's write, or with `atomic`
go in one write all or none), `Requeue` and `RequeueMatching` (a bulk retry by filter) from the
listeners, `BudgetState` from the ledger and `StopAdmitting`/`Reconfigure` from the supervisor.
Produces `JobQueued` for the scheduler.

The guards run in two places. Here, in memory, the checks of the request and of this daemon:
draining, a store that takes no writes (a `STORAGE_` code, as the engine's health says),
budget, kind, payload size and schema, a kind's memory requirement this machine can never meet
(its total memory, as the daemon's one sampler read it at start). In the store,
inside the transaction that inserts the job, the guards that count, so they survive restarts
and hold for every daemon on the database: user exists and is enabled, the per-user rate limit
(a `TokenBucket` applied to the bucket kept in the user's row; the user's own rate is read
there too, so `users set --rate` holds everywhere at once), daily job limit, queue depth
(global and per kind), credits (reserved there, spent or refunded when the job ends). The
store commits the job before the caller hears "accepted".

Idempotency: a submission whose key holds a job (the user's active job with that key, its own
finished job when a client sends it again, or one that finished within
`admission.idempotency_window`) gets that job, or CONFLICT for other work, and no guard of the
store applies to it, the rate limit included: the store looks for the job first.

Recurring schedules (actors/schedules.py) fire from a task of admission: each run is a
submission the daemon makes itself, through the same guards in memory and the same insert,
but for the user's rate limit and the [limits] defaults meant for what users submit (the
daily job count, a new user's credits); the user's own limits and credits still apply.
`ScheduleAction` lists, pauses, resumes and triggers them.

Adaptive shedding (seed 002): once the queue is past `limits.shed_at` of its limit, the store
marks a user who holds more than a fair share of the queue as slowed for a minute: their
bucket refills at `shed_rate_factor` of their rate, so the heaviest writers are slowed first
and light users keep going.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from datetime import datetime
from functools import partial
from typing import Any, NamedTuple
from urllib.parse import urlsplit

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
    ScheduleAction,
    StopAdmitting,
    Submit,
    SubmitMany,
)
from jobwarden.actors.schedules import Schedules
from jobwarden.clock import WallClock
from jobwarden.config import Config, format_duration, format_size, parse_duration
from jobwarden.errors import RequestError, StoreError
from jobwarden.mailbox import ReplySlot
from jobwarden.metrics import Metrics
from jobwarden.store import Engine, jobs, schedules
from jobwarden.store.jobs import Admitted, BatchRefused, NewJob, Quota, Refused
from jobwarden.wire.views import BulkOutcome, ErrorBody

log = structlog.get_logger("admission")


_encoder = msgspec.json.Encoder()
# Most submissions folded into one store write.
MAX_BATCH = 512
# How long a user found above their fair share of a nearly full queue stays slowed.
SHED_FOR = 60.0
# Tags: a few short words a job is found by (`jobs --tag`), never metric labels.
MAX_TAGS = 8
TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,31}")
# Jobs one job may run after.
MAX_AFTER = 32


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
    if msg.webhook is not None:
        check_webhook(msg.webhook, config.webhooks.allowed_hosts)
    if msg.priority is not None and not -100 <= msg.priority <= 100:
        raise RequestError("INVALID_REQUEST", "priority must be within -100..100")
    if kind.min_memory is not None and kind.min_memory > total_memory:
        raise RequestError(
            "INVALID_REQUEST",
            f"kind '{msg.kind}' needs {format_size(kind.min_memory)} free, and this machine "
            f"has {format_size(total_memory)} of memory in total: it could never start",
        )
    return payload_json.decode()


class Waits(NamedTuple):
    """What a submission waits for besides its turn, checked."""

    run_at: float | None
    tags: tuple[str, ...]
    after: tuple[int, ...]


def check_waits(config: Config, msg: Submit, *, now: float) -> Waits:
    """A submission's start time, tags and dependencies, or INVALID_REQUEST naming the field.
    A start time that has passed is now (None); one beyond `admission.max_delay` is refused."""
    if msg.run_at is not None and msg.delay is not None:
        raise RequestError("INVALID_REQUEST", "give run_at or delay, not both")
    start = None
    if msg.run_at is not None:
        start = _parse_time(msg.run_at)
    elif msg.delay is not None:
        try:
            delay = parse_duration(msg.delay)
        except ValueError as exc:
            raise RequestError("INVALID_REQUEST", f"delay: {exc}") from None
        if math.isinf(delay):
            raise RequestError("INVALID_REQUEST", 'delay: expected a duration like "10m"')
        start = now + delay
    horizon = config.admission.max_delay
    if start is not None and start - now > horizon:
        field = "run_at" if msg.run_at is not None else "delay"
        raise RequestError(
            "INVALID_REQUEST",
            f"{field}: at most {format_duration(horizon)} ahead (admission.max_delay)",
        )
    tags = tuple(dict.fromkeys(msg.tags or ()))
    if len(tags) > MAX_TAGS:
        raise RequestError("INVALID_REQUEST", f"tags: at most {MAX_TAGS}, got {len(tags)}")
    for tag in tags:
        if not TAG.fullmatch(tag):
            raise RequestError(
                "INVALID_REQUEST",
                f"tags: {tag[:40]!r} is not 1 to 32 letters, digits and _.:- "
                "(starting with a letter or digit)",
            )
    after = tuple(dict.fromkeys(msg.after or ()))
    if len(after) > MAX_AFTER:
        raise RequestError("INVALID_REQUEST", f"after: at most {MAX_AFTER} jobs, got {len(after)}")
    if msg.after_any and not after:
        raise RequestError("INVALID_REQUEST", "after_any needs after: the jobs to run after")
    return Waits(start if start is not None and start > now else None, tags, after)


def _parse_time(text: str) -> float:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        moment = None
    if moment is None or moment.tzinfo is None:
        raise RequestError(
            "INVALID_REQUEST",
            f"run_at: expected an RFC 3339 time with its offset, like 2026-12-01T12:00:00Z, "
            f"got {text[:40]!r}",
        )
    return moment.timestamp()


def check_webhook(url: str, allowed_hosts: list[str]) -> None:
    """A webhook URL jobwarden may POST to: http(s), on a host the config allows (the daemon
    must not become a way to reach hosts an application could not reach itself)."""
    if not allowed_hosts:
        raise RequestError(
            "INVALID_REQUEST",
            "webhook: webhooks are off on this daemon (its webhooks.allowed_hosts is empty)",
        )
    if len(url) > 2000:
        raise RequestError("INVALID_REQUEST", "webhook: a URL of at most 2000 characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        parts, port = None, None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise RequestError("INVALID_REQUEST", "webhook: expected an http:// or https:// URL")
    if parts.username is not None or parts.password is not None:
        raise RequestError("INVALID_REQUEST", "webhook: a URL without user or password")
    host = parts.hostname
    if host not in allowed_hosts and f"{host}:{port}" not in allowed_hosts:
        raise RequestError(
            "INVALID_REQUEST",
            f"webhook: host '{host}' is not in the config's webhooks.allowed_hosts",
        )


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
        self._schedules = Schedules(
            config=config, store=store, clock=clock, metrics=metrics, fire=self._fire_schedule
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with self._inbox, self._scheduler, trio.open_nursery() as nursery:
            nursery.start_soon(self._schedules.run)
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
                        case ScheduleAction():
                            nursery.start_soon(self._schedule_action, msg)
                        case StopAdmitting():
                            self._draining = True
                            self._schedules.stop()
                        case Reconfigure(config=config):
                            self._config = config
                            self._schedules.reconfigure(config)
                            self._calendar = BudgetCalendar(config.limits.day_zone(config.budget))
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

    def _refuse(self, msg: Submit, exc: RequestError) -> None:
        # Counted here by code; the listener that asked logs it, rate-limited (a client that
        # submits nothing but refusals must not flood the log).
        self._metrics.rejected.labels(exc.body.code).inc()
        msg.reply.fail(exc)

    def _check(self, msg: Submit) -> Checked | None:
        try:
            new = self._checked(msg, self._clock.now())
        except RequestError as exc:
            self._refuse(msg, exc)
            return None
        return Checked(msg, new)

    def _checked(self, msg: Submit, now: float) -> NewJob:
        """The job `msg` asks for, once the guards in memory let it through (the rest are
        the store's, inside the write)."""
        payload_json = check_submit(
            self._config,
            msg,
            draining=self._draining,
            budget=self._budget,
            now=now,
            total_memory=self._total_memory,
            store_fault=self._store.health.error(),
        )
        waits = check_waits(self._config, msg, now=now)
        kind = self._config.kinds[msg.kind]
        return NewJob(
            kind=msg.kind,
            user=msg.user,
            payload_json=payload_json,
            priority=kind.priority if msg.priority is None else msg.priority,
            idempotency_key=msg.idempotency_key,
            max_attempts=self._config.retry_policy(msg.kind).max_attempts,
            submission_id=msg.submission_id,
            run_at=waits.run_at,
            tags=waits.tags,
            after=waits.after,
            after_any=msg.after_any,
            webhook=msg.webhook,
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
            rate=limits.rate,
            burst=limits.burst,
            bucket=TokenBucket,
            shed_rate_factor=limits.shed_rate_factor,
            shed_for=SHED_FOR,
        )

    def _refused(self, refused: Refused, now: float) -> RequestError:
        retry_after = refused.retry_after
        if refused.code == "DAILY_LIMIT":
            retry_after = round(self._calendar.next_day(now) - now, 3)
        return RequestError(refused.code, refused.message, retry_after=retry_after)

    async def _insert(self, accepted: list[Checked]) -> None:
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
                case Admitted(job=job):
                    msg.reply.set((job, False))
                    queued_kinds.add(job.kind)
                case Refused():
                    self._refuse(msg, self._refused(result, now))
                case StoreError():
                    self._refuse(msg, result.refusal())
                case _:
                    log.error("submit failed in the store", error=str(result), kind=msg.kind)
                    msg.reply.fail(RequestError("INTERNAL", "the job could not be stored"))
        for kind in sorted(queued_kinds):
            await self._scheduler.send(JobQueued(kind=kind))

    async def _fire_schedule(self, name: str, slot: float | None) -> Admitted | Refused | None:
        """Fire one slot of a schedule (None: a trigger): the guards in memory, then the
        store's `schedules.fire`, which inserts the job and the slot's row in one transaction.
        A guard's refusal is recorded there as the slot's reason to make no job."""
        schedule = self._config.schedules.get(name)
        if schedule is None:
            # Removed by a reload while its round was under way.
            return None
        now = self._clock.now()
        submission = Submit(
            kind=schedule.kind,
            payload=schedule.payload,
            user=schedule.user,
            priority=schedule.priority,
            reply=ReplySlot(),
        )
        new: NewJob | Refused
        try:
            payload_json = check_submit(
                self._config,
                submission,
                draining=self._draining,
                budget=self._budget,
                now=now,
                total_memory=self._total_memory,
            )
        except RequestError as exc:
            new = Refused(exc.body.code, exc.body.message, exc.body.retry_after)
        else:
            new = NewJob(
                kind=schedule.kind,
                user=schedule.user,
                payload_json=payload_json,
                priority=self._config.kinds[schedule.kind].priority
                if schedule.priority is None
                else schedule.priority,
                idempotency_key=None,
                max_attempts=self._config.retry_policy(schedule.kind).max_attempts,
                schedule=name,
            )
        # The operator's schedule, not a user's request: no rate bucket (its cron is its rate)
        # and not the [limits] defaults for what users submit; the user's own daily limit and
        # credits and the queue's depth apply.
        quota = msgspec.structs.replace(
            self._quota(now),
            daily_jobs=0,
            default_credits=None,
            create_users=True,
            shed_depth=0,
            bucket=None,
        )
        result = await self._store.write(
            partial(
                schedules.fire,
                schedule=name,
                slot=slot,
                new=new,
                skip_if_active=schedule.overlap == "skip",
                quota=quota,
                now=now,
            )
        )
        if isinstance(result, Admitted):
            await self._scheduler.send(JobQueued(kind=schedule.kind))
        return result

    async def _schedule_action(self, msg: ScheduleAction) -> None:
        try:
            match msg.action:
                case "list":
                    msg.reply.set(await self._schedules.overview())
                case "trigger":
                    msg.reply.set(await self._schedules.trigger(str(msg.name)))
                case "pause" | "resume":
                    paused = msg.action == "pause"
                    msg.reply.set(await self._schedules.pause(str(msg.name), paused=paused))
        except Exception as exc:
            msg.reply.fail(exc)

    async def _insert_all_or_none(self, batch: SubmitMany) -> None:
        """An atomic batch: every item passes the guards (in memory, then in the store, in
        one write) or none is submitted, and the batch fails with the first refusal, named by
        its item's index. The rate tokens the items took in the store go back with the
        write's rollback."""
        now = self._clock.now()
        try:
            news = []
            for index, item in enumerate(batch.items):
                try:
                    news.append(self._checked(item, now))
                except RequestError as exc:
                    raise _item_error(index, exc.body) from None
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
    """A submission that passed the guards in memory."""

    msg: Submit
    new: NewJob


def _item_error(index: int, body: ErrorBody) -> RequestError:
    """An item's refusal as its whole batch's: the same code, the item named."""
    return RequestError(
        body.code,
        f"item {index}: {body.message}",
        retryable=body.retryable,
        retry_after=body.retry_after,
    )
