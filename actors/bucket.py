"""The one token bucket, and a service's gate built on it.

Three limits are token buckets: a user's submission rate (admission's, applied by the store to
the user's row), a service's call rate (the breaker's `Gate`, applied by the store to the
service's row) and a WebSocket connection's op rate. Each is a `TokenBucket` driven by
explicit times, so it is tested without a clock.

Refills leave float dust. A clock reading is exact only to its last bit (2.4e-7 s at 1.8e9
epoch seconds), so a caller that comes back exactly one token's time later may find 1 - 3e-7
of a token; and the token count itself rounds. Told to wait for such a shortfall, the caller
would come back at the same float instant, or one indistinguishable from it, and be told
again, for ever (a breaker spinning in place, a client told `retry_after` 0). A shortfall that
small is rounding: the token is granted.
"""

from __future__ import annotations

import math

from jobwarden.config import ServiceSection

# A shortfall below this many tokens is rounding in the token count, whatever the clock.
TOKEN_SLACK = 1e-9
# A wait within this many units in the last place of the clock reading is rounding in the
# readings: the two a refill spans (this one and the last) may each be off by one.
CLOCK_SLACK_ULPS = 2


class TokenBucket:
    """`burst` tokens, refilled at `rate` a second; each take spends one.

    `rate` and `burst` may change between takes (a user slowed or re-rated, a reload): the
    refill since the last take runs at the rate in force at this one.
    """

    def __init__(self, *, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.updated = now

    def take(self, now: float) -> float:
        """Spend a token: 0.0 when one was there, else the seconds until one is back (always
        long enough to move a clock that reads `now`)."""
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        shortfall = 1 - self.tokens
        if shortfall > TOKEN_SLACK:
            wait = shortfall / self.rate
            if wait > CLOCK_SLACK_ULPS * math.ulp(now):
                return wait
        self.tokens -= 1
        return 0.0

    def full(self, now: float) -> bool:
        """Full by `now`: the same as a new bucket, so it may be dropped."""
        return self.tokens + (now - self.updated) * self.rate >= self.burst


class Gate:
    """A service's concurrency limit and rate limit, as plain code over explicit (wall) times.
    The store applies it to every daemon's calls in flight (`in_flight`) and to the service's
    stored bucket, in the transaction that takes a call's place."""

    def __init__(self, spec: ServiceSection, now: float) -> None:
        self.max_concurrent = spec.max_concurrent or math.inf
        # A burst of up to one second's worth of calls (at least one).
        self.bucket = (
            None
            if spec.rate is None
            else TokenBucket(rate=spec.rate, burst=max(1.0, spec.rate), now=now)
        )
        self.in_flight = 0

    def try_take(self, now: float) -> float | None:
        """None: taken. A number: the trio time at which to try again."""
        if self.in_flight >= self.max_concurrent:
            return math.inf  # a Done frees a slot and wakes the queue
        if self.bucket is not None:
            wait = self.bucket.take(now)
            if wait:
                return now + wait
        self.in_flight += 1
        return None
