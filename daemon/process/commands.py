"""The command layer: what a request means, written once for every listener.

The admin socket, the WebSocket and the HTTP listener keep their framing, authentication and
limits; everything else they ask of this module, so a fix lands in every door at once:

- `decode` a request with the one typed decoder of its listener's wire, or say what is wrong
  with it (the path of a wrong argument, the known commands for an unknown one);
- `Commands`: submit, jobs, show, cancel, watch and wait for a `Caller`, who is the operator
  (every job) or one user (their own jobs only: anyone else's is as absent as one that never
  was), the health snapshot, and the operator's commands (retry, hold and release of a job or
  a user's jobs, pause, resume, stuck, breakers, ledger, budget, users, operator tokens,
  recurring schedules), whichever listener they come by;
- `answer`: decode a request and respond to it, never raising: what fails is its error;
- `error_reply`: an exception as the error a client is sent;
- `Refusals`: every refusal counted in metrics, and logged without letting a client flood
  the log;
- `Sessions`: the sessions each user has open, ended when their token is replaced or they
  are disabled;
- `ConnectionCap`: how many clients a listener serves at once.

A watch sends the stored events after a seq, then live ones from the hub, in seq order and
each once. The subscription is taken before the store is read, so an event committed in
between is in both and is sent once; a live event at or below the last seq sent is such a twin.
"""

from __future__ import annotations

import contextlib
import re
import traceback
import weakref
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Generic, Literal, NamedTuple, Protocol, TypeVar

import msgspec
import structlog
import trio

from jobwarden.actors.budget import BudgetCalendar
from jobwarden.actors.joblogs import JobLogs
from jobwarden.actors.messages import (
    BreakerReset,
    BreakerSnapshot,
    BreakerTrip,
    BudgetQuery,
    CancelJob,
    Explain,
    HealthQuery,
    LedgerReport,
    Pause,
    QueueChanged,
    Requeue,
    RequeueMatching,
    Resume,
    ResumeBudget,
    RunRules,
    ScheduleAction,
    SetBudget,
    Submit,
    SubmitMany,
)
from jobwarden.clock import WallClock
from jobwarden.config import Config, name_path, parse_rate
from jobwarden.errors import RequestError, StoreError, error_body
from jobwarden.hub import EventHub, Subscription
from jobwarden.logs import clip
from jobwarden.mailbox import ReplySlot, ask
from jobwarden.metrics import Metrics
from jobwarden.store import joblogs, jobs, tokens, users, webhooks
from jobwarden.store.engine import Store
from jobwarden.store.ledger import job_spend
from jobwarden.store.webhooks import Delivery
from jobwarden.wire.admin import (
    COMMANDS,
    BreakerArgs,
    BudgetArgs,
    LedgerArgs,
    TokensArgs,
    UsersArgs,
    request_decoder,
)
from jobwarden.wire.views import (
    MAX_DEPTH,
    TERMINAL_STATUSES,
    BatchResult,
    BulkOutcome,
    ErrorBody,
    Event,
    ItemResult,
    JobFilter,
    JobLog,
    JobStatus,
    JobView,
    LogLine,
    RequestId,
    nesting_depth_exceeds,
)
from jobwarden.wire.websocket import WS_OPS, ws_op_decoder

log = structlog.get_logger("commands")

T = TypeVar("T")
R = TypeVar("R")

# Events a `show` carries, newest last.
SHOW_EVENTS = 20
# Stored events read per query while a watch catches up.
PAGE = 1000
# Jobs one `jobs` may list: an operator's scripts page through more than a user's screen.
MAX_LISTED_BY_OPERATOR = 10_000
MAX_LISTED_BY_USER = 1000
# Ids a bulk action's answer lists, unless asked for another number.
BULK_SHOWN = 20
# Statuses each bulk action applies to.
CANCELABLE = ("queued", "running")
RETRYABLE = ("failed", "canceled")
# Log lines one read (and one `logs` answer) carries at most.
LOG_PAGE = 1000
# Events of a followed job buffered between reads of its log: only a wake-up.
LOG_WAKEUPS = 16
# Refusals logged one by one per listener and minute (each connection's first); the rest
# are summed up in one line a minute.
REFUSAL_LINES_PER_MINUTE = 20
# The `users` actions that end the user's open sessions, and the reason their clients are told.
ENDS_SESSIONS = {"token": "token revoked", "disable": "user disabled"}


# -- decoding ---------------------------------------------------------------------------------


class BadRequest(NamedTuple):
    """A request that did not decode: its id when that could be read, and what is wrong."""

    request_id: RequestId
    error: ErrorBody


@dataclass(frozen=True)
class Grammar(Generic[T]):
    """One listener's requests: the decoder, and the words to say what is wrong with one."""

    decoder: msgspec.json.Decoder[T]
    # The field that names the request, what the listener calls it, and the names it knows.
    tag_field: str
    noun: str
    known: tuple[str, ...]
    # Said of a request that is JSON but no object.
    not_an_object: str
    # The field that holds a request's arguments, if they are not beside the tag.
    args_field: str | None = None
    # Said of a request in bytes, when the listener takes text only (a binary frame).
    not_text: str | None = None


ADMIN = Grammar(
    decoder=request_decoder,
    tag_field="cmd",
    noun="command",
    known=COMMANDS,
    not_an_object='a request is a JSON object, like {"id": 1, "cmd": "ping"}',
    args_field="args",
)
WEBSOCKET = Grammar(
    decoder=ws_op_decoder,
    tag_field="op",
    noun="op",
    known=WS_OPS,
    not_an_object='a frame is a JSON object, like {"op": "jobs"}',
    not_text="binary frames are not accepted: send JSON text frames",
)


def decode(grammar: Grammar[T], data: bytes | str) -> T | BadRequest:
    """The typed request in `data`, or what is wrong with it."""
    if grammar.not_text is not None and isinstance(data, bytes):
        return BadRequest(None, error_body("INVALID_REQUEST", grammar.not_text))
    if nesting_depth_exceeds(data):
        message = f"arrays and objects nest deeper than {MAX_DEPTH} levels"
        return BadRequest(None, error_body("INVALID_REQUEST", message))
    try:
        return grammar.decoder.decode(data)
    except msgspec.ValidationError as exc:
        invalid = exc
    except msgspec.DecodeError as exc:
        return _not_json(exc)
    # The JSON reads but is not a request: look at it as it is to say why.
    try:
        raw = msgspec.json.decode(data)
    except msgspec.ValidationError:
        # Not even as plain JSON: a number out of any range.
        message = f"not a valid request: {name_path(str(invalid), '')}"
        return BadRequest(None, error_body("INVALID_REQUEST", message))
    except msgspec.DecodeError as exc:
        # Malformed past the point where the typed decoder found the request wrong, such as
        # invalid UTF-8 in a string after an unknown field.
        return _not_json(exc)
    return _explain(grammar, raw, invalid)


def _not_json(exc: msgspec.DecodeError) -> BadRequest:
    return BadRequest(None, error_body("INVALID_REQUEST", f"not valid JSON: {exc}"))


def _explain(grammar: Grammar[Any], raw: Any, exc: msgspec.ValidationError) -> BadRequest:
    if not isinstance(raw, dict):
        return BadRequest(None, error_body("INVALID_REQUEST", grammar.not_an_object))
    request_id = _request_id(raw.get("id"))
    tag = raw.get(grammar.tag_field)
    if tag not in grammar.known:
        named = grammar.tag_field in raw
        what = f"unknown {grammar.noun} {tag!r}" if named else f"no {grammar.noun}"
        message = f"{what} (known: {', '.join(grammar.known)})"
    elif grammar.args_field is None:
        message = f"{tag}: {name_path(str(exc), '')}"
    else:
        message = _explain_args(grammar, grammar.args_field, raw, tag, exc)
    return BadRequest(request_id, error_body("INVALID_REQUEST", message))


def _request_id(raw: Any) -> RequestId:
    """The id to answer a request that did not decode with: its own, if it is a valid one."""
    try:
        request_id: RequestId = msgspec.convert(raw, RequestId)  # type: ignore[arg-type]
    except msgspec.ValidationError:
        return None
    return request_id


def _explain_args(
    grammar: Grammar[Any], field: str, raw: dict[str, Any], tag: str, exc: msgspec.ValidationError
) -> str:
    """A wrong argument is named by its path within the arguments, after the command."""
    if field not in raw:
        # Arguments left out are no arguments given: name the first one the command needs.
        raw = {**raw, field: {}}
        try:
            msgspec.convert(raw, grammar.decoder.type)
        except msgspec.ValidationError as without:
            exc = without
    message = str(exc)
    head, within, path = message.rpartition(f" - at `$.{field}")
    if within and isinstance(raw.get(field), dict) and path[:1] in ("`", "."):
        return f"{tag}: {name_path(f'{head} - at `${path}', '')}"
    return f"not a valid request: {name_path(message, '')}"


# -- who asks ---------------------------------------------------------------------------------


class Caller(msgspec.Struct, frozen=True):
    """Who asks: the operator (no user), who sees and acts on every job, or one user, who
    sees and acts on their own jobs only."""

    user: str | None = None

    def whose_jobs(self, asked: str | None) -> str | None:
        """Whose jobs a question about `asked`'s (None: everyone's) may see: a user's are
        always their own, so the breaker's events (no user) and other users' never reach them."""
        return asked if self.user is None else self.user

    def sees(self, job: JobView) -> bool:
        return self.user is None or job.user == self.user

    @property
    def max_listed(self) -> int:
        return MAX_LISTED_BY_OPERATOR if self.user is None else MAX_LISTED_BY_USER


OPERATOR = Caller()


# -- commands ---------------------------------------------------------------------------------


class NewJob(Protocol):
    """A submission as every listener's wire has it."""

    kind: str
    payload: Any
    priority: int | None
    idempotency_key: str | None
    submission_id: str | None
    run_at: str | None
    delay: str | None
    tags: list[str] | None
    after: list[int] | None
    after_any: bool
    webhook: str | None


def _admission_submit(user: str, new: NewJob) -> Submit:
    """The message that asks admission for `new` as `user`'s job, its reply still open."""
    return Submit(
        kind=new.kind,
        payload=new.payload,
        user=user,
        reply=ReplySlot(),
        priority=new.priority,
        idempotency_key=new.idempotency_key,
        submission_id=new.submission_id,
        run_at=new.run_at,
        delay=new.delay,
        tags=new.tags,
        after=new.after,
        after_any=new.after_any,
        webhook=new.webhook,
    )


class Shown(NamedTuple):
    job: JobView
    events: list[Event]
    # Where the job stands in the queue and why it waits, while it is queued.
    waiting: Any


class WatchStart(NamedTuple):
    # The watched job as it is now (None: a watch of all jobs).
    job: JobView | None
    # Events after this seq follow.
    since: int
    # The seq of the job's newest event when `job` was read, from the same snapshot: a final
    # status before it was followed by a retry, unless the job is still final.
    newest: int | None


class Commands:
    """Every command a listener passes on: a user's (submit, jobs, show, cancel, watch, wait)
    and the operator's."""

    def __init__(
        self,
        *,
        config: Config,
        clock: WallClock,
        store: Store,
        hub: EventHub,
        job_logs: JobLogs,
        admission: trio.MemorySendChannel[Any],
        scheduler: trio.MemorySendChannel[Any],
        pool: trio.MemorySendChannel[Any],
        monitor: trio.MemorySendChannel[Any],
        breaker: trio.MemorySendChannel[Any],
        ledger: trio.MemorySendChannel[Any],
    ) -> None:
        self._config = config
        self._clock = clock
        self._store = store
        self._hub = hub
        self._job_logs = job_logs
        self._admission = admission
        self._scheduler = scheduler
        self._pool = pool
        self._monitor = monitor
        self._breaker = breaker
        self._ledger = ledger
        self.sessions = Sessions()

    def reconfigure(self, config: Config) -> None:
        """Kinds, limits and the budget's day may change on reload."""
        self._config = config

    async def submit(self, user: str, new: NewJob) -> tuple[JobView, bool]:
        """Admit a job for `user` (whom the listener names: the token's user, or whomever
        the operator says); the job, and whether it existed already under its key."""
        submit = _admission_submit(user, new)
        await self._admission.send(submit)
        return await submit.reply.wait()

    async def submit_many(
        self, user: str, items: Sequence[NewJob], *, atomic: bool = False
    ) -> BatchResult:
        """Admit a batch of jobs for `user` in one store write, so it commits at once: each
        item's result in the items' order (its job, or its refusal); `atomic`: all items are
        accepted, or the batch is refused with the first refusal, which names its item."""
        submits = [_admission_submit(user, item) for item in items]
        await ask(self._admission, SubmitMany, items=submits, atomic=atomic)
        results = []
        for submit in submits:
            try:
                job, existing = await submit.reply.wait()
            except RequestError as exc:
                results.append(ItemResult(error=exc.body))
            else:
                results.append(ItemResult(job=job, existing=existing))
        return BatchResult.of(results)

    async def cancel_many(
        self, caller: Caller, job_filter: JobFilter, *, dry_run: bool, show: int = BULK_SHOWN
    ) -> BulkOutcome:
        """Cancel every queued or running job of the caller's that `job_filter` matches (or,
        `dry_run`, say how many and which). Queued ones go a bounded batch per store write;
        running ones are stopped by the pool, all at once."""
        job_filter, statuses = _bulk_scope(caller, job_filter, CANCELABLE, "cancel", show)
        if dry_run:
            return await self._dry_run("cancel", job_filter, statuses, show)
        outcome = BulkOutcome(action="cancel", dry_run=False, matched=0)
        if "queued" in statuses:
            after_id, more = 0, True
            while more:
                batch = await self._store.write(
                    partial(
                        jobs.cancel_matching,
                        job_filter=job_filter,
                        now=self._clock.now(),
                        after_id=after_id,
                        limit=jobs.BULK_BATCH,
                    )
                )
                after_id, more = batch.last_id, batch.more
                _count_changed(outcome, [job.id for job in batch.changed], show)
        if "running" in statuses:
            running = await self._store.read(
                partial(
                    jobs.matching_ids,
                    job_filter=job_filter,
                    statuses=["running"],
                    now=self._clock.now(),
                )
            )
            stopped: list[int] = []

            async def stop(job_id: int) -> None:
                try:
                    await ask(self._pool, CancelJob, job_id=job_id)
                except RequestError as exc:
                    outcome.refused[exc.body.code] = outcome.refused.get(exc.body.code, 0) + 1
                else:
                    stopped.append(job_id)

            async with trio.open_nursery() as nursery:
                for job_id in running:
                    nursery.start_soon(stop, job_id)
            _count_changed(outcome, sorted(stopped), show)
        outcome.matched = outcome.changed + sum(outcome.refused.values())
        return outcome

    async def retry_many(
        self, job_filter: JobFilter, *, dry_run: bool, show: int = BULK_SHOWN
    ) -> BulkOutcome:
        """Queue again every failed or canceled job `job_filter` matches (or, `dry_run`, say
        how many and which): the operator's, a bounded batch per store write."""
        job_filter, statuses = _bulk_scope(OPERATOR, job_filter, RETRYABLE, "retry", show)
        if dry_run:
            return await self._dry_run("retry", job_filter, statuses, show)
        outcome: BulkOutcome = await ask(
            self._admission, RequeueMatching, job_filter=job_filter, show=show
        )
        return outcome

    async def _dry_run(
        self,
        action: Literal["cancel", "retry"],
        job_filter: JobFilter,
        statuses: list[str],
        show: int,
    ) -> BulkOutcome:
        matched = await self._store.read(
            partial(
                jobs.count_matching,
                job_filter=job_filter,
                statuses=statuses,
                now=self._clock.now(),
                first=show,
            )
        )
        return BulkOutcome(action=action, dry_run=True, matched=matched.count, ids=matched.first)

    async def jobs(
        self,
        caller: Caller,
        *,
        status: list[JobStatus] | None = None,
        kind: str | None = None,
        user: str | None = None,
        tag: str | None = None,
        limit: int,
        before: int | None = None,
    ) -> list[JobView]:
        """The caller's jobs (the operator's: every user's, or `user`'s), newest first; with
        `tag`, only those tagged so; `before`: only those older than that job id."""
        if not 0 < limit <= caller.max_listed:
            raise RequestError(
                "INVALID_REQUEST", f"jobs: limit must be within 1..{caller.max_listed}"
            )
        return await self._store.read(
            partial(
                jobs.list_jobs,
                statuses=list(status) if status else None,
                kind=kind,
                user=caller.whose_jobs(user),
                limit=limit,
                tag=tag,
                before=before,
            )
        )

    async def waiting(self, listed: list[JobView]) -> dict[int, Any]:
        """Where each queued job in `listed` stands and why it waits, from the scheduler."""
        queued = [job for job in listed if job.status == "queued"]
        if not queued:
            return {}
        return await ask(self._scheduler, Explain, jobs=queued)

    async def show(self, caller: Caller, job_id: int) -> Shown:
        """One job with its latest events and, while it is queued, why it waits."""
        job, events = await self._store.read(
            partial(jobs.job_with_events, job_id=job_id, limit=SHOW_EVENTS)
        )
        return Shown(_seen_by(caller, job, job_id), events, (await self.waiting([job])).get(job.id))

    async def cancel(self, caller: Caller, job_id: int) -> JobView:
        await self._job(caller, job_id)
        job: JobView = await ask(self._pool, CancelJob, job_id=job_id)
        # A queued job's end frees no slot, yet jobs that run after it may start now.
        await self._scheduler.send(QueueChanged())
        return job

    async def hold(self, job_id: int, *, held: bool) -> JobView:
        """The operator holds a queued job (it waits, `held by an operator`) or releases it."""
        job = await self._store.write(
            partial(jobs.set_held, job_id=job_id, held=held, now=self._clock.now())
        )
        if job is None:
            raise RequestError("NOT_FOUND", f"no job {job_id}")
        if job.status != "queued":
            verb = "held" if held else "released"
            raise RequestError(
                "INVALID_REQUEST",
                f"job {job_id} is {job.status}; only a queued job is {verb}",
            )
        # Either changes what runs next, and why the others wait.
        await self._scheduler.send(QueueChanged())
        return job

    async def hold_user(self, name: str, *, held: bool) -> users.UserView:
        """The operator holds a user's queued jobs (they wait, `user NAME on hold`; new ones
        are accepted and wait too) or releases them."""
        user = await self._store.write(partial(users.hold, name=name, held=held))
        if user is None:
            raise RequestError("NOT_FOUND", f"no user '{name}'")
        log.info("user held" if held else "user released", user=name)
        await self._scheduler.send(QueueChanged())
        return user

    async def start_watch(
        self, caller: Caller, *, job: int | None, since: int | None
    ) -> WatchStart:
        """The job a watch follows (None: all the caller's) as it is now, with its newest
        event's seq, and the seq its events start after: `since`, or, when omitted, a job's
        whole history, or, for a watch of all jobs, now."""
        if since is not None and since < 0:
            raise RequestError("INVALID_REQUEST", "watch: since must be 0 or more")
        watched, newest = None, None
        if job is not None:
            found, events = await self._store.read(
                partial(jobs.job_with_events, job_id=job, limit=1)
            )
            watched = _seen_by(caller, found, job)
            newest = events[-1].seq if events else None
        if since is None:
            since = 0 if job is not None else await self._store.read(jobs.last_seq)
        return WatchStart(watched, since, newest)

    async def follow(
        self,
        caller: Caller,
        send: Callable[[Event], Awaitable[None]],
        *,
        since: int,
        job: int | None = None,
        user: str | None = None,
        buffer: int = 256,
    ) -> int | None:
        """Send every event after `since` of `job` (None: every job) that the caller may see
        (the operator: `user`'s, or everyone's), until the watcher falls behind the hub's
        buffer of `buffer` events: then return the last seq sent, from which the listener
        catches up again or tells its client to. None: the hub ended the stream otherwise."""
        user = caller.whose_jobs(user)
        last = since
        with self._hub.subscribe(job=job, user=user, buffer=buffer) as sub:
            while True:
                backlog = await self._store.read(
                    partial(jobs.events_since, since=last, job=job, user=user, limit=PAGE)
                )
                for event in backlog:
                    await send(event)
                    last = event.seq
                if len(backlog) < PAGE:
                    break
            async for event in sub.events:
                if event.seq <= last:
                    continue
                await send(event)
                last = event.seq
            return last if sub.overflowed else None

    async def schedules(self) -> list[dict[str, Any]]:
        """Every recurring schedule with its state, next slot and latest run (the operator's)."""
        listed: list[dict[str, Any]] = await ask(self._admission, ScheduleAction, action="list")
        return listed

    async def schedule_action(self, action: str, name: str | None) -> dict[str, Any]:
        """Pause, resume or trigger one schedule (the operator's): the schedule as it is
        then, or for a trigger the job it made."""
        if not name:
            raise RequestError("INVALID_REQUEST", f"schedules {action}: name a schedule")
        answer = await ask(self._admission, ScheduleAction, action=action, name=name)
        if action == "trigger":
            return {"job": answer}
        return {"schedule": answer}

    async def logs(
        self, caller: Caller, job_id: int, *, after: int = 0, limit: int = LOG_PAGE
    ) -> JobLog:
        """A page of the job's log: its lines after line id `after`, oldest first, and how
        many older lines were dropped to keep it within its size."""
        if not 0 < limit <= LOG_PAGE:
            raise RequestError("INVALID_REQUEST", f"logs: limit must be within 1..{LOG_PAGE}")
        await self._job(caller, job_id)
        page = await self._store.read(
            partial(joblogs.read, job_id=job_id, after=after, limit=limit)
        )
        if page is None:
            raise RequestError("NOT_FOUND", f"no job {job_id}")
        return page

    async def follow_logs(
        self,
        caller: Caller,
        send: Callable[[LogLine], Awaitable[None]],
        job_id: int,
        *,
        after: int = 0,
    ) -> JobView:
        """Send the job's lines after `after`, then each new one as it is written, until
        the job is final and every line of it is sent; returns the job as it ended. The job
        is read before its lines: its outcome is written after its last lines, so a job
        found final has all its lines in the read that follows."""
        while True:
            # Status events wake the follower at the job's end; flushes, for new lines.
            with self._hub.subscribe(job=job_id, buffer=LOG_WAKEUPS) as sub:
                while not sub.overflowed:
                    flushes = self._job_logs.flushes
                    job = await self._job(caller, job_id)
                    while True:
                        page = await self.logs(caller, job_id, after=after)
                        for line in page.lines:
                            await send(line)
                            after = line.id
                        if len(page.lines) < LOG_PAGE:
                            break
                    if job.status in TERMINAL_STATUSES:
                        return job
                    await self._lines_or_event(sub, flushes)

    async def _lines_or_event(self, sub: Subscription, flushes: int) -> None:
        """Wait for a flush of log lines after the `flushes`-th, or an event of the job."""
        async with trio.open_nursery() as nursery:

            async def event() -> None:
                with contextlib.suppress(trio.EndOfChannel, trio.WouldBlock):
                    await sub.events.receive()
                    # The events themselves are not needed: the store is read again.
                    while True:
                        sub.events.receive_nowait()
                nursery.cancel_scope.cancel()

            async def flushed() -> None:
                await self._job_logs.wait_flushed(flushes)
                nursery.cancel_scope.cancel()

            nursery.start_soon(event)
            nursery.start_soon(flushed)

    async def webhook_deliveries(
        self, caller: Caller, *, job_id: int | None, pending: bool, limit: int
    ) -> list[Delivery]:
        """Webhook deliveries, newest first: one job's (the caller's), or all the operator's."""
        if not 0 < limit <= caller.max_listed:
            raise RequestError(
                "INVALID_REQUEST", f"webhooks: limit must be within 1..{caller.max_listed}"
            )
        if job_id is not None:
            await self._job(caller, job_id)
        elif caller.user is not None:
            raise RequestError("INVALID_REQUEST", "webhooks: name the job")
        return await self._store.read(
            partial(webhooks.list_deliveries, job_id=job_id, pending=pending, limit=limit)
        )

    async def health(self, *, by_kind: bool = False) -> dict[str, Any]:
        """The monitor's snapshot; `by_kind` adds the job counts by status and kind."""
        health: dict[str, Any] = await ask(self._monitor, HealthQuery, by_kind=by_kind)
        return health

    async def overview(self) -> dict[str, Any]:
        """The health snapshot with what the dashboard's overview adds: the configured kinds,
        the jobs by status and kind (as [status, kind, count] rows), the jobs finished in each
        span of the last hour, and the alerts of the last hour."""
        overview: dict[str, Any] = await ask(
            self._monitor, HealthQuery, by_kind=True, last_hour=True
        )
        overview["by_status_kind"] = [
            [status, kind, n] for (status, kind), n in sorted(overview["by_status_kind"].items())
        ]
        return overview

    async def job_cost(self, caller: Caller, job_id: int) -> float:
        """What the job's external calls have cost so far, in USD."""
        await self._job(caller, job_id)
        return await self._store.read(partial(job_spend, job_id=job_id))

    async def wait_final(self, caller: Caller, job_id: int, *, timeout: float) -> JobView:
        """The job once it is final (done, failed, canceled), or as it is after `timeout`
        seconds of trio's clock if it is not final by then."""
        deadline = trio.current_time() + timeout
        while True:
            # Subscribed before the job is read: a final status committed meanwhile is seen.
            with self._hub.subscribe(job=job_id, buffer=16) as sub:
                job = await self._job(caller, job_id)
                if job.status in TERMINAL_STATUSES or trio.current_time() >= deadline:
                    return job
                with trio.move_on_at(deadline):
                    async for event in sub.events:
                        if event.type == "status" and event.data["status"] in TERMINAL_STATUSES:
                            break
            # A final status, the deadline, or a buffer the hub found full: read the job again.

    # -- the operator's commands ----------------------------------------------------------------

    async def retry(self, job_id: int) -> JobView:
        """Queue a finished job again."""
        job: JobView = await ask(self._admission, Requeue, job_id=job_id)
        return job

    async def pause(self, kind: str | None) -> Any:
        """Hold a kind's queued jobs (None: every kind's)."""
        return await ask(self._scheduler, Pause, kind=self._known_kind(kind))

    async def resume(self, kind: str | None) -> Any:
        """Dispatch a paused kind (None: every kind) again."""
        return await ask(self._scheduler, Resume, kind=self._known_kind(kind))

    def _known_kind(self, kind: str | None) -> str | None:
        if kind is not None and kind not in self._config.kinds:
            known = ", ".join(sorted(self._config.kinds))
            raise RequestError("INVALID_REQUEST", f"unknown kind '{kind}' (known: {known})")
        return kind

    async def stuck(self, *, dry_run: bool) -> dict[str, Any]:
        """Run the monitor's rules now, or (dry_run) only say what they would do."""
        findings = await ask(self._monitor, RunRules, dry_run=dry_run)
        return {"dry_run": dry_run, "findings": findings}

    async def breakers(self) -> Any:
        return await ask(self._breaker, BreakerSnapshot)

    async def breaker(self, args: BreakerArgs) -> dict[str, Any]:
        """Reset or trip one service's circuit."""
        message = BreakerReset if args.action == "reset" else BreakerTrip
        return {args.service: await ask(self._breaker, message, service=args.service)}

    async def ledger(self, args: LedgerArgs) -> Any:
        """Spending of a day or a month (neither: today), grouped."""
        if args.day is not None and args.month is not None:
            raise RequestError("INVALID_REQUEST", "ledger: give a day or a month, not both")
        if args.day is not None and not re.fullmatch(r"\d{4}-\d{2}-\d{2}", args.day):
            raise RequestError(
                "INVALID_REQUEST", f"ledger: day must be YYYY-MM-DD, got {args.day!r}"
            )
        if args.month is not None and not re.fullmatch(r"\d{4}-\d{2}", args.month):
            raise RequestError(
                "INVALID_REQUEST", f"ledger: month must be YYYY-MM, got {args.month!r}"
            )
        period = args.day or args.month
        if period is None:
            period = (await ask(self._ledger, BudgetQuery))["day"]
        return await ask(self._ledger, LedgerReport, period=period, by=args.by)

    async def budget(self, args: BudgetArgs) -> Any:
        """Show, set or resume the budget."""
        if args.action == "set":
            if args.daily_usd is None and args.monthly_usd is None:
                raise RequestError("INVALID_REQUEST", "budget set: give daily_usd or monthly_usd")
            return await ask(
                self._ledger, SetBudget, daily_usd=args.daily_usd, monthly_usd=args.monthly_usd
            )
        if args.action == "resume":
            return await ask(self._ledger, ResumeBudget)
        return await ask(self._ledger, BudgetQuery)

    async def users(self, args: UsersArgs) -> dict[str, Any]:
        """List, show, add or change users: `{"users": [...]}`, or `{"user", "token"?}` (a
        new token is shown this once)."""
        if args.action == "list":
            return {
                "users": [self._with_today(user) for user in await self._store.read(users.list_all)]
            }
        name = args.name
        if name is None or not 0 < len(name) <= 64 or not name.isprintable():
            raise RequestError(
                "INVALID_REQUEST", "users: name must be 1 to 64 printable characters"
            )
        if args.rate is not None:
            try:
                parse_rate(args.rate)
            except ValueError as exc:
                raise RequestError("INVALID_REQUEST", f"users: rate: {exc}") from None
        limits = users.UserLimits(
            daily_limit=args.daily_limit, rate=args.rate, max_running=args.max_running
        )
        token = None
        match args.action:
            case "show":
                user = await self._store.read(partial(users.get, name=name))
            case "add":
                token = users.new_token()
                credits = self._config.limits.credits if args.credits is None else args.credits
                user = await self._store.write(
                    partial(
                        users.create,
                        name=name,
                        credits=None if credits == "unlimited" else credits,
                        limits=limits,
                        token_hash=users.hash_token(token),
                        now=self._clock.now(),
                    )
                )
                if user is None:
                    raise RequestError("INVALID_REQUEST", f"users: '{name}' exists already")
            case "token":
                token = users.new_token()
                user = await self._update_user(name, token_hash=users.hash_token(token))
            case "credits":
                if args.change is None:
                    raise RequestError(
                        "INVALID_REQUEST", "users credits: give the change, +N or -N"
                    )
                user = await self._update_user(name, credits_delta=args.change)
            case "set":
                user = await self._update_user(
                    name,
                    credits=args.credits if isinstance(args.credits, int) else None,
                    unlimited=args.credits == "unlimited",
                    limits=limits,
                )
            case "disable" | "enable":
                user = await self._update_user(name, disabled=args.action == "disable")
            case "hold" | "release":
                user = await self.hold_user(name, held=args.action == "hold")
        if user is None:
            raise RequestError("NOT_FOUND", f"no user '{name}'")
        if args.action in ENDS_SESSIONS:
            # What the old token opened ends with it, as a disabled user's sessions do.
            self.sessions.revoke(name, ENDS_SESSIONS[args.action])
        reply: dict[str, Any] = {"user": self._with_today(user)}
        if token is not None:
            reply["token"] = token
        return reply

    async def _update_user(self, name: str, **changes: Any) -> Any:
        return await self._store.write(partial(users.update, name=name, **changes))

    def _with_today(self, user: users.UserView) -> users.UserView:
        """The stored daily count belongs to the day it was counted on."""
        zone = self._config.limits.day_zone(self._config.budget)
        if user.day != BudgetCalendar(zone).day(self._clock.now()):
            return msgspec.structs.replace(user, jobs_today=0)
        return user

    async def tokens(self, args: TokensArgs) -> dict[str, Any]:
        """Operator tokens: `list`, `add` (the token is shown this once), `revoke`."""
        if args.action == "list":
            return {"tokens": await self._store.read(tokens.list_all)}
        name = args.name
        if name is None or not 0 < len(name) <= 64 or not name.isprintable():
            raise RequestError(
                "INVALID_REQUEST", "tokens: name must be 1 to 64 printable characters"
            )
        if args.action == "revoke":
            if not await self._store.write(partial(tokens.revoke, name=name)):
                raise RequestError("NOT_FOUND", f"no operator token '{name}'")
            return {"revoked": name}
        token = tokens.new_operator_token()
        added = await self._store.write(
            partial(
                tokens.add, name=name, token_hash=users.hash_token(token), now=self._clock.now()
            )
        )
        if added is None:
            raise RequestError("INVALID_REQUEST", f"tokens: '{name}' exists already")
        return {"token": added, "secret": token}

    async def _job(self, caller: Caller, job_id: int) -> JobView:
        return _seen_by(
            caller, await self._store.read(partial(jobs.get_job, job_id=job_id)), job_id
        )


# -- answering, errors and refusals ----------------------------------------------------------


async def answer(
    grammar: Grammar[T],
    data: bytes | str,
    respond: Callable[[T], Awaitable[R]],
    *,
    refusals: Refusals,
    connection: object,
) -> tuple[RequestId, R | ErrorBody]:
    """Decode one request and `respond` to it: the request's id (None when unreadable) and
    what `respond` returned, or the error the client is to be sent. Never raises (but to be
    canceled): one request's failure, whatever it is, is that request's error, counted and
    logged by `refusals`, and the connection and the daemon go on."""
    request_id: RequestId = None
    name: str | None = None
    try:
        match decode(grammar, data):
            case BadRequest(request_id, error):
                pass
            case request:
                request_id = request.id  # type: ignore[attr-defined]
                name = request.__struct_config__.tag  # type: ignore[attr-defined]
                return request_id, await respond(request)
    except Exception as exc:
        error = error_reply(exc, listener=refusals.listener)
    refusals.refused(error, connection=connection, request=name)
    return request_id, error


def error_reply(exc: Exception, *, listener: str) -> ErrorBody:
    """The error a client is sent for a request that raised `exc`: a refusal's own; a store
    that takes no writes, STORAGE_FULL, STORAGE_ERROR or STORAGE_UNAVAILABLE; anything else is
    the daemon's fault, INTERNAL, with an error_id that finds its one log line."""
    if isinstance(exc, RequestError):
        return exc.body
    if isinstance(exc, StoreError):
        return exc.refusal().body
    body = error_body(
        "INTERNAL", "the daemon could not process this request", technical_message=clip(exc)
    )
    log_failure("request failed", exc, listener=listener, error_id=body.error_id)
    return body


def log_failure(event: str, exc: BaseException, **fields: Any) -> None:
    """Log an unexpected exception with its traceback, but not the locals of its frames
    (tokens, payloads) nor more than the start of its message (it may quote a client)."""
    log.error(
        event,
        error=type(exc).__name__,
        message=clip(exc),
        traceback="".join(traceback.format_tb(exc.__traceback__)),
        **fields,
    )


class Refusals:
    """What one listener refuses, requests and connections alike. Each refusal is counted in
    `jobwarden_requests_refused{listener, code}`; the first on each connection is logged
    (up to REFUSAL_LINES_PER_MINUTE lines a minute), the others are summed up in one line
    every `interval` of trio's clock: a client sending nothing but bad requests adds lines to
    the log at a bounded rate. INTERNAL errors are counted here and logged by error_reply."""

    def __init__(self, listener: str, metrics: Metrics, *, interval: float = 60.0) -> None:
        self.listener = listener
        self._metrics = metrics
        self._interval = interval
        self._logged_on: weakref.WeakSet[object] = weakref.WeakSet()
        self._lines = 0
        self._unlogged: Counter[str] = Counter()

    def refused(
        self,
        error: ErrorBody,
        *,
        connection: object,
        event: str = "request refused",
        **fields: Any,
    ) -> None:
        """Count a refusal on `connection`, and log it as `event` with `fields` if it is the
        connection's first and the minute's lines are not used up. FORBIDDEN (someone tried
        what they may not) is a warning, the rest are info."""
        self._metrics.refused.labels(self.listener, error.code).inc()
        if error.code == "INTERNAL":
            return
        if connection in self._logged_on or self._lines >= REFUSAL_LINES_PER_MINUTE:
            self._unlogged[error.code] += 1
            return
        self._logged_on.add(connection)
        self._lines += 1
        emit = log.warning if error.code == "FORBIDDEN" else log.info
        emit(
            event,
            listener=self.listener,
            code=error.code,
            message=clip(error.message),
            error_id=error.error_id,
            **fields,
        )

    async def run(self) -> None:
        """Every `interval`, one line summing up the refusals not logged one by one."""
        while True:
            await trio.sleep(self._interval)
            if self._unlogged:
                log.info(
                    "requests refused",
                    listener=self.listener,
                    seconds=self._interval,
                    by_code=dict(self._unlogged),
                )
            self._unlogged.clear()
            self._lines = 0


# -- sessions and their tokens -----------------------------------------------------------------


class Session(Protocol):
    def end(self, code: int, reason: str) -> None:
        """Close the session, telling its client why."""


# The WebSocket close code of a session whose token no longer admits it (policy violation).
REVOKED = 1008


class Sessions:
    """The sessions each user has open with a token, so that replacing the token or disabling
    the user ends them. A session authenticates in two steps (read the token's user, then
    open), and a revocation may fall in between: `opening` marks the first step, and `open`
    ends at once a session whose user was revoked since its mark."""

    def __init__(self) -> None:
        self._open: dict[str, set[Session]] = {}
        self._revocations = 0
        self._revoked_at: dict[str, int] = {}

    def opening(self) -> int:
        """A mark to take before reading who a token belongs to."""
        return self._revocations

    @contextlib.contextmanager
    def open(self, user: str, session: Session, mark: int) -> Iterator[None]:
        """Hold `session` as open for `user` while the context lasts."""
        if self._revoked_at.get(user, -1) >= mark:
            session.end(REVOKED, "token revoked")
        sessions = self._open.setdefault(user, set())
        sessions.add(session)
        try:
            yield
        finally:
            sessions.discard(session)
            if not sessions and self._open.get(user) is sessions:
                del self._open[user]

    def revoke(self, user: str, reason: str) -> int:
        """End every session `user` has open, saying `reason`; how many there were."""
        self._revoked_at[user] = self._revocations
        self._revocations += 1
        ended = self._open.pop(user, set())
        for session in ended:
            session.end(REVOKED, reason)
        if ended:
            log.info("sessions ended", user=user, reason=reason, sessions=len(ended))
        return len(ended)


class ConnectionCap:
    """At most `limit` clients of one listener at once; `clients` names them in a refusal."""

    def __init__(self, limit: int, clients: str) -> None:
        self._limit = limit
        self._clients = clients
        self._taken = 0

    def admit(self) -> contextlib.AbstractContextManager[None]:
        """A slot for one client, held while the returned context is open (enter it at once);
        QUEUE_FULL, as a RequestError, when every slot is taken."""
        if self._taken >= self._limit:
            raise RequestError(
                "QUEUE_FULL", f"the daemon serves at most {self._limit} {self._clients}"
            )
        self._taken += 1
        return self._held()

    @contextlib.contextmanager
    def _held(self) -> Iterator[None]:
        try:
            yield
        finally:
            self._taken -= 1


def _bulk_scope(
    caller: Caller,
    job_filter: JobFilter,
    applies_to: tuple[str, ...],
    action: str,
    show: int,
) -> tuple[JobFilter, list[str]]:
    """The filter as the caller may use it (a user's: their own jobs only), and the
    statuses the action takes among those it names. A filter that names nothing would take
    every job: it is refused, as is one whose statuses the action never changes."""
    if job_filter.is_empty():
        raise RequestError(
            "INVALID_REQUEST",
            f"{action}: give at least one filter "
            "(status, kind, user, tag, code, since, older_than)",
        )
    if not 0 <= show <= MAX_LISTED_BY_OPERATOR:
        raise RequestError(
            "INVALID_REQUEST", f"{action}: show must be within 0..{MAX_LISTED_BY_OPERATOR}"
        )
    statuses = [s for s in applies_to if job_filter.status is None or s in job_filter.status]
    if not statuses:
        raise RequestError(
            "INVALID_REQUEST", f"{action} applies to {' or '.join(applies_to)} jobs only"
        )
    return msgspec.structs.replace(job_filter, user=caller.whose_jobs(job_filter.user)), statuses


def _count_changed(outcome: BulkOutcome, ids: list[int], show: int) -> None:
    outcome.changed += len(ids)
    outcome.ids += ids[: show - len(outcome.ids)]


def _seen_by(caller: Caller, job: JobView | None, job_id: int) -> JobView:
    # Someone else's job is as absent as one that never was: its id tells nothing.
    if job is None or not caller.sees(job):
        raise RequestError("NOT_FOUND", f"no job {job_id}")
    return job
