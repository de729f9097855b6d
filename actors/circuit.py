"""The circuit of one external service: CLOSED, OPEN, HALF_OPEN, as plain code over explicit
times (the breaker actor drives it, stores its state, and takes up what other daemons on the
database decided).

CLOSED -> OPEN after `failures` consecutive failures, or an error rate above `error_rate`
over `window` once `min_calls` were seen. OPEN refuses at once until `recovery` has passed,
and then is HALF_OPEN by itself, call or no call (the breaker wakes at `open_until`), so what
it shows is true without traffic. HALF_OPEN lets `half_open_calls` probes through, each with
its own deadline (the service's timeout): a probe that neither succeeds nor fails by then
counts as a failure, so a hung probe cannot hold the circuit half-open forever. All probes
succeeding closes it; any failing reopens it.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Literal

from jobwarden.config import BreakerSpec

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
        """True: go ahead (as a probe if half-open). None: refused."""
        self.advance(now)
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

    def advance(self, now: float) -> None:
        """What time alone changes: a probe past its deadline reopens the circuit; an open
        circuit whose recovery time has passed is half-open."""
        if any(deadline <= now for deadline in self.probes.values()):
            self._open(now)
        if self.state == "open" and self.open_until is not None and now >= self.open_until:
            self._become("half_open", now)

    def next_deadline(self) -> float:
        """When `advance` next changes something: an open circuit's recovery ends, or a
        probe in flight runs out."""
        if self.state == "open" and self.open_until is not None:
            return self.open_until
        return min(self.probes.values(), default=math.inf)

    def adopt(self, state: State, open_until: float | None, now: float) -> None:
        """Take up a state another daemon decided: it opened the circuit, or closed it (a
        reset, its probes' success). An open one whose recovery time has passed is half-open."""
        self._become(state, now)
        self.open_until = None if state == "closed" else open_until
        self.advance(now)

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
