"""The HTTP client: an application's way to the daemon's /v1 API, as a user (or operator).

    from jobwarden.client import Client

    with Client("http://127.0.0.1:8080", token) as client:
        job = client.submit("storybook", {"title": "The brave otter"})
        print(job.result(timeout=600))

`AsyncClient` is the same over `await`. It is built on httpx, which runs on anyio, so it works
under asyncio (FastAPI, Starlette, Django's async views) and under trio alike.

A submission always carries an idempotency key (the caller's, or one made here), so the
client can send it again after a dropped connection and never make a second job. Refusals
raise `Refused` with the daemon's `code` and `retry_after`; `submit(..., wait_if_limited=True)`
waits as long as Retry-After says and tries again. `Job.result()` long-polls until the job is
final: it returns the result, or raises `JobFailed` (code, message, error_id) or
`JobCanceled`. `Job.events()` follows the job's Server-Sent Events, reconnecting and resuming
after the last event it received (Last-Event-ID), so every event arrives once and in order.

The sync and async classes share every decision (what to send, what an answer means, how long
to wait) through the functions at the top of this module; they differ only in how they wait.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Self

import anyio
import httpx
import httpx_sse
import msgspec

from jobwarden.errors import DaemonError, DaemonUnreachable
from jobwarden.wire.views import (
    TERMINAL_STATUSES,
    BatchResult,
    ErrorBody,
    Event,
    JobLog,
    JobView,
)

# How long one long-poll of a job's result waits on the daemon before asking again; the
# daemon caps it too. Short enough for proxies with a 60 s idle timeout.
RESULT_POLL = 30.0
# Waits between reconnections of an event stream: the first at once, then doubling.
RECONNECT_FIRST = 0.1
RECONNECT_MAX = 5.0
# A submission that is refused for a retryable reason without a Retry-After waits this long.
DEFAULT_RETRY_AFTER = 1.0


class Outcome(msgspec.Struct):
    """A job's status and, once it is final, its result or error (GET /v1/jobs/{id}/result)."""

    id: int
    status: str
    result: Any = None
    error: ErrorBody | None = None


class _Shown(msgspec.Struct):
    job: JobView
    # The job's latest events, newest last.
    events: list[Event] = msgspec.field(default_factory=list)


class _Page(msgspec.Struct):
    jobs: list[JobView]
    next_cursor: str | None = None


_views = msgspec.json.Decoder(JobView)
_shown = msgspec.json.Decoder(_Shown)
_page = msgspec.json.Decoder(_Page)
_outcomes = msgspec.json.Decoder(Outcome)
_error = msgspec.json.Decoder(ErrorBody)
_event = msgspec.json.Decoder(Event)
_log = msgspec.json.Decoder(JobLog)
_batch = msgspec.json.Decoder(BatchResult)


class Refused(DaemonError):
    """The daemon refused a request: `code` (RATE_LIMITED, QUEUE_FULL, NOT_FOUND …), the HTTP
    `status`, and `retry_after` in seconds when trying again later would help."""

    def __init__(self, error: ErrorBody, status: int) -> None:
        super().__init__(error)
        self.status = status

    @property
    def code(self) -> str:
        return self.error.code

    @property
    def retry_after(self) -> float | None:
        return self.error.retry_after


class JobFailed(Exception):
    """The job ended failed: its error's code, message and error_id (to find it in the log)."""

    def __init__(self, job_id: int, error: ErrorBody | None) -> None:
        error = error or ErrorBody(code="FAILED", message="the job failed", retryable=False)
        super().__init__(f"job {job_id} failed: {error.code}: {error.message}")
        self.job_id = job_id
        self.code = error.code
        self.error_message = error.message
        self.error_id = error.error_id


class JobCanceled(Exception):
    """The job was canceled before it finished."""

    def __init__(self, job_id: int) -> None:
        super().__init__(f"job {job_id} was canceled")
        self.job_id = job_id


# What the client decides, shared by Client and AsyncClient.


def _headers(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", "Accept": "application/json"}


def _submission(
    kind: str,
    payload: Any,
    *,
    priority: int | None,
    idempotency_key: str | None,
    tags: list[str] | None,
    options: Mapping[str, Any],
) -> dict[str, Any]:
    body: dict[str, Any] = {"kind": kind, "payload": payload, **options}
    # A key of our own when the caller gave none: sending the submission again after a
    # dropped connection then finds the job the first one made.
    body["idempotency_key"] = idempotency_key or f"client-{uuid.uuid4().hex}"
    # The same for every sending of this submission: one sent again after its job finished
    # gets that job, not a second one.
    body["submission_id"] = uuid.uuid4().hex
    if priority is not None:
        body["priority"] = priority
    if tags is not None:
        body["tags"] = tags
    return body


def _batch_body(items: list[dict[str, Any]], atomic: bool) -> dict[str, Any]:
    # Each item gets its own key, as `submit` does, so sending the batch again is safe.
    keyed = [{"idempotency_key": f"client-{uuid.uuid4().hex}", **item} for item in items]
    return {"items": keyed, "atomic": atomic}


def _checked(response: httpx.Response) -> httpx.Response:
    """The response if the daemon said yes; Refused with its error shape if it said no."""
    if response.is_success:
        return response
    try:
        error = _error.decode(response.content)
    except (msgspec.ValidationError, msgspec.DecodeError):
        error = ErrorBody(
            code="INTERNAL" if response.status_code >= 500 else "INVALID_REQUEST",
            message=f"HTTP {response.status_code} without an error body",
            retryable=response.status_code >= 500,
        )
    if error.retry_after is None and "Retry-After" in response.headers:
        with contextlib.suppress(ValueError):
            error.retry_after = float(response.headers["Retry-After"])
    raise Refused(error, response.status_code)


def _limit_wait(refused: Refused, deadline: float | None, now: float) -> float | None:
    """How long to wait before submitting again, or None to give up and raise."""
    if not refused.error.retryable:
        return None
    wait = refused.retry_after if refused.retry_after is not None else DEFAULT_RETRY_AFTER
    if deadline is not None and now + wait > deadline:
        return None
    return wait


def _poll_seconds(deadline: float | None, now: float) -> float:
    return RESULT_POLL if deadline is None else max(0.0, min(RESULT_POLL, deadline - now))


def _outcome(outcome: Outcome) -> Any:
    """A final job's result, or the exception its end calls for."""
    if outcome.status == "failed":
        raise JobFailed(outcome.id, outcome.error)
    if outcome.status == "canceled":
        raise JobCanceled(outcome.id)
    return outcome.result


def _unreachable(url: str, exc: httpx.TransportError) -> DaemonUnreachable:
    return DaemonUnreachable(url, f"{type(exc).__name__}: {exc}" if str(exc) else repr(exc))


def _list_params(
    status: str | list[str] | None,
    kind: str | None,
    tag: str | None,
    limit: int | None,
    cursor: str | None,
) -> dict[str, Any]:
    given = {"status": status, "kind": kind, "tag": tag, "limit": limit, "cursor": cursor}
    # A list of statuses goes as the parameter repeated (?status=queued&status=running).
    return {name: value for name, value in given.items() if value is not None}


def _next_wait(wait: float) -> float:
    return min(RECONNECT_MAX, max(RECONNECT_FIRST, wait * 2))


class _Resync(Exception):
    """The daemon ended an event stream because its reader fell behind."""


@dataclass
class _Stream:
    """Where a job's event stream resumes after a reconnection, and where it ends: at the
    job's final status as it stands, not at a failure that a retry has since superseded."""

    last_seq: int
    # The job as it was read before the stream began: final or not, and its newest event.
    final_when_read: bool
    newest_when_read: int

    @classmethod
    def of(cls, shown: _Shown, since: int | None) -> _Stream:
        newest = max((event.seq for event in shown.events), default=0)
        final = shown.job.status in TERMINAL_STATUSES
        return cls(last_seq=since or 0, final_when_read=final, newest_when_read=newest)

    def params(self) -> dict[str, str]:
        return {"since": str(self.last_seq)}

    def headers(self, token: str) -> dict[str, str]:
        return {
            **_headers(token),
            "Accept": "text/event-stream",
            "Last-Event-ID": str(self.last_seq),
        }

    def take(self, sse: httpx_sse.ServerSentEvent) -> Event | None:
        """The event an SSE message carries, once: None for repeats. Raises _Resync when the
        daemon cut the stream off for reading too slowly: reconnect after the last seq."""
        if sse.event == "resync":
            raise _Resync
        if not sse.data:
            return None
        event = _event.decode(sse.data)
        if event.seq <= self.last_seq:
            return None
        self.last_seq = event.seq
        return event

    def ends_with(self, event: Event) -> bool:
        if self.final_when_read:
            # Final already: its history up to then is all there is to tell.
            return event.seq >= self.newest_when_read
        return event.seq > self.newest_when_read and _is_final(event)


class Job:
    """A job on the daemon, as `Client.submit` or `Client.get` found it: `view` is the last
    state read; `result()` and `events()` follow it further."""

    def __init__(self, client: Client, view: JobView, *, existing: bool = False) -> None:
        self.client = client
        self.view = view
        # An earlier submission with the same idempotency key made this job.
        self.existing = existing

    @property
    def id(self) -> int:
        return self.view.id

    @property
    def status(self) -> str:
        return self.view.status

    def refresh(self) -> Self:
        self.view = self.client.get(self.id).view
        return self

    def result(self, timeout: float | None = None) -> Any:
        """Wait until the job is final and return its result; raise JobFailed or JobCanceled
        if it ended so, TimeoutError if `timeout` seconds pass first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        outcome = Outcome(self.id, self.view.status, self.view.result, self.view.error)
        while outcome.status not in TERMINAL_STATUSES:
            wait = _poll_seconds(deadline, time.monotonic())
            if deadline is not None and wait <= 0:
                raise TimeoutError(f"job {self.id} is still {outcome.status}")
            outcome = self.client._result_poll(self.id, wait)
        return _outcome(outcome)

    def events(self, since: int | None = None) -> Iterator[Event]:
        """Every event of the job after `since` (all by default), until it is final."""
        return self.client._events(self.id, since)

    def cancel(self) -> Self:
        self.view = self.client._cancel(self.id)
        return self

    def logs(self, after: int = 0) -> JobLog:
        """The job's log lines after line id `after`, oldest first (a page: ask again after
        the last line's id for more), and how many older lines were dropped."""
        return self.client._logs(self.id, after)


class AsyncJob:
    """`Job` for `AsyncClient`."""

    def __init__(self, client: AsyncClient, view: JobView, *, existing: bool = False) -> None:
        self.client = client
        self.view = view
        self.existing = existing

    @property
    def id(self) -> int:
        return self.view.id

    @property
    def status(self) -> str:
        return self.view.status

    async def refresh(self) -> Self:
        self.view = (await self.client.get(self.id)).view
        return self

    async def result(self, timeout: float | None = None) -> Any:
        """Wait until the job is final and return its result; raise JobFailed or JobCanceled
        if it ended so, TimeoutError if `timeout` seconds pass first."""
        deadline = None if timeout is None else anyio.current_time() + timeout
        outcome = Outcome(self.id, self.view.status, self.view.result, self.view.error)
        while outcome.status not in TERMINAL_STATUSES:
            wait = _poll_seconds(deadline, anyio.current_time())
            if deadline is not None and wait <= 0:
                raise TimeoutError(f"job {self.id} is still {outcome.status}")
            outcome = await self.client._result_poll(self.id, wait)
        return _outcome(outcome)

    def events(self, since: int | None = None) -> AsyncIterator[Event]:
        """Every event of the job after `since` (all by default), until it is final."""
        return self.client._events(self.id, since)

    async def cancel(self) -> Self:
        self.view = await self.client._cancel(self.id)
        return self

    async def logs(self, after: int = 0) -> JobLog:
        """`Job.logs`, awaited."""
        return await self.client._logs(self.id, after)


class Client:
    """A user's (or operator's) session with the daemon's HTTP API; `token` is theirs."""

    def __init__(
        self, url: str, token: str, *, timeout: float = 10.0, transport: Any = None
    ) -> None:
        self.url = url.rstrip("/")
        self._token = token
        self._http = httpx.Client(
            base_url=self.url,
            headers=_headers(token),
            timeout=timeout,
            transport=transport,
        )

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return _checked(self._http.request(method, path, **kwargs))
        except httpx.TransportError as exc:
            raise _unreachable(self.url, exc) from exc

    def submit(
        self,
        kind: str,
        payload: Any = None,
        *,
        priority: int | None = None,
        idempotency_key: str | None = None,
        tags: list[str] | None = None,
        wait_if_limited: bool = False,
        limited_timeout: float | None = None,
        **options: Any,
    ) -> Job:
        """Submit a job; the daemon has stored it when this returns. With `wait_if_limited`,
        a retryable refusal (rate limit, full queue, draining) waits as Retry-After says and
        tries again, for at most `limited_timeout` seconds (None: as long as it takes)."""
        body = _submission(
            kind,
            payload,
            priority=priority,
            idempotency_key=idempotency_key,
            tags=tags,
            options=options,
        )
        deadline = None if limited_timeout is None else time.monotonic() + limited_timeout
        while True:
            try:
                response = self._request("POST", "/v1/jobs", json=body)
            except Refused as refused:
                wait = _limit_wait(refused, deadline, time.monotonic()) if wait_if_limited else None
                if wait is None:
                    raise
                time.sleep(wait)
                continue
            return Job(self, _views.decode(response.content), existing=response.status_code == 200)

    def get(self, job_id: int) -> Job:
        return Job(self, _shown.decode(self._request("GET", f"/v1/jobs/{job_id}").content).job)

    def jobs(
        self,
        *,
        status: str | list[str] | None = None,
        kind: str | None = None,
        tag: str | None = None,
        limit: int | None = None,
    ) -> Iterator[Job]:
        """The jobs this token may see, newest first, page by page as the loop goes on."""
        cursor: str | None = None
        while True:
            params = _list_params(status, kind, tag, limit, cursor)
            page = _page.decode(self._request("GET", "/v1/jobs", params=params).content)
            for view in page.jobs:
                yield Job(self, view)
            cursor = page.next_cursor
            if not cursor:
                return

    def _cancel(self, job_id: int) -> JobView:
        return _views.decode(self._request("POST", f"/v1/jobs/{job_id}/cancel").content)

    def _logs(self, job_id: int, after: int) -> JobLog:
        response = self._request("GET", f"/v1/jobs/{job_id}/logs", params={"after": after})
        return _log.decode(response.content)

    def submit_many(self, items: list[dict[str, Any]], *, atomic: bool = False) -> dict[str, Any]:
        """Many jobs in one request, committed in one write: each item is a submission
        (`kind`, `payload`, options); the reply has one result per item, accepted or its
        refusal. With `atomic`, all are accepted or the batch is refused (Refused, naming
        the item)."""
        response = self._request("POST", "/v1/jobs:batch", json=_batch_body(items, atomic))
        return _batch.decode(response.content)

    def _result_poll(self, job_id: int, wait: float) -> Outcome:
        response = self._request(
            "GET",
            f"/v1/jobs/{job_id}/result",
            params={"wait": f"{wait:.3f}s"},
            timeout=wait + self._http.timeout.read,
        )
        return _outcomes.decode(response.content)

    def _events(self, job_id: int, since: int | None) -> Iterator[Event]:
        shown = _shown.decode(self._request("GET", f"/v1/jobs/{job_id}").content)
        stream = _Stream.of(shown, since)
        wait = 0.0
        while True:
            try:
                with httpx_sse.connect_sse(
                    self._http,
                    "GET",
                    f"/v1/jobs/{job_id}/events",
                    params=stream.params(),
                    headers=stream.headers(self._token),
                    timeout=httpx.Timeout(self._http.timeout.connect, read=None),
                ) as source:
                    _checked_stream(source.response)
                    for sse in source.iter_sse():
                        event = stream.take(sse)
                        if event is not None:
                            wait = 0.0
                            yield event
                            if stream.ends_with(event):
                                return
            except (httpx.TransportError, _Resync):
                pass
            # The stream ended before the job did: the daemon restarted or the network broke.
            time.sleep(wait)
            wait = _next_wait(wait)


class AsyncClient:
    """`Client` over `await`, for asyncio and trio applications."""

    def __init__(
        self, url: str, token: str, *, timeout: float = 10.0, transport: Any = None
    ) -> None:
        self.url = url.rstrip("/")
        self._token = token
        self._http = httpx.AsyncClient(
            base_url=self.url,
            headers=_headers(token),
            timeout=timeout,
            transport=transport,
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return _checked(await self._http.request(method, path, **kwargs))
        except httpx.TransportError as exc:
            raise _unreachable(self.url, exc) from exc

    async def submit(
        self,
        kind: str,
        payload: Any = None,
        *,
        priority: int | None = None,
        idempotency_key: str | None = None,
        tags: list[str] | None = None,
        wait_if_limited: bool = False,
        limited_timeout: float | None = None,
        **options: Any,
    ) -> AsyncJob:
        """`Client.submit`, awaited."""
        body = _submission(
            kind,
            payload,
            priority=priority,
            idempotency_key=idempotency_key,
            tags=tags,
            options=options,
        )
        deadline = None if limited_timeout is None else anyio.current_time() + limited_timeout
        while True:
            try:
                response = await self._request("POST", "/v1/jobs", json=body)
            except Refused as refused:
                now = anyio.current_time()
                wait = _limit_wait(refused, deadline, now) if wait_if_limited else None
                if wait is None:
                    raise
                await anyio.sleep(wait)
                continue
            view = _views.decode(response.content)
            return AsyncJob(self, view, existing=response.status_code == 200)

    async def get(self, job_id: int) -> AsyncJob:
        response = await self._request("GET", f"/v1/jobs/{job_id}")
        return AsyncJob(self, _shown.decode(response.content).job)

    async def jobs(
        self,
        *,
        status: str | list[str] | None = None,
        kind: str | None = None,
        tag: str | None = None,
        limit: int | None = None,
    ) -> AsyncIterator[AsyncJob]:
        """The jobs this token may see, newest first, page by page as the loop goes on."""
        cursor: str | None = None
        while True:
            params = _list_params(status, kind, tag, limit, cursor)
            response = await self._request("GET", "/v1/jobs", params=params)
            page = _page.decode(response.content)
            for view in page.jobs:
                yield AsyncJob(self, view)
            cursor = page.next_cursor
            if not cursor:
                return

    async def _cancel(self, job_id: int) -> JobView:
        response = await self._request("POST", f"/v1/jobs/{job_id}/cancel")
        return _views.decode(response.content)

    async def _logs(self, job_id: int, after: int) -> JobLog:
        response = await self._request("GET", f"/v1/jobs/{job_id}/logs", params={"after": after})
        return _log.decode(response.content)

    async def submit_many(
        self, items: list[dict[str, Any]], *, atomic: bool = False
    ) -> BatchResult:
        """`Client.submit_many`, awaited."""
        body = _batch_body(items, atomic)
        return _batch.decode((await self._request("POST", "/v1/jobs:batch", json=body)).content)

    async def _result_poll(self, job_id: int, wait: float) -> Outcome:
        response = await self._request(
            "GET",
            f"/v1/jobs/{job_id}/result",
            params={"wait": f"{wait:.3f}s"},
            timeout=wait + self._http.timeout.read,
        )
        return _outcomes.decode(response.content)

    async def _events(self, job_id: int, since: int | None) -> AsyncIterator[Event]:
        shown = _shown.decode((await self._request("GET", f"/v1/jobs/{job_id}")).content)
        stream = _Stream.of(shown, since)
        wait = 0.0
        while True:
            try:
                async with httpx_sse.aconnect_sse(
                    self._http,
                    "GET",
                    f"/v1/jobs/{job_id}/events",
                    params=stream.params(),
                    headers=stream.headers(self._token),
                    timeout=httpx.Timeout(self._http.timeout.connect, read=None),
                ) as source:
                    if not source.response.is_success:
                        await source.response.aread()
                    _checked_stream(source.response)
                    async for sse in source.aiter_sse():
                        event = stream.take(sse)
                        if event is not None:
                            wait = 0.0
                            yield event
                            if stream.ends_with(event):
                                return
            except (httpx.TransportError, _Resync):
                pass
            await anyio.sleep(wait)
            wait = _next_wait(wait)


def _checked_stream(response: httpx.Response) -> None:
    """An event stream's refusal (401, 404 …) raised like any other; the stream otherwise."""
    if not response.is_success:
        if not response.is_stream_consumed:
            response.read()
        _checked(response)


def _is_final(event: Event) -> bool:
    return event.type == "status" and event.data.get("status") in TERMINAL_STATUSES
