"""`jobwarden serve` as an operator runs it: a listen port another program holds is a config
error naming the key to change (exit 2, which systemd is told not to restart on), and the
flags that override the file (--http-listen, --websocket-listen, --socket, --json) hold at
start-up and across a reload."""

from __future__ import annotations

import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.process import DaemonFactory, daemon_factory, run_jobwarden


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[DaemonFactory]:
    yield from daemon_factory(tmp_path)


@pytest.fixture
def taken_port() -> Iterator[str]:
    """A loopback port another program listens on, as "host:port"."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield f"127.0.0.1:{holder.getsockname()[1]}"


@pytest.mark.parametrize("listener", ["http", "websocket"])
def test_a_taken_port_exits_2_naming_the_key_and_the_flag(daemons, taken_port, listener, tmp_path):
    daemon = daemons({listener: {"listen": taken_port}}, start=False)

    finished = run_jobwarden("serve", *daemon.serve_options, cwd=daemon.directory)

    assert finished.returncode == 2, finished
    (message,) = [line for line in finished.stderr.splitlines() if line.startswith("jobwarden:")]
    assert message.startswith(
        f"jobwarden: {daemon.config_path}: {listener}.listen: cannot listen on {taken_port}: "
        "Address already in use"
    )
    assert f"Set another {listener}.listen in the config" in message
    assert f"jobwarden serve --{listener}-listen HOST:PORT" in message
    assert "Traceback" not in finished.stderr


def test_the_flags_override_the_file_and_hold_across_a_reload(daemons, taken_port):
    # The file asks for a port that is taken, a socket elsewhere and console logs.
    daemon = daemons(
        {
            "http": {"listen": taken_port},
            "websocket": {"listen": taken_port},
            "log": {"format": "console"},
        },
        start=False,
    )
    socket_path = daemon.directory / "elsewhere.sock"
    daemon.serve_options += [
        "--http-listen",
        "127.0.0.1:0",
        "--websocket-listen",
        "",
        "--socket",
        socket_path.name,
        "--json",
    ]
    daemon.socket_path = socket_path

    # Ready is told by a JSON log line: --json won over the file's console format.
    daemon.start()

    ready = daemon.logs("jobwarden ready")[0]
    assert ready["http_port"] not in (None, int(taken_port.rpartition(":")[2]))
    assert ready["websocket_port"] is None
    with daemon.client() as admin:
        assert admin.call("ping")["pid"] == daemon.pid
    daemon.process.send_signal(signal.SIGHUP)
    daemon.wait_for_log(lambda line: line.get("event") == "config reloaded")
    assert not daemon.logs("config change needs a restart to take effect")
    assert daemon.stop() == 0


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--http-listen", "8766"), ("--websocket-listen", "localhost:99999")],
)
def test_a_bad_listen_flag_is_a_usage_error(tmp_path, flag, value):
    finished = run_jobwarden("serve", flag, value, cwd=tmp_path)

    assert finished.returncode == 2
    assert f'argument {flag}: expected "host:port" (port 0 to 65535) or "", got "{value}"' in (
        finished.stderr
    )
