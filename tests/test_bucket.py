"""The one token bucket, on plain float times: its refill, and the float dust a refill leaves,
at the clock and the rate of each of its users (admission, the breaker's gate, a WebSocket
connection)."""

from __future__ import annotations

import random

import pytest

from jobwarden.actors.bucket import Gate, TokenBucket
from jobwarden.config import ServiceSection, parse_rate
from tests.conftest import EPOCH

# trio's clock in production starts at a random offset of 10,000 to 200,000 s.
TRIO_ORIGIN = 150_000.0


def test_a_bucket_refills_at_its_rate_up_to_its_burst():
    bucket = TokenBucket(rate=1.0, burst=2, now=0.0)
    assert bucket.take(0.0) == 0.0
    assert bucket.take(0.0) == 0.0
    assert bucket.take(0.5) == pytest.approx(0.5)
    assert not bucket.full(1.0)
    assert bucket.take(100.0) == 0.0
    assert bucket.tokens == pytest.approx(1.0)
    assert bucket.full(101.0)


@pytest.mark.parametrize(
    ("origin", "rate", "burst"),
    [
        pytest.param(EPOCH, parse_rate("100/min"), 1, id="admission on the wall clock"),
        pytest.param(EPOCH, parse_rate("7/min"), 10, id="admission, a slowed user"),
        pytest.param(TRIO_ORIGIN, parse_rate("100/min"), 1.67, id="breaker on trio's clock"),
        pytest.param(0.0, parse_rate("3/s"), 3, id="websocket on a MockClock"),
        pytest.param(TRIO_ORIGIN, 100.0, 100, id="websocket on trio's clock"),
    ],
)
def test_taking_at_exactly_the_rate_never_waits_for_float_dust(origin, rate, burst):
    # A caller that comes back exactly one token's time later finds the refill short by
    # rounding (1e-7 of a token at epoch seconds). Told to wait for that, it would come back
    # at the same float instant and be told again: the token is granted instead.
    bucket = TokenBucket(rate=rate, burst=burst, now=origin)
    while bucket.tokens >= 1:
        assert bucket.take(origin) == 0.0
    elapsed = 0.0
    for _ in range(1000):
        elapsed += 1 / rate
        assert bucket.take(origin + elapsed) == 0.0


@pytest.mark.parametrize("origin", [0.0, TRIO_ORIGIN, EPOCH], ids=["mock", "trio", "wall"])
def test_every_wait_moves_the_clock_it_was_asked_on(origin):
    rng = random.Random(7)
    for _ in range(10_000):
        rate = rng.choice([parse_rate("1/h"), parse_rate("100/min"), 3.0, 1000.0])
        now = origin + rng.uniform(0, 10_000)
        bucket = TokenBucket(rate=rate, burst=1, now=now)
        bucket.tokens = 1 - 10 ** rng.uniform(-16, -1)
        wait = bucket.take(now)
        assert wait == 0.0 or now + wait > now


def test_a_gate_grants_a_token_short_only_by_rounding():
    # The load test found this: a wait for 1e-13 of a token cannot move a clock reading
    # thousands of seconds, so "try again then" spun the breaker at the same instant.
    gate = Gate(ServiceSection(rate=parse_rate("100/min")), now=2760.123)
    assert gate.bucket is not None
    gate.bucket.tokens = 1 - 1e-13
    assert gate.try_take(2760.123) is None
