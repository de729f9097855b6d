"""Circuit breakers: exact transitions and timings, limits, scheduler holds, persistence."""

from __future__ import annotations

from functools import partial

import pytest
import trio

from jobwarden.actors.bucket import Gate
from jobwarden.actors.circuit import Circuit
from jobwarden.actors.messages import BreakerReset, BreakerSnapshot, BreakerTrip
from jobwarden.config import BreakerSpec, Duration, ServiceSection
from jobwarden.mailbox import ReplySlot
from jobwarden.store import jobs
from tests.conftest import EPOCH

pytestmark = pytest.mark.both_stores

SPEC = BreakerSpec(
    failures=5,
    error_rate=0.10,
    window=Duration(60),
    min_calls=20,
    recovery=Duration(60),
    half_open_calls=1,
)


def test_five_consecutive_failures_open_the_circuit_for_its_recovery_time():
    circuit = Circuit(SPEC, probe_timeout=20)
    for n in range(4):
        assert circuit.admit(100 + n, probe_id=n)
        circuit.record(100 + n, ok=False, probe_id=None)
    assert circuit.state == "closed"
    circuit.record(104, ok=False, probe_id=None)
    assert (circuit.state, circuit.open_until) == ("open", 164)
    assert circuit.admit(163.999, probe_id=9) is None
    # At the deadline one probe goes through, and only one.
    assert circuit.admit(164, probe_id=10) is True
    assert circuit.state == "half_open"
    assert circuit.admit(164, probe_id=11) is None
    circuit.record(170, ok=True, probe_id=10)
    assert (circuit.state, circuit.open_until) == ("closed", None)


def test_a_failed_probe_reopens_for_a_fresh_recovery_time():
    circuit = Circuit(SPEC, probe_timeout=20)
    circuit.trip(0)
    assert circuit.admit(60, probe_id=1)
    circuit.record(65, ok=False, probe_id=1)
    assert (circuit.state, circuit.open_until) == ("open", 125)


def test_a_hung_probe_cannot_hold_the_circuit_half_open():
    circuit = Circuit(SPEC, probe_timeout=20)
    circuit.trip(0)
    assert circuit.next_deadline() == 60
    assert circuit.admit(60, probe_id=1)
    assert circuit.next_deadline() == 80
    assert circuit.admit(79, probe_id=2) is None
    # The probe never answered: at its deadline it counts as a failure.
    circuit.advance(80)
    assert (circuit.state, circuit.open_until) == ("open", 140)
    circuit.record(90, ok=True, probe_id=1)  # a late answer changes nothing
    assert circuit.state == "open"


def test_an_error_rate_over_the_window_trips_it_once_enough_calls_were_seen():
    circuit = Circuit(SPEC, probe_timeout=20)
    outcomes = [True] * 8 + [False] + [True] * 8 + [False] + [True]  # 19 calls, 2 failed
    for n, ok in enumerate(outcomes):
        circuit.record(n, ok=ok, probe_id=None)
    assert circuit.state == "closed"  # 10.5% failed, but fewer than min_calls
    circuit.record(19, ok=False, probe_id=None)  # 20 calls, 3 failed: 15% > 10%
    assert (circuit.state, circuit.open_until) == ("open", 79)


def test_old_calls_leave_the_window():
    circuit = Circuit(SPEC, probe_timeout=20)
    for n in range(19):
        circuit.record(n, ok=n % 4 != 0, probe_id=None)
    # 61 s later the early failures have left the window: 20 calls, 1 failed.
    for n in range(20):
        circuit.record(80 + n, ok=n != 0, probe_id=None)
    assert circuit.state == "closed"


def test_gate_limits_concurrency_and_rate():
    gate = Gate(ServiceSection(max_concurrent=2, rate=0.5), now=0)
    assert gate.try_take(0) is None
    # One token a second's worth of burst at 0.5/s: the next comes 2 s after the first.
    assert gate.try_take(0) == pytest.approx(2.0)
    assert gate.try_take(2.0) is None
    assert gate.try_take(4.0) == float("inf")  # two in flight: wait for a release
    gate.in_flight = 1  # one ended
    assert gate.try_take(4.0) is None


SERVICE_KINDS = """
[services.flaky]
price_usd = 0.01
timeout = "20s"
breaker = {{ failures = 3, recovery = "60s" }}
max_concurrent = {max_concurrent}

[kinds.caller]
handler = "tests.handlers:call_service"
timeout = "1h"
max_attempts = 1

[kinds.needs_flaky]
handler = "tests.handlers:call_service"
services = ["flaky"]
max_attempts = 1
"""


async def breakers(daemon) -> dict:
    reply = ReplySlot()
    await daemon.handle.breaker.send(BreakerSnapshot(reply=reply))
    return await reply.wait()


async def test_failures_open_the_circuit_and_later_calls_fail_fast(autojump_clock, start_daemon):
    daemon = await start_daemon(SERVICE_KINDS.format(max_concurrent=10), max_concurrent_jobs=1)
    failing = [await daemon.submit("caller", {"service": "flaky", "fail": True}) for _ in range(3)]
    for job in failing:
        assert (await daemon.wait_done(job.id)).error.code == "SERVICE_FAILED"
    state = await breakers(daemon)
    assert (state["flaky"]["state"], state["flaky"]["calls"]) == ("open", 3)
    changes = await daemon.handle.store.read(partial(jobs.events_since, since=0, job=0))
    assert [(e.type, e.data["service"], e.data["state"]) for e in changes] == [
        ("breaker", "flaky", "open")
    ]
    fast = await daemon.submit("caller", {"service": "flaky", "seconds": 5})
    final = await daemon.wait_done(fast.id)
    assert final.error.code == "SERVICE_UNAVAILABLE"
    # Refused at once: no 5 s call was made.
    assert final.finished_at == final.started_at
    assert (await breakers(daemon))["flaky"]["calls"] == 3


async def test_jobs_needing_an_open_service_wait_for_it(autojump_clock, start_daemon):
    daemon = await start_daemon(SERVICE_KINDS.format(max_concurrent=10))
    reply = ReplySlot()
    await daemon.handle.breaker.send(BreakerTrip(service="flaky", reply=reply))
    opened = await reply.wait()
    job = await daemon.submit("needs_flaky", {"service": "flaky", "seconds": 1})
    await trio.sleep(59)
    assert (await daemon.job(job.id)).status == "queued"
    final = await daemon.wait_done(job.id)
    # It started as the half-open probe the moment recovery ended, and closed the circuit.
    assert final.started_at == opened["open_until"]
    assert final.status == "done"
    assert (await breakers(daemon))["flaky"]["state"] == "closed"


async def test_concurrency_limit_holds_calls_back(autojump_clock, start_daemon):
    daemon = await start_daemon(SERVICE_KINDS.format(max_concurrent=2), max_concurrent_jobs=5)
    jobs = [await daemon.submit("caller", {"service": "flaky", "seconds": 10}) for _ in range(5)]
    finished = sorted([(await daemon.wait_done(job.id)).finished_at - EPOCH for job in jobs])
    assert finished == [10, 10, 20, 20, 30]


async def test_an_open_circuit_survives_a_restart(autojump_clock, start_daemon):
    daemon = await start_daemon(SERVICE_KINDS.format(max_concurrent=10))
    reply = ReplySlot()
    await daemon.handle.breaker.send(BreakerTrip(service="flaky", reply=reply))
    open_until = (await reply.wait())["open_until"]
    await trio.sleep(10)
    await daemon.stop(grace=0)
    again = await start_daemon(SERVICE_KINDS.format(max_concurrent=10))
    state = (await breakers(again))["flaky"]
    assert (state["state"], state["open_until"]) == ("open", open_until)
    reply = ReplySlot()
    await again.handle.breaker.send(BreakerReset(service="flaky", reply=reply))
    assert (await reply.wait())["state"] == "closed"


async def test_a_reload_keeps_waiting_calls_and_the_circuit(autojump_clock, start_daemon, tmp_path):
    from jobwarden.actors.messages import Reconfigure
    from tests.conftest import make_config

    daemon = await start_daemon(SERVICE_KINDS.format(max_concurrent=1), max_concurrent_jobs=3)
    jobs = [await daemon.submit("caller", {"service": "flaky", "seconds": 10}) for _ in range(3)]
    await trio.sleep(5)
    # One call runs, two wait for the single slot; at 5 s the reload raises the limit to 3
    # and the two waiting calls start at once.
    await daemon.handle.breaker.send(
        Reconfigure(config=make_config(tmp_path, SERVICE_KINDS.format(max_concurrent=3)))
    )
    finished = sorted([(await daemon.wait_done(job.id)).finished_at - EPOCH for job in jobs])
    assert finished == [10, 15, 15]


async def test_an_open_circuit_reads_half_open_once_its_recovery_has_passed(
    autojump_clock, start_daemon
):
    from jobwarden.actors.messages import HealthQuery
    from jobwarden.metrics import Metrics

    daemon = await start_daemon(SERVICE_KINDS.format(max_concurrent=10))
    reply = ReplySlot()
    await daemon.handle.breaker.send(BreakerTrip(service="flaky", reply=reply))
    open_until = (await reply.wait())["open_until"]
    # No call comes: the circuit is half-open (may be probed) the moment recovery ends.
    await trio.sleep(7 * 60)
    assert (await breakers(daemon))["flaky"]["state"] == "half_open"
    changes = await daemon.handle.store.read(partial(jobs.events_since, since=0, job=0))
    assert [(e.data["state"], e.at) for e in changes] == [
        ("open", open_until - 60),
        ("half_open", open_until),
    ]
    health: ReplySlot[dict] = ReplySlot()
    await daemon.handle.monitor.send(HealthQuery(reply=health, by_kind=True))
    snapshot = await health.wait()
    assert snapshot["breakers"]["flaky"]["state"] == "half_open"
    # The /metrics scrape renders the same snapshot.
    metrics = Metrics()
    metrics.set_state(snapshot, snapshot.pop("by_status_kind"), trio.current_time())
    assert b'jobwarden_breaker_state{service="flaky"} 1.0' in metrics.render()
