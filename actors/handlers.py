"""What a handler sees (`JobContext`), how it signals outcomes, and the two ways to run one.

python kinds: `async def handler(ctx, payload) -> result`; `payload` may be annotated with a
msgspec Struct, and admission validates it before the job is accepted.

command kinds: argv filled from the payload (`"{payload.input}"`, `"{job_id}"`, `"{attempt}"`);
the child writes JSON lines on stdout (`{"progress": 0.4, "message": "..."}`,
`{"checkpoint": {...}}`, `{"heartbeat": true}`, `{"charge": {"service": "image", "units": 1}}`,
`{"result": {...}}`); exit 0 is done,
75 (EX_TEMPFAIL) asks for a retry, anything else fails with the tail of stderr. It runs in
its own session, so cancel and timeout kill its whole process group; the group is recorded in
the store, so a restart after a crash can end what is left of it (actors/processes.py). Its
stderr and the stdout lines that are no protocol line go to the job's log (actors/joblogs.py),
as does what a python handler writes with `ctx.log(...)`.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
import os
import re
import typing
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import structlog
import trio

from jobwarden.actors import processes
from jobwarden.actors.budget import is_units
from jobwarden.actors.services import Metered, ServiceLink
from jobwarden.config import (
    COMMAND_PLACEHOLDER,
    KindSection,
    check_payload,
    import_handler,
    name_path,
    template_fields,
)
from jobwarden.errors import (
    BudgetExhausted,
    Fail,
    RequestError,
    Retry,
    ServiceFailed,
    ServiceUnavailable,
)

# What a handler module imports: the context, the outcomes it can raise or catch.
__all__ = [
    "BudgetExhausted",
    "Fail",
    "JobContext",
    "Metered",
    "Retry",
    "ServiceFailed",
    "ServiceUnavailable",
]

log = structlog.get_logger("handler")

EXIT_RETRY = 75
HEARTBEAT_EVERY = 1.0


class JobContext:
    """Given to each handler run. Every report also heartbeats the job."""

    def __init__(
        self,
        *,
        job_id: int,
        kind: str,
        user: str,
        attempt: int,
        max_attempts: int,
        checkpoint: Any,
        options: dict[str, Any],
        report_progress: Callable[[float, str | None], Awaitable[None]],
        store_checkpoint: Callable[[Any], Awaitable[None]],
        store_heartbeat: Callable[[], Awaitable[None]],
        services: ServiceLink | None = None,
        store_process_group: Callable[[int, str], Awaitable[None]] | None = None,
        write_log: Callable[[str, str], None] | None = None,
    ) -> None:
        self.job_id = job_id
        self.kind = kind
        self.user = user
        self.attempt = attempt
        self.max_attempts = max_attempts
        self.checkpoint = checkpoint
        self.options = options
        self._report_progress = report_progress
        self._store_checkpoint = store_checkpoint
        self._store_heartbeat = store_heartbeat
        self._services = services
        # Where a command's process group is recorded, for the restart after a crash.
        self._store_process_group = store_process_group
        # Where the job's log lines go: (stream, line), kept with the job in batches.
        self._write_log = write_log
        self._last_heartbeat = -math.inf

    def log(self, message: str) -> None:
        """Add `message` to the job's log (`jobwarden logs JOB`), a line per line of it.
        Never blocks: lines are written in batches, and kept within the job's log size."""
        self._output("log", str(message))

    def _output(self, stream: str, text: str) -> None:
        if self._write_log is not None:
            for line in text.splitlines() or [""]:
                self._write_log(stream, line)

    async def progress(self, fraction: float, message: str | None = None) -> None:
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"progress fraction must be within 0..1, got {fraction}")
        await self._report_progress(float(fraction), message)
        self._last_heartbeat = trio.current_time()

    async def save_checkpoint(self, state: Any) -> None:
        """Durable before it returns: a retry after a crash resumes from here."""
        await self._store_checkpoint(state)
        self.checkpoint = state
        self._last_heartbeat = trio.current_time()

    async def call(
        self,
        service: str,
        fn: Callable[..., Awaitable[Any]],
        *args: Any,
        units: float | None = None,
    ) -> Any:
        """Call `fn(*args)` as one use of `service`: budget, breaker, limits, timeout, retries.

        The ledger reserves the most this call can cost before it is made: `units`, or the
        service's `max_units` if not given. `fn` may return `Metered(value, units)` to settle
        the units it really used.

        Raises BudgetExhausted (the job goes back to the queue to wait for budget),
        ServiceUnavailable (the circuit is open; catch it to degrade) or ServiceFailed.
        """
        if self._services is None:
            raise RuntimeError("this context has no services")
        return await self._services.call(service, fn, args, units)

    async def charge(self, service: str, units: float = 1) -> float:
        """Book the cost of a call made outside ctx.call; returns its price in USD."""
        if self._services is None:
            raise RuntimeError("this context has no services")
        return await self._services.charge(service, units)

    async def heartbeat(self) -> None:
        """Say "still alive" without progress, e.g. while waiting on a slow provider.

        At most one write per HEARTBEAT_EVERY seconds reaches the store; calling it in a
        tight loop costs nothing more.
        """
        now = trio.current_time()
        if now - self._last_heartbeat >= HEARTBEAT_EVERY:
            self._last_heartbeat = now
            await self._store_heartbeat()


@functools.cache
def payload_type(handler: Callable[..., Any]) -> type | None:
    """The Struct a python handler's payload parameter is annotated with, if any.

    Cached: signature and type-hint introspection would otherwise run on every submit."""
    params = list(inspect.signature(handler).parameters.values())
    if len(params) < 2:
        return None
    hints = typing.get_type_hints(handler)
    annotation = hints.get(params[1].name)
    if isinstance(annotation, type) and issubclass(annotation, msgspec.Struct):
        return annotation
    return None


def _lookup(payload: Any, path: tuple[str, ...]) -> Any:
    value = payload
    for key in path:
        if not isinstance(value, dict) or key not in value:
            raise KeyError(".".join(("payload", *path)))
        value = value[key]
    if isinstance(value, dict | list) or value is None:
        raise TypeError(f"{'.'.join(('payload', *path))} must be a string or number")
    return value


def render_command(command: list[str], payload: Any, *, job_id: int, attempt: int) -> list[str]:
    def fill(match: re.Match[str]) -> str:
        name = match[1]
        if name == "job_id":
            return str(job_id)
        if name == "attempt":
            return str(attempt)
        value = _lookup(payload, tuple(name.split(".")[1:]))
        return json.dumps(value) if isinstance(value, bool) else str(value)

    return [COMMAND_PLACEHOLDER.sub(fill, arg) for arg in command]


def validate_payload(kind: KindSection, payload: Any) -> Any:
    """Check a payload against its kind; raises ValueError naming the field."""
    if kind.handler is not None:
        struct = payload_type(import_handler(kind.handler))
        if struct is not None:
            try:
                return msgspec.convert(payload, struct)
            except msgspec.ValidationError as exc:
                raise ValueError(name_path(str(exc), "payload", struct)) from None
        return payload
    assert kind.command is not None
    if kind.payload is not None:
        check_payload(kind.payload, payload)
    if template_fields(kind.command) and not isinstance(payload, dict):
        raise ValueError("payload must be a JSON object")
    for path in template_fields(kind.command):
        try:
            _lookup(payload, path)
        except KeyError as exc:
            raise ValueError(f"{exc.args[0]} is required by this kind's command") from None
        except TypeError as exc:
            raise ValueError(str(exc)) from None
    return payload


async def run_python(kind: KindSection, ctx: JobContext, payload: Any) -> Any:
    assert kind.handler is not None
    handler = import_handler(kind.handler)
    struct = payload_type(handler)
    argument = msgspec.convert(payload, struct) if struct is not None else payload
    return await handler(ctx, argument)


async def run_command(kind: KindSection, ctx: JobContext, payload: Any) -> Any:
    assert kind.command is not None
    argv = render_command(kind.command, payload, job_id=ctx.job_id, attempt=ctx.attempt)
    env = dict(os.environ)
    env.update(
        {
            processes.JOB_ID_VARIABLE: str(ctx.job_id),
            "JOBWARDEN_ATTEMPT": str(ctx.attempt),
            "JOBWARDEN_CHECKPOINT": json.dumps(ctx.checkpoint),
        }
    )
    stderr_tail: deque[str] = deque(maxlen=kind.stderr_tail_lines)
    result: list[Any] = [None]
    try:
        process = await processes.spawn(argv, env)
    except OSError as exc:
        raise Fail(f"cannot start {argv[0]!r}: {exc.strerror}") from None
    try:
        identity = processes.identity(process.pid)
        if ctx._store_process_group is not None and identity is not None:
            await ctx._store_process_group(process.pid, identity)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_read_stderr, process.stderr, stderr_tail, ctx)
            await _read_protocol(process.stdout, ctx, result)
            await process.wait()
    finally:
        if process.returncode is None:
            with trio.CancelScope(shield=True):
                await processes.stop_escalating(process.signal_group, process.wait)
        process.close()
    tail = "\n".join(stderr_tail)
    if process.returncode == 0:
        return result[0]
    if process.returncode == EXIT_RETRY:
        raise Retry(f"exit status 75 (retry): {tail}".strip())
    how = (
        f"killed by signal {-process.returncode}"
        if process.returncode < 0
        else f"exit status {process.returncode}"
    )
    raise Fail(f"{how}: {tail}".strip(": "))


async def _lines(stream: trio.abc.ReceiveStream) -> typing.AsyncIterator[str]:
    buffer = b""
    async for chunk in stream:
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            yield line.decode("utf-8", "replace")
    if buffer:
        yield buffer.decode("utf-8", "replace")


async def _read_stderr(stream: trio.abc.ReceiveStream, tail: deque[str], ctx: JobContext) -> None:
    async for line in _lines(stream):
        tail.append(line)
        ctx._output("stderr", line)


def _finite_number(value: Any) -> float | None:
    """`value` as a float if it is a finite JSON number (not a boolean), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:  # an integer too large for a float
        return None
    return number if math.isfinite(number) else None


def _protocol_fault(report: dict[str, Any]) -> str | None:
    """The field of a report line that does not fit the protocol, or None if it all fits.
    `checkpoint` and `result` take any JSON value, so they cannot be malformed."""
    if "progress" in report:
        fraction = _finite_number(report["progress"])
        if fraction is None or not 0.0 <= fraction <= 1.0:
            return "progress"
        if not isinstance(report.get("message"), str | None):
            return "message"
    if not isinstance(report.get("heartbeat", False), bool):
        return "heartbeat"
    if "charge" in report:
        charge = report["charge"]
        if not (
            isinstance(charge, dict)
            and isinstance(charge.get("service"), str)
            and is_units(_finite_number(charge.get("units", 1)))
        ):
            return "charge"
    return None


async def _read_protocol(stream: trio.abc.ReceiveStream, ctx: JobContext, result: list[Any]):
    # A child that writes one bad line often writes it on every step: one warning per field
    # says as much, without flooding the log.
    warned: set[str] = set()

    def warn(field: str, line: str, **detail: str) -> None:
        if field not in warned:
            warned.add(field)
            log.warning(
                "bad protocol line from command",
                job=ctx.job_id,
                field=field,
                line=line[:200],
                **detail,
            )

    async for line in _lines(stream):
        try:
            report = json.loads(line)
        except ValueError:
            report = None
        if not isinstance(report, dict):
            # Not a protocol line: the command's own output, for its log.
            ctx._output("stdout", line)
            continue
        fault = _protocol_fault(report)
        if fault is not None:
            warn(fault, line)
            continue
        if "progress" in report:
            await ctx.progress(float(report["progress"]), report.get("message"))
        if "checkpoint" in report:
            await ctx.save_checkpoint(report["checkpoint"])
        if report.get("heartbeat"):
            await ctx.heartbeat()
        if "charge" in report:
            charge = report["charge"]
            try:
                await ctx.charge(charge["service"], float(charge.get("units", 1)))
            except RequestError as exc:  # e.g. a service the config does not name
                warn("charge", line, error=str(exc)[:200])
        if "result" in report:
            result[0] = report["result"]
