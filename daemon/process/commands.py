"""The command layer: what a request means, written once for every listener.

The admin socket, the WebSocket and the HTTP listener keep their framing, authentication and
limits; everything else they ask of this module, so a fix lands in every door at once:

- `decode` a request with the one typed decoder of its listener's wire, or say what is wrong
  with it (the path of a wrong argument, the known commands for an unknown one);
- `Commands`: submit, jobs, show, cancel and watch for a `Caller`, who is the operator (every
  job) or one user (their own jobs only: anyone else's is as absent as one that never was),
  and the health snapshot;
- `error_reply`: an exception as the error a client is sent;
- `ConnectionCap`: how many clients a listener serves at once.

A watch sends the stored events after a seq, then live ones from the hub, in seq order and
each once. The subscription is taken before the store is read, so an event committed in
between is in both and is sent once; a live event at or below the last seq sent is such a twin.
"""

from __future__ import annotations

import contextlib
import traceback
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any, Generic, NamedTuple, Protocol, TypeVar

import msgspec
import structlog
import trio

from jobwarden.actors.messages import CancelJob, Explain, HealthQuery, Submit
from jobwarden.config import name_path
from jobwarden.errors import RequestError, StoreError, error_body
from jobwarden.hub import EventHub
from jobwarden.mailbox import ask
from jobwarden.store import jobs
from jobwarden.store.engine import Store
from jobwarden.wire.admin import COMMANDS, request_decoder
from jobwarden.wire.views import ErrorBody, Event, JobStatus, JobView
from jobwarden.wire.websocket import WS_OPS, ws_op_decoder

log = structlog.get_logger("commands")

T = TypeVar("T")
RequestId = str | int | None

# Events a `show` carries, newest last.
SHOW_EVENTS = 20
# Stored events read per query while a watch catches up.
PAGE = 1000
# Jobs one `jobs` may list: an operator's scripts page through more than a user's screen.
MAX_LISTED_BY_OPERATOR = 10_000
MAX_LISTED_BY_USER = 1000
# Characters of an unexpected exception's message in its log line.
LOGGED_MESSAGE = 200


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
)


def decode(grammar: Grammar[T], data: bytes | str) -> T | BadRequest:
    """The typed request in `data`, or what is wrong with it."""
    try:
        return grammar.decoder.decode(data)
    except msgspec.ValidationError as exc:
        invalid = exc
    except msgspec.DecodeError as exc:
        return BadRequest(None, error_body("INVALID_REQUEST", f"not valid JSON: {exc}"))
    # The JSON reads but is not a request: look at it as it is to say why.
    try:
        raw = msgspec.json.decode(data)
    except msgspec.ValidationError:
        # Not even as plain JSON: a number out of any range.
        message = f"not a valid request: {name_path(str(invalid), '')}"
        return BadRequest(None, error_body("INVALID_REQUEST", message))
    return _explain(grammar, raw, invalid)


def _explain(grammar: Grammar[Any], raw: Any, exc: msgspec.ValidationError) -> BadRequest:
    if not isinstance(raw, dict):
        return BadRequest(None, error_body("INVALID_REQUEST", grammar.not_an_object))
    request_id = raw.get("id")
    if not isinstance(request_id, str | int) or isinstance(request_id, bool):
        request_id = None
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


class Shown(NamedTuple):
    job: JobView
    events: list[Event]
    # Where the job stands in the queue and why it waits, while it is queued.
    waiting: Any


class Commands:
    """Submit, jobs, show, cancel, watch and health, for any listener."""

    def __init__(
        self,
        *,
        store: Store,
        hub: EventHub,
        admission: trio.MemorySendChannel[Any],
        scheduler: trio.MemorySendChannel[Any],
        pool: trio.MemorySendChannel[Any],
        monitor: trio.MemorySendChannel[Any],
    ) -> None:
        self._store = store
        self._hub = hub
        self._admission = admission
        self._scheduler = scheduler
        self._pool = pool
        self._monitor = monitor

    async def submit(self, user: str, new: NewJob) -> tuple[JobView, bool]:
        """Admit a job for `user` (whom the listener names: the token's user, or whomever
        the operator says); the job, and whether it existed already under its key."""
        job, existing = await ask(
            self._admission,
            Submit,
            kind=new.kind,
            payload=new.payload,
            user=user,
            priority=new.priority,
            idempotency_key=new.idempotency_key,
            submission_id=new.submission_id,
        )
        return job, existing

    async def jobs(
        self,
        caller: Caller,
        *,
        status: list[JobStatus] | None = None,
        kind: str | None = None,
        user: str | None = None,
        limit: int,
    ) -> list[JobView]:
        """The caller's jobs (the operator's: every user's, or `user`'s), newest first."""
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
        if job is None or not caller.sees(job):
            raise RequestError("NOT_FOUND", f"no job {job_id}")
        return Shown(job, events, (await self.waiting([job])).get(job.id))

    async def cancel(self, caller: Caller, job_id: int) -> JobView:
        await self._job(caller, job_id)
        job: JobView = await ask(self._pool, CancelJob, job_id=job_id)
        return job

    async def start_watch(
        self, caller: Caller, *, job: int | None, since: int | None
    ) -> tuple[JobView | None, int]:
        """The job a watch follows (None: all the caller's) as it is now, and the seq its
        events start after: `since`, or, when omitted, a job's whole history, or, for a
        watch of all jobs, now."""
        if since is not None and since < 0:
            raise RequestError("INVALID_REQUEST", "watch: since must be 0 or more")
        watched = await self._job(caller, job) if job is not None else None
        if since is None:
            since = 0 if job is not None else await self._store.read(jobs.last_seq)
        return watched, since

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

    async def health(self, *, by_kind: bool = False) -> dict[str, Any]:
        """The monitor's snapshot; `by_kind` adds the job counts by status and kind."""
        health: dict[str, Any] = await ask(self._monitor, HealthQuery, by_kind=by_kind)
        return health

    async def _job(self, caller: Caller, job_id: int) -> JobView:
        job = await self._store.read(partial(jobs.get_job, job_id=job_id))
        # Someone else's job is as absent as one that never was: its id tells nothing.
        if job is None or not caller.sees(job):
            raise RequestError("NOT_FOUND", f"no job {job_id}")
        return job


# -- errors and limits ------------------------------------------------------------------------


def error_reply(exc: Exception, *, listener: str) -> ErrorBody:
    """The error a client is sent for a request that raised `exc`: a refusal's own; a store
    that takes no writes, STORAGE_FULL or STORAGE_ERROR; anything else is the daemon's fault,
    INTERNAL, with an error_id that finds its one log line."""
    if isinstance(exc, RequestError):
        return exc.body
    if isinstance(exc, StoreError):
        return exc.refusal().body
    body = error_body(
        "INTERNAL", "the daemon could not process this request", technical_message=str(exc)
    )
    log_failure("request failed", exc, listener=listener, error_id=body.error_id)
    return body


def log_failure(event: str, exc: BaseException, **fields: Any) -> None:
    """Log an unexpected exception with its traceback, but not the locals of its frames
    (tokens, payloads) nor more than the start of its message (it may quote a client)."""
    log.error(
        event,
        error=type(exc).__name__,
        message=str(exc)[:LOGGED_MESSAGE],
        traceback="".join(traceback.format_tb(exc.__traceback__)),
        **fields,
    )


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
