"""Breaker: one circuit per external service, and the service's concurrency and rate limits.

Consumes `Permit`, `Withdraw` and `CallDone` from jobs calling through ctx.call,
`BreakerReset`/`BreakerTrip`/`BreakerSnapshot` from the admin socket, `Reconfigure` from the
supervisor. Produces `ServiceState` for the scheduler (which holds jobs whose kind needs an open
service) and alerts for the monitor.

CLOSED -> OPEN after `failures` consecutive failures, or an error rate above `error_rate`
over `window` once `min_calls` were seen. OPEN refuses at once until `recovery` has passed.
HALF_OPEN lets `half_open_calls` probes through, each with its own deadline (the service's
timeout): a probe that neither succeeds nor fails by then counts as a failure, so a hung probe
cannot hold the circuit half-open forever. All probes succeeding closes it; any failing
reopens it. Open circuits are stored, so a restart does not hammer a provider that was down.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from functools import partial
from typing import Any, Literal

import structlog
import trio

from jobwarden.actors.messages import (
    BreakerMessage,
    BreakerReset,
    BreakerSnapshot,
    BreakerTrip,
    CallDone,
    Permit,
    RaiseAlert,
    Reconfigure,
    ServiceState,
    Token,
    Withdraw,
)
from jobwarden.clock import WallClock
from jobwarden.config import BreakerSpec, Config, ServiceSection, format_duration
from jobwarden.errors import RequestError, ServiceUnavailable
from jobwarden.mailbox import ReplySlot, receive_by
from jobwarden.store import Engine
from jobwarden.store.breakers import load_breakers, save_breaker

log = structlog.get_logger("breaker")

State = Literal["closed", "open", "half_open"]


class Circuit:
    """The state machine of one service's circuit, as plain code over explicit times."""

    def __init__(self, spec: BreakerSpec, probe_timeout: float) -> None:
        self.spec = spec
        self.probe_timeout = probe_timeout
        self.state: State = "closed"
        self.open_until: float | None = None
        self.consecutive_failures = 0
        self.window: deque[tuple[float, bool]] = deque()
        # Probe id -> deadline, while half-open.
        self.probes: dict[int, float] = {}
        self.probe_successes = 0
        self.opened = 0

    def admit(self, now: float, probe_id: int) -> bool | None:
        """True: go ahead (as a probe if half-open). None: refused. Moves OPEN -> HALF_OPEN."""
        self.expire_probes(now)
        if self.state == "open" and self.open_until is not None and now >= self.open_until:
            self._become("half_open", now)
        if self.state == "closed":
            return True
        if self.state == "half_open" and len(self.probes) < self.spec.half_open_calls:
            self.probes[probe_id] = now + self.probe_timeout
            return True
        return None

    def record(self, now: float, ok: bool, probe_id: int | None) -> None:
        if probe_id is not None:
            if self.probes.pop(probe_id, None) is None:
                return  # a probe that already timed out has had its say
            if not ok:
                self._open(now)
            else:
                self.probe_successes += 1
                if self.probe_successes >= self.spec.half_open_calls:
                    self._become("closed", now)
            return
        if self.state != "closed":
            return
        self.window.append((now, ok))
        while self.window and self.window[0][0] <= now - self.spec.window:
            self.window.popleft()
        self.consecutive_failures = 0 if ok else self.consecutive_failures + 1
        failed = sum(1 for _, success in self.window if not success)
        too_many = self.consecutive_failures >= self.spec.failures
        rate_over = (
            len(self.window) >= self.spec.min_calls
            and failed / len(self.window) > self.spec.error_rate
        )
        if too_many or rate_over:
            self._open(now)

    def abandon(self, probe_id: int) -> None:
        """A probe canceled by us: free its place without a verdict."""
        self.probes.pop(probe_id, None)

    def expire_probes(self, now: float) -> None:
        if any(deadline <= now for deadline in self.probes.values()):
            self._open(now)

    def next_deadline(self) -> float:
        """When a probe in flight runs out. OPEN -> HALF_OPEN needs no timer: it happens
        when the next call asks, and the scheduler holds jobs until open_until itself."""
        return min(self.probes.values(), default=math.inf)

    def trip(self, now: float) -> None:
        self._open(now)

    def reset(self, now: float) -> None:
        self._become("closed", now)

    def _open(self, now: float) -> None:
        self.opened += 1
        self._become("open", now)
        self.open_until = now + self.spec.recovery

    def _become(self, state: State, now: float) -> None:
        self.state = state
        self.probes.clear()
        self.probe_successes = 0
        if state == "closed":
            self.open_until = None
            self.consecutive_failures = 0
            self.window.clear()


TOKEN_SLACK = 1e-9


class Gate:
    """A service's concurrency limit and token-bucket rate limit, on trio's clock."""

    def __init__(self, spec: ServiceSection, now: float) -> None:
        self.max_concurrent = spec.max_concurrent or math.inf
        self.rate = spec.rate
        # A burst of up to one second's worth of calls (at least one).
        self.capacity = max(1.0, spec.rate or 1.0)
        self.tokens = self.capacity
        self.refilled_at = now
        self.in_flight = 0

    def try_take(self, now: float) -> float | None:
        """None: taken. A number: the trio time at which to try again."""
        if self.in_flight >= self.max_concurrent:
            return math.inf  # a Done frees a slot and wakes the queue
        if self.rate is not None:
            self.tokens = min(self.capacity, self.tokens + (now - self.refilled_at) * self.rate)
            self.refilled_at = now
            # A shortfall below TOKEN_SLACK is rounding left by the refill, and the wait for
            # it can be too small to move a float clock: waking "then" would spin in place.
            if self.tokens < 1 - TOKEN_SLACK:
                return now + (1 - self.tokens) / self.rate
            self.tokens -= 1
        self.in_flight += 1
        return None

    def release(self) -> None:
        self.in_flight -= 1


class _Service:
    def __init__(self, name: str, spec: ServiceSection, now: float) -> None:
        self.name = name
        self.spec = spec
        self.circuit = Circuit(spec.breaker, spec.timeout)
        self.gate = Gate(spec, now)
        self.waiting: deque[tuple[Permit, int]] = deque()
        # Permits granted whose call has not reported Done, by token id.
        self.granted: dict[int, tuple[ReplySlot[Token], Token]] = {}
        self.retry_at = math.inf
        self.calls = 0
        self.failures = 0

    def reconfigure(self, spec: ServiceSection, now: float) -> None:
        in_flight = self.gate.in_flight
        self.spec = spec
        self.circuit.spec = spec.breaker
        self.circuit.probe_timeout = spec.timeout
        self.gate = Gate(spec, now)
        self.gate.in_flight = in_flight


class Breaker:
    def __init__(
        self,
        *,
        config: Config,
        store: Engine,
        clock: WallClock,
        inbox: trio.MemoryReceiveChannel[BreakerMessage],
        scheduler: trio.MemorySendChannel[Any],
        alerts: trio.MemorySendChannel[Any],
    ) -> None:
        self._config = config
        self._store = store
        self._clock = clock
        self._inbox = inbox
        self._scheduler = scheduler
        self._alerts = alerts
        self._ids = itertools.count(1)
        self._services: dict[str, _Service] = {}

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        stored = await self._store.read(load_breakers)
        self._build(self._config)
        for name, (state, open_until) in stored.items():
            service = self._services.get(name)
            if service is not None and state != "closed" and open_until is not None:
                # Down when we stopped: stay open for the rest of its recovery time.
                service.circuit.state = "open"
                service.circuit.open_until = open_until
                log.info("breaker restored open", service=name, until=open_until)
        async with self._inbox, self._scheduler, self._alerts:
            for service in self._services.values():
                await self._tell_scheduler(service)
            task_status.started()
            while True:
                try:
                    msg = await receive_by(self._inbox, self._next_wake())
                except trio.EndOfChannel:
                    return
                if msg is not None:
                    await self._handle(msg)
                await self._advance()

    def _build(self, config: Config) -> None:
        """Services from the config. A reload keeps each kept service's circuit state, calls
        in flight and calls waiting, under its new limits; a removed service's waiting calls
        are refused rather than left waiting forever."""
        now = trio.current_time()
        services = {}
        for name, spec in config.services.items():
            existing = self._services.get(name)
            if existing is None:
                services[name] = _Service(name, spec, now)
            else:
                existing.reconfigure(spec, now)
                services[name] = existing
        for name, removed in self._services.items():
            if name not in services:
                for permit, _ in removed.waiting:
                    permit.reply.fail(ServiceUnavailable(name, None))
        self._services = services

    def _next_wake(self) -> float:
        wake = math.inf
        for service in self._services.values():
            wake = min(
                wake,
                self._clock.deadline_for(service.circuit.next_deadline()),
                service.retry_at,
            )
        return wake

    async def _handle(self, msg: BreakerMessage) -> None:
        match msg:
            case Permit(service=name, reply=reply):
                service = self._services.get(name)
                if service is None:
                    known = ", ".join(sorted(self._services)) or "none"
                    reply.fail(RequestError("INVALID_REQUEST", f"no service '{name}' ({known})"))
                    return
                service.waiting.append((msg, next(self._ids)))
            case Withdraw(service=name, reply=reply):
                service = self._services.get(name)
                if service is not None:
                    self._withdraw(service, reply)
            case CallDone(token=token, outcome=outcome):
                service = self._services.get(token.service)
                if service is None:
                    return
                service.granted.pop(token.id, None)
                service.gate.release()
                before = service.circuit.state
                probe = token.id if token.probe else None
                if outcome == "abandoned":
                    if probe is not None:
                        service.circuit.abandon(probe)
                else:
                    service.calls += 1
                    service.failures += outcome == "failed"
                    service.circuit.record(self._clock.now(), outcome == "ok", probe)
                await self._changed(service, before)
            case BreakerReset() | BreakerTrip():
                await self._operator(msg)
            case BreakerSnapshot(reply=reply):
                reply.set({name: self._view(s) for name, s in self._services.items()})
            case Reconfigure(config=config):
                self._config = config
                self._build(config)

    def _withdraw(self, service: _Service, reply: ReplySlot[Token]) -> None:
        for entry in service.waiting:
            if entry[0].reply is reply:
                service.waiting.remove(entry)
                return
        for token_id, (granted_to, token) in service.granted.items():
            if granted_to is reply:
                del service.granted[token_id]
                service.gate.release()
                if token.probe:
                    service.circuit.abandon(token_id)
                return

    async def _operator(self, msg: BreakerReset | BreakerTrip) -> None:
        service = self._services.get(msg.service)
        if service is None:
            known = ", ".join(sorted(self._services)) or "none"
            msg.reply.fail(RequestError("NOT_FOUND", f"no service '{msg.service}' ({known})"))
            return
        before = service.circuit.state
        if isinstance(msg, BreakerReset):
            service.circuit.reset(self._clock.now())
        else:
            service.circuit.trip(self._clock.now())
        log.warning("breaker set by an operator", service=msg.service, action=type(msg).__name__)
        await self._changed(service, before)
        msg.reply.set(self._view(service))

    async def _advance(self) -> None:
        """Expire probes, move open circuits on, and grant what the gates allow now."""
        now = self._clock.now()
        trio_now = trio.current_time()
        for service in self._services.values():
            before = service.circuit.state
            service.circuit.expire_probes(now)
            if before != service.circuit.state:
                await self._changed(service, before)
            service.retry_at = math.inf
            while service.waiting:
                permit, permit_id = service.waiting[0]
                decision = service.circuit.admit(now, permit_id)
                if decision is None:
                    service.waiting.popleft()
                    permit.reply.fail(ServiceUnavailable(service.name, service.circuit.open_until))
                    continue
                if service.circuit.state == "half_open" and before != "half_open":
                    await self._changed(service, before)
                    before = "half_open"
                retry_at = service.gate.try_take(trio_now)
                if retry_at is not None:
                    if service.circuit.state == "half_open":
                        service.circuit.abandon(permit_id)
                    service.retry_at = retry_at
                    break
                service.waiting.popleft()
                token = Token(service.name, permit_id, probe=service.circuit.state == "half_open")
                service.granted[permit_id] = (permit.reply, token)
                permit.reply.set(token)

    async def _changed(self, service: _Service, before: State) -> None:
        after = service.circuit.state
        if after == before:
            return
        now = self._clock.now()
        until = service.circuit.open_until
        log.warning(
            "breaker state changed",
            service=service.name,
            before=before,
            after=after,
            open_until=until,
        )
        await self._store.write(
            partial(save_breaker, service=service.name, state=after, open_until=until, now=now)
        )
        await self._tell_scheduler(service)
        if after == "open":
            await self._alerts.send(
                RaiseAlert(
                    name=f"breaker_{service.name}",
                    message=f"breaker {service.name} opened for "
                    f"{format_duration(service.spec.breaker.recovery)}",
                    data={"service": service.name, "open_until": until},
                )
            )

    async def _tell_scheduler(self, service: _Service) -> None:
        open_until = service.circuit.open_until if service.circuit.state == "open" else None
        await self._scheduler.send(ServiceState(service=service.name, open_until=open_until))

    def _view(self, service: _Service) -> dict[str, Any]:
        circuit = service.circuit
        return {
            "state": circuit.state,
            "open_until": circuit.open_until,
            "consecutive_failures": circuit.consecutive_failures,
            "calls": service.calls,
            "failures": service.failures,
            "opened": circuit.opened,
            "in_flight": service.gate.in_flight,
            "waiting": len(service.waiting),
        }
