"""SystemdNotifier against a fake NOTIFY_SOCKET: exact datagrams, no-op mode, watchdog pacing,
and the drain asking systemd to wait for its grace."""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog.testing
import trio

from jobwarden.process.admin import Stop
from jobwarden.process.supervisor import STOP_AFTER_GRACE
from jobwarden.process.systemd import SystemdNotifier
from tests.conftest import BASE_CONFIG, NO_LIMITS


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A bound datagram socket standing in for systemd, and its NOTIFY_SOCKET value."""
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.setblocking(False)
        yield sock, path


def queued_datagrams(sock: socket.socket) -> list[bytes]:
    """Everything already delivered; the sends are synchronous, so nothing is in flight."""
    datagrams = []
    while True:
        try:
            datagrams.append(sock.recv(4096))
        except BlockingIOError:
            return datagrams


def test_ready_status_stopping_send_exact_datagrams(notify_socket):
    sock, path = notify_socket
    notifier = SystemdNotifier.from_environ({"NOTIFY_SOCKET": path})

    notifier.ready("serving 3 kinds")
    notifier.status("draining 2 jobs")
    notifier.stopping("shutting down", expected_seconds=120.5)
    notifier.notify(STATUS="two\nlines")

    assert notifier.enabled
    assert queued_datagrams(sock) == [
        b"READY=1\nSTATUS=serving 3 kinds\n",
        b"STATUS=draining 2 jobs\n",
        b"STOPPING=1\nSTATUS=shutting down\nEXTEND_TIMEOUT_USEC=120500000\n",
        b"STATUS=two lines\n",
    ]


def test_reloading_carries_the_monotonic_timestamp(notify_socket):
    sock, path = notify_socket
    notifier = SystemdNotifier.from_environ({"NOTIFY_SOCKET": path})

    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notifier.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000

    [datagram] = queued_datagrams(sock)
    reloading, monotonic, trailer = datagram.decode().split("\n")
    assert reloading == "RELOADING=1"
    key, usec = monotonic.split("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(usec) <= after
    assert trailer == ""


def test_abstract_namespace_socket():
    name = f"jobwarden-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.setblocking(False)
        notifier = SystemdNotifier.from_environ({"NOTIFY_SOCKET": "@" + name})

        notifier.ready("up")

        assert queued_datagrams(sock) == [b"READY=1\nSTATUS=up\n"]


async def test_disabled_without_notify_socket_is_a_no_op():
    notifier = SystemdNotifier.from_environ({"WATCHDOG_USEC": "2000000"})

    notifier.ready("up")
    notifier.status("busy")
    notifier.stopping("bye", expected_seconds=1)
    notifier.reloading()
    with trio.fail_after(1):  # the no-watchdog path returns immediately, never sleeps
        await notifier.run_watchdog()

    assert not notifier.enabled
    assert notifier.watchdog_interval is None


def test_send_failure_is_logged_not_raised(tmp_path):
    notifier = SystemdNotifier.from_environ({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})

    with structlog.testing.capture_logs() as logs:
        notifier.ready("up")

    [entry] = logs
    assert entry["event"] == "sd_notify_failed"
    assert entry["log_level"] == "warning"


async def test_watchdog_pings_every_half_deadline(notify_socket, autojump_clock):
    sock, path = notify_socket
    notifier = SystemdNotifier.from_environ(
        {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}
    )
    assert notifier.watchdog_interval == 1.0

    ping_times = []
    real_notify = notifier.notify

    def notify_and_record(**fields: object) -> None:
        ping_times.append(trio.current_time())
        real_notify(**fields)

    notifier.notify = notify_and_record
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        with trio.move_on_after(5.5):
            await nursery.start(notifier.run_watchdog)
            await trio.sleep_forever()
        nursery.cancel_scope.cancel()

    assert queued_datagrams(sock) == [b"WATCHDOG=1\n"] * 5
    assert [round(t - start, 6) for t in ping_times] == [1.0, 2.0, 3.0, 4.0, 5.0]


@pytest.mark.parametrize(
    "watchdog_env",
    [
        {"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid() + 1)},
        {"WATCHDOG_USEC": "0"},
        {"WATCHDOG_USEC": "soon"},
        {},
    ],
    ids=["another-pid", "zero", "garbage", "unset"],
)
async def test_no_watchdog_returns_at_once(notify_socket, watchdog_env):
    sock, path = notify_socket
    notifier = SystemdNotifier.from_environ({"NOTIFY_SOCKET": path, **watchdog_env})

    assert notifier.watchdog_interval is None
    with trio.fail_after(1):
        async with trio.open_nursery() as nursery:
            await nursery.start(notifier.run_watchdog)

    assert queued_datagrams(sock) == []


async def test_a_drain_longer_than_the_stop_timeout_asks_systemd_to_wait(
    autojump_clock, start_daemon, notify_socket, tmp_path
):
    # systemd/jobwarden.service gives a stop 90 s; this drain may take 10 minutes.
    sock, path = notify_socket
    config = tmp_path / "config.toml"
    config.write_text(
        BASE_CONFIG.format(max_concurrent_jobs=2).replace(
            'shutdown_grace = "30s"', 'shutdown_grace = "10m"'
        )
        + NO_LIMITS
        + '[kinds.hang]\nhandler = "tests.handlers:hang"\n'
    )
    daemon = await start_daemon(
        config_path=config, notifier=SystemdNotifier.from_environ({"NOTIFY_SOCKET": path})
    )
    job = await daemon.submit("hang")
    await daemon.wait_status(job.id, {"running"})
    queued_datagrams(sock)  # READY=1 and the status lines

    # SIGTERM from systemd's stop sends the same Stop.
    stop_requested = trio.current_time()
    await daemon.handle.control.send(Stop())
    await daemon.stopped.wait()

    wait_usec = int((600 + STOP_AFTER_GRACE) * 1_000_000)
    assert queued_datagrams(sock)[0] == (
        f"STOPPING=1\nSTATUS=draining, grace 600s\nEXTEND_TIMEOUT_USEC={wait_usec}\n".encode()
    )
    # The daemon used the time it asked for: the job ran its whole grace, then went back to
    # the queue without spending its attempt.
    assert trio.current_time() - stop_requested == pytest.approx(600)
    assert (await daemon.job(job.id)).status == "queued"
