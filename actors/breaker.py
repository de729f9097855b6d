"""Breaker: one circuit per external service, and the service's concurrency and rate limits.

Consumes `Permit`, `Withdraw` and `CallDone` from jobs calling through ctx.call,
`BreakerReset`/`BreakerTrip`/`BreakerSnapshot` from the admin socket, `Reconfigure` from the
supervisor. Produces `ServiceState` for the scheduler (which holds jobs whose kind needs an open
service) and alerts for the monitor.

Each service has a `Circuit` (actors/circuit.py: when calls are refused, when probes go) and,
if it has limits, a `Gate` (actors/bucket.py: its concurrency and rate limits), which the store
applies to every daemon's calls in flight and the one rate bucket (`take_call_slot`); permits
wait in order until both let them through. Open circuits are stored, so a restart does not
hammer a provider that was down.

Every daemon on the database shares each circuit's state through its row. Before it grants
waiting permits, the breaker reads the rows and takes up a change another daemon made since
its own last one (opened: calls here fail fast too; closed: a reset or a probe's success). A
half-open circuit's probes go from one daemon only: the one whose `take_probe` update found the
probe free (or its holder's probe deadline past); the others refuse calls meanwhile, as a
half-open circuit refuses calls beyond its probes. Failures are counted by each daemon for the
calls it makes. A call's place under the limits is a row held until the call ends, or until
its lease (the service's timeout and `SLOT_SLACK`) runs out if its daemon died; a daemon whose
calls wait for a place another daemon holds tries again every `SLOT_RETRY`.
"""

from __future__ import annotations

import itertools
import math
import uuid
from collections import deque
from functools import partial
from typing import Any

import structlog
import trio

from jobwarden.actors.bucket import Gate
from jobwarden.actors.circuit import Circuit, State
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
from jobwarden.config import Config, ServiceSection, format_duration
from jobwarden.errors import RequestError, ServiceUnavailable, StoreError
from jobwarden.mailbox import ReplySlot, receive_by
from jobwarden.store import Engine
from jobwarden.store.breakers import (
    CallSlot,
    load_breakers,
    release_call_slot,
    save_breaker,
    take_call_slot,
    take_probe,
)

log = structlog.get_logger("breaker")

# A call's place under its service's limits outlives the call's timeout by this much before a
# daemon that died holding it is taken to have died.
SLOT_SLACK = 30.0
# A call that waits for a place another daemon holds looks again this often: that daemon's
# call ending does not message this one.
SLOT_RETRY = 1.0


class _Service:
    def __init__(self, name: str, spec: ServiceSection) -> None:
        self.name = name
        self.spec = spec
        self.circuit = Circuit(spec.breaker, spec.timeout)
        self.waiting: deque[tuple[Permit, int]] = deque()
        # Permits granted whose call has not reported Done, by token id.
        self.granted: dict[int, tuple[ReplySlot[Token], Token]] = {}
        # The place each granted call holds under the service's limits, by token id.
        self.slots: dict[int, int] = {}
        self.retry_at = math.inf
        self.calls = 0
        self.failures = 0
        # The stored circuit's version this daemon last wrote or took up.
        self.seen_version = 0

    def reconfigure(self, spec: ServiceSection) -> None:
        self.spec = spec
        self.circuit.spec = spec.breaker
        self.circuit.probe_timeout = spec.timeout

    @property
    def limited(self) -> bool:
        return self.spec.max_concurrent is not None or self.spec.rate is not None


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
        # Names this daemon as a half-open circuit's prober in the store.
        self._holder = uuid.uuid4().hex

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        stored = await self._store.read(load_breakers)
        self._build(self._config)
        for name, circuit in stored.items():
            service = self._services.get(name)
            if service is None:
                continue
            service.seen_version = circuit.version
            if circuit.state != "closed" and circuit.open_until is not None:
                # Down when we stopped: stay open for the rest of its recovery time.
                service.circuit.state = "open"
                service.circuit.open_until = circuit.open_until
                log.info("breaker restored open", service=name, until=circuit.open_until)
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
        services = {}
        for name, spec in config.services.items():
            existing = self._services.get(name)
            if existing is None:
                services[name] = _Service(name, spec)
            else:
                existing.reconfigure(spec)
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
                self._release(service, token.id)
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
                await self._follow_stored()
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
                self._release(service, token_id)
                if token.probe:
                    service.circuit.abandon(token_id)
                return

    async def _operator(self, msg: BreakerReset | BreakerTrip) -> None:
        service = self._services.get(msg.service)
        if service is None:
            known = ", ".join(sorted(self._services)) or "none"
            msg.reply.fail(RequestError("NOT_FOUND", f"no service '{msg.service}' ({known})"))
            return
        # What another daemon decided first: a reset here of a circuit tripped there must
        # change (and write) the stored state, not this daemon's stale copy of it.
        await self._follow_stored()
        before = service.circuit.state
        if isinstance(msg, BreakerReset):
            service.circuit.reset(self._clock.now())
        else:
            service.circuit.trip(self._clock.now())
        log.warning("breaker set by an operator", service=msg.service, action=type(msg).__name__)
        await self._changed(service, before)
        msg.reply.set(self._view(service))

    async def _follow_stored(self) -> None:
        """Take up what another daemon decided for a circuit since this one last wrote or
        read it: calls here then fail fast too, or flow again."""
        stored = await self._store.read(load_breakers)
        now = self._clock.now()
        for name, circuit in stored.items():
            service = self._services.get(name)
            if service is None or circuit.version <= service.seen_version:
                continue
            service.seen_version = circuit.version
            before = service.circuit.state
            if circuit.state != before:
                service.circuit.adopt(circuit.state, circuit.open_until, now)  # type: ignore[arg-type]
                await self._changed(service, before, ours=False)

    async def _may_probe(self, service: _Service, now: float) -> bool:
        """Whether this daemon holds the half-open circuit's probe in the store."""
        take = partial(
            take_probe,
            service=service.name,
            holder=self._holder,
            until=now + service.spec.timeout,
            now=now,
        )
        try:
            return await self._store.write(take)
        except StoreError:
            return False  # unknown who probes: refused, as a call beyond the probes is

    async def _take_slot(self, service: _Service, now: float) -> CallSlot:
        """A place for one call under the service's limits, as every daemon's calls stand."""
        spec = service.spec
        take = partial(
            take_call_slot,
            service=service.name,
            limits=Gate(spec, now),
            holder=self._holder,
            now=now,
            expires_at=now + spec.timeout + SLOT_SLACK,
        )
        try:
            return await self._store.write(take)
        except StoreError:
            return CallSlot(None, now + SLOT_RETRY)

    def _release(self, service: _Service, token_id: int) -> None:
        """A granted call ended or was given up: its place is free for any daemon."""
        slot = service.slots.pop(token_id, None)
        if slot is not None:
            # Kept through a store fault: until then, the place's lease holds it.
            self._store.hand_over(partial(release_call_slot, slot=slot), keep=True)

    async def _advance(self) -> None:
        """Expire probes, move open circuits on, and grant what the gates allow now."""
        if any(service.waiting for service in self._services.values()):
            await self._follow_stored()
        now = self._clock.now()
        for service in self._services.values():
            before = service.circuit.state
            service.circuit.advance(now)
            await self._changed(service, before)
            service.retry_at = math.inf
            while service.waiting:
                permit, permit_id = service.waiting[0]
                decision = service.circuit.admit(now, permit_id)
                probe = decision is not None and service.circuit.state == "half_open"
                if probe and not await self._may_probe(service, now):
                    # Another daemon probes the service: its verdict comes through the row.
                    service.circuit.abandon(permit_id)
                    decision = None
                if decision is None:
                    service.waiting.popleft()
                    permit.reply.fail(ServiceUnavailable(service.name, service.circuit.open_until))
                    continue
                slot = await self._take_slot(service, now) if service.limited else None
                if slot is not None and slot.id is None:
                    if service.circuit.state == "half_open":
                        service.circuit.abandon(permit_id)
                    # A token comes back at a known time. A place this daemon's own calls
                    # hold frees with their CallDone; one another daemon holds, only a look
                    # at the store finds free.
                    retry_at = slot.retry_at
                    if retry_at is None or math.isinf(retry_at):
                        retry_at = now + SLOT_RETRY
                    service.retry_at = self._clock.deadline_for(retry_at)
                    break
                service.waiting.popleft()
                if slot is not None and slot.id is not None:
                    service.slots[permit_id] = slot.id
                token = Token(service.name, permit_id, probe=service.circuit.state == "half_open")
                service.granted[permit_id] = (permit.reply, token)
                permit.reply.set(token)

    async def _changed(self, service: _Service, before: State, *, ours: bool = True) -> None:
        """A circuit changed: logged and told to the scheduler; stored (with an alert when it
        opened) if this daemon decided it, rather than took it up from the row."""
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
            decided_here=ours,
        )
        if ours:
            service.seen_change = now
            # Kept while the store takes no writes: the latest state is written when it does.
            await self._store.write_or_keep(
                partial(save_breaker, service=service.name, state=after, open_until=until, now=now),
                key=("breaker", service.name),
            )
        await self._tell_scheduler(service)
        if after == "open" and ours:
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
            "in_flight": len(service.granted),
            "waiting": len(service.waiting),
        }
