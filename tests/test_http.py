"""The HTTP listener: probes, the health snapshot, Prometheus text (every configured series from
the start, ratios, the process collector, failures by code, spend against the budget, how long
a circuit has been open); and the alert hook."""

from __future__ import annotations

import json
import socket
import sys

import pytest
import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from jobwarden.actors.messages import BreakerReset, BreakerTrip
from jobwarden.config import HttpSection
from jobwarden.errors import RequestError
from jobwarden.mailbox import ReplySlot
from jobwarden.metrics import OUTCOMES, RULES, Metrics
from jobwarden.process.admin import Stop
from jobwarden.process.commands import OPERATOR, Caller, Refusals
from jobwarden.process.http.app import Context
from jobwarden.process.http.events import EventStream
from jobwarden.process.supervisor import Reload
from jobwarden.wire.views import STATUSES, Event
from tests.conftest import BASE_CONFIG, NO_LIMITS

pytestmark = pytest.mark.both_stores

KINDS = """
[services.paid]
price_usd = 0.5

[budget]
daily_usd = 100

[kinds.quick]
handler = "tests.handlers:sleepy"

[kinds.hang]
handler = "tests.handlers:hang"
"""


async def get(port: int, path: str) -> tuple[int, bytes]:
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            response = b""
            async for chunk in stream:
                response += chunk
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(port: int) -> Samples:
    """/metrics as {(sample name, sorted labels): value}."""
    status, body = await get(port, "/metrics")
    assert status == 200
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


async def test_probes_health_and_metrics(start_daemon):
    daemon = await start_daemon(KINDS)
    for n in range(3):
        await daemon.wait_done((await daemon.submit("quick", {"fail": n == 0})).id)
    port = daemon.handle.http_port

    assert await get(port, "/healthz") == (200, b'{"ok":true}\n')
    status, body = await get(port, "/readyz")
    assert (status, json.loads(body)) == (200, {"ready": True, "problems": []})

    status, body = await get(port, "/health")
    health = json.loads(body)
    assert status == 200
    assert health["jobs"] == {"queued": 0, "running": 0, "done": 2, "failed": 1, "canceled": 0}
    assert health["max_concurrent_jobs"] == 2
    assert health["system"]["memory_total_gb"] > 0
    assert {"version", "uptime", "queue_depth", "oldest_queued_seconds", "stuck"} <= set(health)

    samples = await scrape(port)
    assert samples[("jobwarden_jobs", (("kind", "quick"), ("status", "done")))] == 2
    outcome_done = (("kind", "quick"), ("outcome", "done"))
    assert samples[("jobwarden_jobs_processed_total", outcome_done)] == 2
    assert samples[("jobwarden_job_duration_seconds_count", (("kind", "quick"),))] == 3
    assert (
        "jobwarden_request_duration_seconds_count",
        (("cmd", "/health"), ("listener", "http")),
    ) in samples

    assert samples[("jobwarden_breaker_state", (("service", "paid"),))] == 0
    assert samples[("jobwarden_budget_remaining_usd", ())] == 100
    assert health["budget"]["daily_usd"] == 100
    assert health["breakers"]["paid"]["state"] == "closed"

    assert (await get(port, "/nope"))[0] == 404


async def test_readyz_is_503_while_draining(start_daemon):
    daemon = await start_daemon(KINDS)
    job = await daemon.submit("hang")
    await daemon.wait_status(job.id, {"running"})
    await daemon.handle.control.send(Stop(grace=30))
    with trio.fail_after(10):
        while True:
            status, body = await get(daemon.handle.http_port, "/readyz")
            if status == 503:
                break
            await trio.sleep(0)
    assert json.loads(body)["problems"] == ["draining"]
    assert (await get(daemon.handle.http_port, "/healthz"))[0] == 200


async def test_alert_command_gets_the_alert_as_json(start_daemon, tmp_path):
    inbox = tmp_path / "alerts.sock"
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await listener.bind(str(inbox))
    listener.listen(1)
    forward = (
        "import socket, sys; s = socket.socket(socket.AF_UNIX); "
        f"s.connect({str(inbox)!r}); s.sendall(sys.stdin.buffer.read())"
    )
    config = (
        KINDS
        + f"""
[monitor]
interval = "100ms"
failure_min_jobs = 3
failure_rate_alert = 0.2
alert_command = [{json.dumps(sys.executable)}, "-c", {json.dumps(forward)}]
"""
    )
    daemon = await start_daemon(config)
    for _ in range(3):
        await daemon.wait_done((await daemon.submit("quick", {"fail": True})).id)
    with trio.fail_after(10):
        connection, _ = await listener.accept()
        received = b""
        while chunk := await connection.recv(65536):
            received += chunk
    alert = json.loads(received)
    assert alert["alert"] == "failure_rate"
    assert alert["finished"] == 3 and alert["rate"] == 1.0
    assert "3 jobs failed" in alert["message"]


async def test_slow_requests_are_logged_with_their_duration(autojump_clock, nursery):
    from jobwarden.process.http import HttpServer

    class SlowCommands:
        async def health(self, *, by_kind: bool = False) -> dict:
            await trio.sleep(6)  # virtual: the clock jumps while nothing else can run
            return {"slow": True}

    server = HttpServer(
        listen="127.0.0.1:0",
        store=None,  # /health never touches the store
        commands=SlowCommands(),
        metrics=Metrics(),
        daemon_status=dict,
        slow_request=1.0,
        very_slow_request=5.0,
    )
    port = await nursery.start(server.run)
    with capture_logs() as logs:
        status, body = await get(port, "/health")
    assert (status, json.loads(body)) == (200, {"slow": True})
    slow = [entry for entry in logs if "slow request" in entry["event"]]
    assert [(e["event"], e["path"], e["duration"]) for e in slow] == [
        ("very slow request", "/health", 6.0)
    ]


def test_every_listener_logs_slow_requests_by_the_field_that_names_them():
    metrics = Metrics()
    with capture_logs() as logs:
        metrics.request_done("websocket", 0.5, (1.0, 5.0), op="submit")
        metrics.request_done("websocket", 2.0, (1.0, 5.0), op="watch")
        metrics.request_done("admin", 7.0, (1.0, 5.0), cmd="jobs")
    assert [(e["event"], e.get("op") or e.get("cmd"), e["duration"]) for e in logs] == [
        ("slow request", "watch", 2.0),
        ("very slow request", "jobs", 7.0),
    ]
    text = metrics.render().decode()
    assert 'jobwarden_request_duration_seconds_count{cmd="submit",listener="websocket"} 1.0' in text


async def test_every_configured_series_is_there_from_the_start(start_daemon):
    daemon = await start_daemon(KINDS)
    samples = await scrape(daemon.handle.http_port)

    for kind in ("quick", "hang"):
        assert samples[("jobwarden_queue_depth", (("kind", kind),))] == 0
        for status in STATUSES:
            assert samples[("jobwarden_jobs", (("kind", kind), ("status", status)))] == 0
        for outcome in OUTCOMES:
            labels = (("kind", kind), ("outcome", outcome))
            assert samples[("jobwarden_jobs_processed_total", labels)] == 0
        assert samples[("jobwarden_job_retries_total", (("kind", kind),))] == 0
        assert samples[("jobwarden_job_duration_seconds_count", (("kind", kind),))] == 0
    for rule in RULES:
        assert samples[("jobwarden_stuck_recovered_total", (("rule", rule),))] == 0
    assert samples[("jobwarden_spend_usd_total", (("service", "paid"),))] == 0
    assert samples[("jobwarden_breaker_recovery_seconds", (("service", "paid"),))] == 60
    assert samples[("jobwarden_breaker_not_closed_seconds", (("service", "paid"),))] == 0
    # Shares as 0-1 ratios, from the machine the test imagines (20% memory, 5% CPU).
    assert samples[("jobwarden_memory_used_ratio", ())] == 0.2
    assert samples[("jobwarden_cpu_used_ratio", ())] == 0.05
    assert not [name for name, _ in samples if "percent" in name]
    # The process collector: the daemon's own memory, CPU and file descriptors.
    assert samples[("process_resident_memory_bytes", ())] > 0
    assert samples[("process_open_fds", ())] > 0
    assert ("process_cpu_seconds_total", ()) in samples


async def test_a_reload_gives_a_new_kind_its_series(start_daemon, tmp_path):
    base = BASE_CONFIG.format(max_concurrent_jobs=2) + NO_LIMITS
    config = tmp_path / "config.toml"
    config.write_text(base + '[kinds.quick]\nhandler = "tests.handlers:sleepy"\n')
    daemon = await start_daemon(config_path=config)
    assert ("jobwarden_queue_depth", (("kind", "later"),)) not in await scrape(
        daemon.handle.http_port
    )

    config.write_text(config.read_text() + '[kinds.later]\nhandler = "tests.handlers:sleepy"\n')
    await daemon.handle.control.send(Reload())
    await trio.testing.wait_all_tasks_blocked()

    samples = await scrape(daemon.handle.http_port)
    assert samples[("jobwarden_queue_depth", (("kind", "later"),))] == 0
    labels = (("kind", "later"), ("outcome", "done"))
    assert samples[("jobwarden_jobs_processed_total", labels)] == 0


async def test_failures_are_counted_by_their_code(start_daemon):
    daemon = await start_daemon(KINDS)
    for fail in (True, False, True):
        await daemon.wait_done((await daemon.submit("quick", {"fail": fail})).id)

    samples = await scrape(daemon.handle.http_port)
    failed = (("code", "TEST_FAILURE"), ("kind", "quick"))
    assert samples[("jobwarden_jobs_failed_total", failed)] == 2
    labels = (("kind", "quick"), ("outcome", "failed"))
    assert samples[("jobwarden_jobs_processed_total", labels)] == 2


async def test_spend_is_shown_against_the_budget(start_daemon):
    daemon = await start_daemon(KINDS + '[kinds.caller]\nhandler = "tests.handlers:call_service"\n')
    for _ in range(3):
        job = await daemon.submit("caller", {"service": "paid", "seconds": 0})
        assert (await daemon.wait_done(job.id)).status == "done"

    samples = await scrape(daemon.handle.http_port)
    assert samples[("jobwarden_spend_usd_total", (("service", "paid"),))] == 1.5
    assert samples[("jobwarden_budget_spent_usd", (("period", "day"),))] == 1.5
    assert samples[("jobwarden_budget_limit_usd", (("period", "day"),))] == 100
    assert samples[("jobwarden_budget_used_ratio", (("period", "day"),))] == 0.015
    assert samples[("jobwarden_budget_limit_usd", (("period", "month"),))] == 10000
    assert samples[("jobwarden_budget_stopped", ())] == 0


async def test_how_long_a_circuit_has_not_been_closed(mock_clock, start_daemon):
    # The clock moves only when the test jumps it, so the scrapes' real sockets are safe.
    daemon = await start_daemon(KINDS)
    port = daemon.handle.http_port
    paid = (("service", "paid"),)

    async def ask_breaker(message: type[BreakerTrip] | type[BreakerReset]) -> None:
        reply: ReplySlot[dict] = ReplySlot()
        await daemon.handle.breaker.send(message(service="paid", reply=reply))
        await reply.wait()

    await ask_breaker(BreakerTrip)
    samples = await scrape(port)
    assert samples[("jobwarden_breaker_state", paid)] == 2
    assert samples[("jobwarden_breaker_not_closed_seconds", paid)] == 0
    mock_clock.jump(90)
    # Past its 60 s recovery: what docs/prometheus/alerts.yml's JobwardenBreakerOpen fires on.
    assert (await scrape(port))[("jobwarden_breaker_not_closed_seconds", paid)] == 90

    await ask_breaker(BreakerReset)
    samples = await scrape(port)
    assert samples[("jobwarden_breaker_not_closed_seconds", paid)] == 0
    assert samples[("jobwarden_breaker_state", paid)] == 0


async def test_waiting_for_a_job_ends_when_it_is_final_or_at_the_timeout(
    autojump_clock, start_daemon
):
    daemon = await start_daemon(KINDS)
    commands = daemon.commands
    job = await daemon.submit("hang")

    started = trio.current_time()
    waited = await commands.wait_final(OPERATOR, job.id, timeout=30)
    assert (waited.status, trio.current_time() - started) == ("running", 30)

    async def cancel_in(seconds: float) -> None:
        await trio.sleep(seconds)
        await commands.cancel(OPERATOR, job.id)

    started = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(cancel_in, 5)
        waited = await commands.wait_final(OPERATOR, job.id, timeout=30)
    assert waited.status == "canceled"
    assert 5 <= trio.current_time() - started < 6

    # Final already: no wait at all. Someone else's job: as absent as one that never was.
    started = trio.current_time()
    assert (await commands.wait_final(OPERATOR, job.id, timeout=30)).status == "canceled"
    assert trio.current_time() == started
    with pytest.raises(RequestError, match=f"no job {job.id}"):
        await commands.wait_final(Caller(user="mallory"), job.id, timeout=30)


async def test_an_event_stream_read_too_slowly_is_told_to_resync(start_daemon):
    daemon = await start_daemon(KINDS)
    handle = daemon.handle
    commands = daemon.commands
    context = Context(
        store=handle.store,
        commands=commands,
        metrics=Metrics(),
        settings=HttpSection(queue=2),
        daemon_status=dict,
        slow=(60.0, 60.0),
        refusals=Refusals("http", Metrics()),
    )
    client_reads = trio.Event()
    received: list[bytes] = []

    async def send(message: dict) -> None:
        if message.get("body"):
            await client_reads.wait()  # a client that stopped reading: the socket is full
        received.append(message.get("body", b""))

    async def receive() -> dict:
        await trio.sleep_forever()

    job = 999_999  # no stored events: everything comes live from the hub
    stream = EventStream(context, OPERATOR, job, since=0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(stream, {"type": "http"}, receive, send)
        await trio.testing.wait_all_tasks_blocked()
        for seq in range(1, 6):
            handle.hub.publish(
                [Event(seq=seq, job=job, user="u", kind="quick", type="progress", at=0, data={})]
            )
            await trio.testing.wait_all_tasks_blocked()
        client_reads.set()
    frames = b"".join(received).decode().strip().split("\n\n")
    # The first event was being written when the rest came: two fit the buffer, two did not.
    assert [frame.splitlines()[0] for frame in frames] == ["id: 1", "id: 2", "id: 3", "id: 3"]
    assert frames[-1] == 'id: 3\nevent: resync\ndata: {"since": 3}'


async def test_a_request_that_fails_is_a_500_with_its_error_id_and_the_listener_goes_on(nursery):
    from jobwarden.process.http import HttpServer

    class BrokenCommands:
        async def health(self, *, by_kind: bool = False) -> dict:
            raise RuntimeError("the snapshot broke")

    server = HttpServer(
        listen="127.0.0.1:0",
        store=None,  # neither /health nor /healthz touches the store
        commands=BrokenCommands(),
        metrics=Metrics(),
        daemon_status=dict,
        slow_request=60.0,
        very_slow_request=60.0,
    )
    port = await nursery.start(server.run)
    with capture_logs() as logs:
        status, body = await get(port, "/health")
        # The listener goes on; and by now the failed request's handling is over.
        assert await get(port, "/healthz") == (200, b'{"ok":true}\n')
    error = json.loads(body)
    assert (status, error["code"], error["technical_message"]) == (
        500,
        "INTERNAL",
        "the snapshot broke",
    )
    # Logged once, by the error's id.
    failures = [entry for entry in logs if entry["log_level"] == "error"]
    assert [(e["event"], e["error_id"]) for e in failures] == [
        ("request failed", error["error_id"])
    ]
