"""The supervisor: sd_notify messages, SIGHUP reload, signals, one daemon per database."""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

import pytest
import trio

from jobwarden.errors import RequestError, StartupError
from jobwarden.process.supervisor import Reload, lock_database
from jobwarden.process.systemd import SystemdNotifier
from tests.conftest import BASE_CONFIG

pytestmark = pytest.mark.both_stores

KIND = '\n[kinds.sleepy]\nhandler = "tests.handlers:sleepy"\n'


def notify_socket(tmp_path: Path) -> tuple[socket.socket, SystemdNotifier]:
    path = tmp_path / "notify.sock"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(path))
    receiver.setblocking(False)
    return receiver, SystemdNotifier.from_environ({"NOTIFY_SOCKET": str(path)})


def received(receiver: socket.socket) -> list[str]:
    messages = []
    while True:
        try:
            messages.append(receiver.recv(4096).decode().rstrip("\n"))
        except BlockingIOError:
            return messages


async def test_ready_after_recovery_and_stopping_on_drain(autojump_clock, start_daemon, tmp_path):
    receiver, notifier = notify_socket(tmp_path)
    daemon = await start_daemon(KIND, notifier=notifier)
    job = await daemon.submit("sleepy", {"seconds": 60})
    await daemon.wait_status(job.id, {"running"})
    await trio.sleep(15)
    messages = received(receiver)
    assert messages[0] == "READY=1\nSTATUS=ready"
    assert "STATUS=1 running, 0 queued" in messages
    await daemon.stop(grace=1)
    assert received(receiver) == [
        "STOPPING=1\nSTATUS=draining, grace 1s\nEXTEND_TIMEOUT_USEC=31000000"
    ]


def write_config(path: Path, extra: str) -> Path:
    path.write_text(BASE_CONFIG.format(max_concurrent_jobs=2) + extra)
    return path


async def test_reload_applies_new_kinds_and_rejects_a_bad_file(
    autojump_clock, start_daemon, tmp_path
):
    config_path = write_config(tmp_path / "config.toml", KIND)
    daemon = await start_daemon(config_path=config_path)
    with pytest.raises(RequestError, match="unknown kind 'noop'"):
        await daemon.submit("noop")

    write_config(config_path, KIND + '\n[kinds.noop]\nhandler = "tests.handlers:noop"\n')
    await daemon.handle.control.send(Reload())
    await trio.sleep(1)
    job = await daemon.submit("noop")
    assert (await daemon.wait_done(job.id)).status == "done"

    config_path.write_text("[daemon]\nmax_concurrent_jobs = 'many'\n")
    await daemon.handle.control.send(Reload())
    await trio.sleep(1)
    # The bad file was refused: the running config, with both kinds, is intact.
    job = await daemon.submit("noop")
    assert (await daemon.wait_done(job.id)).status == "done"


async def test_sigterm_drains_and_stops(start_daemon, tmp_path):
    daemon = await start_daemon(KIND)
    job = await daemon.submit("sleepy", {"seconds": 0.05})
    await daemon.wait_status(job.id, {"running"})
    os.kill(os.getpid(), signal.SIGTERM)
    with trio.fail_after(10):
        await daemon.stopped.wait()
    assert (await daemon.job(job.id)).status == "done"


def test_a_second_daemon_on_the_same_database_is_refused(tmp_path):
    fd = lock_database(tmp_path / "jw.db")
    try:
        with pytest.raises(StartupError) as refused:
            lock_database(tmp_path / "jw.db")
    finally:
        os.close(fd)
    assert "another jobwarden is already using the database" in str(refused.value)
    assert f"(pid {os.getpid()})" in str(refused.value)
