"""The real daemon as a child process: crashes, drains, the admin socket, config errors, CLI.

Everything here waits on something observable (a log line, a reply, a watch event, process
exit), never on a fixed delay, so the tests are as fast as the daemon and do not flake on a
slow machine; every wait has a deadline so a hung daemon fails the test instead of hanging it.
"""

from __future__ import annotations

import collections
import contextlib
import grp
import json
import os
import random
import re
import shutil
import signal
import socket
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from jobwarden.client import AdminError
from jobwarden.wire.views import TERMINAL_STATUSES
from tests.conftest import opened_database
from tests.process import DaemonFactory, DaemonProcess, daemon_factory, run_jobwarden

pytestmark = pytest.mark.both_stores

ERROR_SHAPE = {"code", "message", "retryable", "error_id"}
# Far longer than any healthy run needs: only a hung or broken daemon ever reaches it.
GENEROUS_DEADLINE = 60.0


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[DaemonFactory]:
    yield from daemon_factory(tmp_path)


# -- helpers ---------------------------------------------------------------------------------


class Connection:
    """A raw admin-socket connection: send any bytes, read reply lines against a deadline."""

    def __init__(self, path: Path, timeout: float = 10.0) -> None:
        self.timeout = timeout
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self._buffer = b""

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, message: dict[str, Any] | bytes) -> None:
        data = message if isinstance(message, bytes) else json.dumps(message).encode() + b"\n"
        self.sock.sendall(data)

    def read(self, deadline: float | None = None) -> dict[str, Any] | None:
        """The next line as JSON; None once the daemon closed the connection."""
        while b"\n" not in self._buffer:
            remaining = self.timeout if deadline is None else deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no complete line from the daemon before the deadline")
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                if self._buffer:
                    raise AssertionError(f"connection closed mid-line: {self._buffer[:200]!r}")
                return None
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def request(self, cmd: str, **args: Any) -> dict[str, Any]:
        self.send({"id": cmd, "cmd": cmd, "args": args})
        reply = self.read()
        assert reply is not None, f"the daemon closed the connection instead of answering {cmd}"
        return reply

    def closed_by_daemon(self) -> bool:
        """True once reading hits end-of-stream, i.e. the daemon hung up."""
        try:
            while self.read() is not None:
                pass
        except TimeoutError:
            return False
        return True


class JobProgress:
    """What a `watch` of all jobs has shown so far: each job's latest status."""

    def __init__(self) -> None:
        self.latest: dict[int, str] = {}
        self.running: set[int] = set()
        self.finished: set[int] = set()
        self.terminal_events: dict[int, int] = {}

    def add(self, event: dict[str, Any]) -> None:
        if event["type"] != "status":
            return
        job, status = event["job"], event["data"]["status"]
        self.latest[job] = status
        self.running.discard(job)
        self.finished.discard(job)
        if status == "running":
            self.running.add(job)
        elif status in TERMINAL_STATUSES:
            self.finished.add(job)
            self.terminal_events[job] = self.terminal_events.get(job, 0) + 1


def follow_jobs(
    daemon: DaemonProcess,
    until: Callable[[JobProgress], bool],
    timeout: float = GENEROUS_DEADLINE,
) -> JobProgress:
    """Watch every job from the first event on, until `until(progress)` holds."""
    progress = JobProgress()
    deadline = time.monotonic() + timeout
    with Connection(daemon.socket_path) as connection:
        reply = connection.request("watch", since=0)
        assert reply["ok"], reply
        while not until(progress):
            message = connection.read(deadline)
            assert message is not None, "the daemon ended the watch stream"
            progress.add(message["event"])
    return progress


def pipelined_submit(
    daemon: DaemonProcess,
    payloads: list[dict[str, Any]],
    *,
    kind: str = "quick",
    kill_after_replies: int | None = None,
) -> dict[int, dict[str, Any]]:
    """Submit every payload on one connection without waiting for replies in between.

    Returns {job id: payload} for each submission that got an ok reply. With
    `kill_after_replies`, the daemon is killed -9 once that many replies came back, while
    the rest are still on their way; replies it had already sent still count as accepted.
    """
    connection = Connection(daemon.socket_path, timeout=GENEROUS_DEADLINE)
    requests = b"".join(
        request_line("submit", id=index, args={"kind": kind, "payload": payload})
        for index, payload in enumerate(payloads)
    )
    # A sender thread: the replies must be read while requests are still being written, or
    # both sides could fill their socket buffers and wait on each other forever.
    sender = _start_thread(_send_ignoring_hangup, connection.sock, requests)
    accepted: dict[int, dict[str, Any]] = {}
    replies = 0
    try:
        while replies < len(payloads):
            reply = connection.read()
            if reply is None:
                break
            replies += 1
            if reply["ok"]:
                accepted[reply["data"]["job"]["id"]] = payloads[reply["id"]]
            else:
                raise AssertionError(f"submission {reply['id']} was refused: {reply['error']}")
            if replies == kill_after_replies:
                daemon.kill9()
    finally:
        sender.join(GENEROUS_DEADLINE)
        connection.close()
    return accepted


def _send_ignoring_hangup(sock: socket.socket, data: bytes) -> None:
    # The daemon may be killed mid-batch; the reader decides what that means.
    with contextlib.suppress(OSError):
        sock.sendall(data)


def _start_thread(target: Callable[..., None], *args: Any) -> threading.Thread:
    thread = threading.Thread(target=target, args=args, daemon=True)
    thread.start()
    return thread


@contextlib.contextmanager
def open_database(daemon: DaemonProcess) -> Iterator[Any]:
    """The daemon's database, read directly: what the next start would find."""
    assert not daemon.running, "read the database only once the daemon has stopped"
    with opened_database(daemon.database) as database:
        yield database


def job_row(database: Any, job_id: int) -> dict[str, Any]:
    cursor = database.execute("SELECT * FROM jobs WHERE id = ?", (job_id,))
    row = cursor.fetchone()
    assert row is not None, f"job {job_id} is not in the database"
    return {column[0]: value for column, value in zip(cursor.description, row, strict=True)}


def request_line(cmd: Any, **fields: Any) -> bytes:
    return json.dumps({"id": 7, "cmd": cmd, **fields}).encode() + b"\n"


def errors_logged(daemon: DaemonProcess) -> list[dict[str, Any]]:
    """Error-level log lines: what an operator would be paged about."""
    return [line for line in daemon.logs() if line.get("level") in ("error", "critical")]


def ping(daemon: DaemonProcess) -> dict[str, Any]:
    with daemon.client() as client:
        return client.call("ping")


# -- kill -9 durability and the stale socket -------------------------------------------------

KILL_TEST_CONFIG = {
    "daemon": {"max_concurrent_jobs": 20, "crash_loop_after": 3},
    "kinds": {"quick": {"handler": "tests.handlers:sleepy"}},
}
FAILING_SHARE = 0.05


def kill_and_restart(daemon: DaemonProcess) -> None:
    assert daemon.kill9() == -signal.SIGKILL
    # kill -9 leaves the socket file behind, with nobody listening on it.
    assert daemon.socket_path.is_socket()
    with pytest.raises(ConnectionRefusedError):
        Connection(daemon.socket_path)
    daemon.start()
    assert ping(daemon)["pid"] == daemon.pid


def random_payloads(rng: random.Random, count: int) -> list[dict[str, Any]]:
    return [{"fail": rng.random() < FAILING_SHARE} for _ in range(count)]


@pytest.mark.parametrize(
    ("kills", "seed", "jobs"),
    [
        pytest.param(3, 1, 1000, id="3-kills-seed1"),
        pytest.param(5, 2, 2000, id="5-kills-seed2", marks=pytest.mark.slow),
        pytest.param(5, 3, 2000, id="5-kills-seed3", marks=pytest.mark.slow),
    ],
)
def test_kill9_at_random_moments_loses_no_job_and_finishes_each_exactly_once(
    daemons, kills, seed, jobs
):
    rng = random.Random(seed)
    daemon = daemons(KILL_TEST_CONFIG)

    accepted = pipelined_submit(daemon, random_payloads(rng, jobs))
    assert len(accepted) == jobs

    # Kill after a random number of jobs finished, as seen by a client: jobs are mid-run.
    for finished_before_kill in sorted(rng.sample(range(jobs // 10, jobs * 9 // 10), kills)):
        follow_jobs(daemon, until=lambda p, n=finished_before_kill: len(p.finished) >= n)
        kill_and_restart(daemon)

    # And once while a second batch is still being sent: every ok reply must survive.
    second_batch = random_payloads(rng, 500)
    accepted_late = pipelined_submit(
        daemon, second_batch, kill_after_replies=rng.randrange(10, 100)
    )
    assert not daemon.running
    assert 10 <= len(accepted_late) < len(second_batch), "the kill did not cut the batch short"
    accepted |= accepted_late
    daemon.start()

    # Submissions whose reply the kill swallowed may exist too; they must finish as well.
    with daemon.client() as client:
        stored_jobs = sum(client.call("status")["jobs"].values())
    assert stored_jobs >= len(accepted)
    progress = follow_jobs(daemon, until=lambda p: len(p.finished) == stored_jobs)
    assert set(accepted) <= progress.finished
    assert daemon.stop() == 0
    seen_twice = {job: n for job, n in progress.terminal_events.items() if n != 1}
    assert seen_twice == {}, "a watcher saw a job finish more than once"
    # Being killed is no error of the daemon's, nor are watchers that hang up on it.
    assert errors_logged(daemon) == []

    with open_database(daemon) as database:
        # JSON columns are read here: each store has its own JSON functions.
        rows = {
            job_id: (status, error and json.loads(error)["code"], attempt, json.loads(payload))
            for job_id, status, error, attempt, payload in database.execute(
                "SELECT id, status, error, attempt, payload FROM jobs"
            )
        }
        missing = set(accepted) - set(rows)
        assert not missing, f"accepted jobs lost by kill -9: {sorted(missing)[:20]}"
        for job_id, (status, error_code, _, payload) in rows.items():
            if error_code == "CRASH_LOOP":
                assert status == "failed", job_id
            elif payload["fail"]:
                assert (status, error_code) == ("failed", "TEST_FAILURE"), job_id
            else:
                assert status == "done", (job_id, status, error_code)

        status_events = [
            (job_id, json.loads(data))
            for job_id, data in database.execute(
                "SELECT job_id, data FROM events WHERE type = 'status'"
            )
        ]
        terminal_events = collections.Counter(
            job_id
            for job_id, data in status_events
            if data["status"] in ("done", "failed", "canceled")
        )
        finished_twice = {job_id: n for job_id, n in terminal_events.items() if n != 1}
        assert finished_twice == {}, "jobs with more than one terminal status event"
        assert set(terminal_events) == set(rows)

        recovered = {job_id for job_id, data in status_events if data.get("reason") == "RECOVERED"}
        assert recovered, "no kill interrupted a running job, so recovery went untested"
        for job_id in recovered:
            # The run a kill cut short counts as an attempt; the rerun is the next one.
            _, error_code, attempt, _ = rows[job_id]
            assert attempt >= 2 or error_code == "CRASH_LOOP", (job_id, error_code, attempt)


def test_restart_after_kill9_replaces_the_stale_socket(daemons):
    daemon = daemons()
    first_pid = daemon.pid
    daemon.kill9()
    assert daemon.socket_path.is_socket(), "kill -9 gives no chance to remove the socket"

    daemon.start()

    assert ping(daemon)["pid"] == daemon.pid != first_pid
    assert stat.S_IMODE(daemon.socket_path.stat().st_mode) == 0o600


# -- drain -----------------------------------------------------------------------------------

DRAIN_TEST_KINDS = {
    "quick": {"handler": "tests.handlers:sleepy"},
    "long": {"handler": "tests.handlers:slow_once"},
}


def submit(daemon: DaemonProcess, kind: str, payload: dict[str, Any]) -> int:
    with daemon.client() as client:
        return client.call("submit", kind=kind, payload=payload)["job"]["id"]


def test_sigterm_finishes_short_jobs_and_requeues_long_ones_unspent(daemons):
    daemon = daemons({"daemon": {"shutdown_grace": "1s"}, "kinds": DRAIN_TEST_KINDS})
    short_job = submit(daemon, "quick", {"seconds": 0.3})
    long_job = submit(daemon, "long", {})
    follow_jobs(daemon, until=lambda p: {short_job, long_job} <= p.running)

    stopping = time.monotonic()
    daemon.terminate()
    assert daemon.wait(timeout=10) == 0
    assert time.monotonic() - stopping < 5, "the drain outlasted its 1s grace by far"

    with open_database(daemon) as database:
        short, long = job_row(database, short_job), job_row(database, long_job)
    assert short["status"] == "done"
    signal_at = datetime.fromisoformat(daemon.logs("signal received")[-1]["ts"]).timestamp()
    assert short["finished_at"] > signal_at, "the short job ended before the drain began"
    assert daemon.logs("drained")[-1]["interrupted"] == 1
    assert errors_logged(daemon) == []
    assert (long["status"], long["reason"], long["attempt"]) == ("queued", "INTERRUPTED", 0)
    assert not daemon.socket_path.exists(), "a clean stop removes the socket file"

    daemon.start()
    progress = follow_jobs(daemon, until=lambda p: long_job in p.finished)
    assert progress.latest[long_job] == "done"
    with daemon.client() as client:
        job = client.call("show", job=long_job)["job"]
    assert (job["status"], job["attempt"], job["result"]) == ("done", 1, {"attempt": 1})


def test_submit_while_draining_is_refused_with_draining(daemons):
    daemon = daemons({"daemon": {"shutdown_grace": "1h"}, "kinds": DRAIN_TEST_KINDS})
    long_job = submit(daemon, "long", {})
    follow_jobs(daemon, until=lambda p: long_job in p.running)

    with daemon.client() as client:
        assert client.call("drain") == {"draining": True, "running": 1}
        with pytest.raises(AdminError) as refused:
            client.call("submit", kind="quick", payload={})
        assert client.call("status")["draining"] is True
        assert client.call("shutdown") == {"stopping": True}

    assert refused.value.error.code == "DRAINING"
    assert refused.value.error.retryable is True
    # `shutdown` cuts the hour-long grace short: the running job is interrupted, unspent.
    assert daemon.wait(timeout=10) == 0
    with open_database(daemon) as database:
        long = job_row(database, long_job)
        assert (long["status"], long["reason"], long["attempt"]) == ("queued", "INTERRUPTED", 0)
        assert database.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] == 1


# -- socket permissions and peer credentials -------------------------------------------------

NOBODY = 65534


def existing_group() -> str:
    """A group other than our primary one, so the chown is visible in the socket's gid."""
    for name in ("daemon", "nogroup", "users"):
        try:
            if grp.getgrnam(name).gr_gid != os.getgid():
                return name
        except KeyError:
            continue
    pytest.skip("no spare group on this system to configure admin.group with")


@pytest.mark.parametrize("with_group", [False, True], ids=["no-group-0600", "group-0660"])
def test_socket_mode_follows_admin_group(daemons, with_group):
    group = existing_group() if with_group else ""
    daemon = daemons({"admin": {"group": group}})

    status = daemon.socket_path.stat()

    if with_group:
        assert stat.S_IMODE(status.st_mode) == 0o660
        assert status.st_gid == grp.getgrnam(group).gr_gid
    else:
        assert stat.S_IMODE(status.st_mode) == 0o600
    assert ping(daemon)


@pytest.fixture
def world_traversable_dir() -> Iterator[Path]:
    """pytest's tmp_path is 0700; another user must reach the socket to be refused by it."""
    directory = Path(tempfile.mkdtemp(prefix="jw-peer-"))
    directory.chmod(0o711)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def ping_as(uid: int, socket_path: Path) -> dict[str, Any] | str:
    """Ping from a forked child running as `uid`: its reply, or the connect error's name."""
    reader, writer = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child, which never returns
        outcome: Any
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(10)
                sock.connect(str(socket_path))
                # The daemon may refuse and hang up before reading a word: its reply is
                # still waiting to be read even when this send hits the closed end.
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    sock.sendall(b'{"id": 1, "cmd": "ping"}\n')
                reply = b""
                while not reply.endswith(b"\n"):
                    chunk = sock.recv(4096)
                    if not chunk:
                        break
                    reply += chunk
            outcome = json.loads(reply) if reply else "closed without a reply"
        except Exception as exc:
            outcome = type(exc).__name__
        os.write(writer, json.dumps(outcome).encode())
        os._exit(0)
    os.close(writer)
    with os.fdopen(reader, "rb") as result:
        outcome = json.loads(result.read() or b'"child died"')
    os.waitpid(child, 0)
    return outcome


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to connect as another user")
def test_peer_credentials_refuse_other_users_even_on_a_loosened_socket(
    daemons, world_traversable_dir
):
    daemon = daemons({"admin": {"socket": str(world_traversable_dir / "admin.sock")}})
    assert ping_as(NOBODY, daemon.socket_path) == "PermissionError", "0600 keeps others out"

    daemon.socket_path.chmod(0o666)  # an operator's mistake the peer check must catch
    reply = ping_as(NOBODY, daemon.socket_path)

    assert isinstance(reply, dict), reply
    assert reply["ok"] is False
    assert reply["error"]["code"] == "FORBIDDEN"
    assert set(reply["error"]) >= ERROR_SHAPE
    daemon.wait_for_log(
        lambda line: line.get("event") == "admin connection refused" and line["uid"] == NOBODY
    )
    assert ping(daemon)["pid"] == daemon.pid


# -- garbage on the socket -------------------------------------------------------------------

MAX_LINE_BYTES = 4096


@pytest.fixture(scope="module")
def garbage_daemon(tmp_path_factory) -> Iterator[DaemonProcess]:
    """One daemon takes all the garbage: each case also checks it still serves afterwards."""
    with DaemonFactory(tmp_path_factory.mktemp("garbage")) as factory:
        yield factory({"admin": {"max_line_bytes": MAX_LINE_BYTES}})


def random_binary_line(seed: int) -> bytes:
    rng = random.Random(seed)
    body = bytes(rng.randrange(256) for _ in range(300)).replace(b"\n", b"?")
    # Starts with a byte JSON never starts with, so it cannot parse by luck.
    return b"\xff" + body + b"\n"


def oversized_submit_line() -> bytes:
    return request_line("submit", args={"kind": "quick", "payload": {"pad": "x" * 8000}})


GARBAGE_CASES = [
    # (request bytes, expected code, words the message must contain, closes the connection)
    pytest.param(b"hello daemon\n", "INVALID_REQUEST", [], False, id="not-json"),
    pytest.param(b"[1, 2, 3]\n", "INVALID_REQUEST", ["object"], False, id="json-array"),
    pytest.param(
        request_line("frobnicate"), "INVALID_REQUEST", ["frobnicate"], False, id="unknown-command"
    ),
    pytest.param(
        request_line("show", args={"job": "seven"}),
        "INVALID_REQUEST",
        ["job", "int"],
        False,
        id="wrong-argument-type",
    ),
    pytest.param(
        request_line("show", args={}), "INVALID_REQUEST", ["job"], False, id="missing-argument"
    ),
    pytest.param(
        request_line("submit", args={"kind": "quick", "colour": "red"}),
        "INVALID_REQUEST",
        ["colour"],
        False,
        id="unknown-argument",
    ),
    pytest.param(
        request_line("submit", args={"kind": "nope"}),
        "INVALID_REQUEST",
        ["nope", "quick"],
        False,
        id="unknown-kind",
    ),
    pytest.param(
        b"x" * (MAX_LINE_BYTES + 1000),
        "PAYLOAD_TOO_LARGE",
        [str(MAX_LINE_BYTES)],
        True,
        id="endless-line",
    ),
    pytest.param(
        oversized_submit_line(),
        "PAYLOAD_TOO_LARGE",
        [str(MAX_LINE_BYTES)],
        True,
        id="oversized-complete-line",
    ),
    pytest.param(random_binary_line(1), "INVALID_REQUEST", [], False, id="binary-bytes"),
]


@pytest.mark.parametrize(("garbage", "code", "words", "closes"), GARBAGE_CASES)
def test_garbage_gets_an_error_reply_and_the_daemon_keeps_serving(
    garbage_daemon, garbage, code, words, closes
):
    with Connection(garbage_daemon.socket_path) as connection:
        connection.send(garbage)
        reply = connection.read()
        assert reply is not None, "the daemon hung up without an error reply"
        assert reply["ok"] is False, reply
        error = reply["error"]
        assert set(error) >= ERROR_SHAPE, reply
        assert (error["code"], error["retryable"]) == (code, False)
        assert error["error_id"]
        for word in words:
            assert word in error["message"]
        if closes:
            assert connection.closed_by_daemon()
        else:
            # A bad request spoils only itself: the same connection still answers.
            assert connection.request("ping")["ok"] is True

    assert ping(garbage_daemon)


def test_every_error_reply_says_whether_it_is_retryable(garbage_daemon):
    with Connection(garbage_daemon.socket_path) as connection:
        reply = connection.request("frobnicate")

    assert set(reply["error"]) >= ERROR_SHAPE, reply
    assert reply["error"]["retryable"] is False


def test_half_a_line_then_close_is_dropped_quietly(garbage_daemon):
    with Connection(garbage_daemon.socket_path) as connection:
        connection.send(b'{"id": 1, "cmd": "pi')
        connection.sock.shutdown(socket.SHUT_WR)
        # Nothing complete arrived, so there is nothing to answer: the daemon just hangs up.
        assert connection.read() is None

    with garbage_daemon.client() as client:
        assert client.call("ping")["pid"] == garbage_daemon.pid
        job = client.call("submit", kind="quick", payload={})["job"]
    assert job["status"] == "queued"


def test_silent_peers_holding_every_slot_do_not_lock_the_operator_out(daemons):
    daemon = daemons({"admin": {"max_connections": 64, "line_timeout": "1s"}})
    silent = [Connection(daemon.socket_path) for _ in range(64)]
    try:
        for connection in silent:
            connection.send(b'{"id": 1, "cmd": "sta')
        with Connection(daemon.socket_path) as late:
            assert late.request("status")["error"]["code"] == "QUEUE_FULL"
        # Each half-sent line is refused once its time is up, and its slot comes free.
        goodbyes = [connection.read() for connection in silent]
        assert {reply["error"]["code"] for reply in goodbyes} == {"INVALID_REQUEST"}
        assert all(connection.closed_by_daemon() for connection in silent)
    finally:
        for connection in silent:
            connection.close()
    with Connection(daemon.socket_path) as operator:
        assert operator.request("status")["ok"] is True


# -- config errors and a second daemon -------------------------------------------------------

BAD_CONFIGS = [
    pytest.param(
        '[kinds.x]\nhandler = "tests.handlers:noop"\ntimeout = "fast"\n',
        "kinds.x.timeout",
        id="bad-duration",
    ),
    pytest.param("[daemon]\nmax_concurent_jobs = 3\n", "daemon.max_concurent_jobs", id="typo-key"),
    pytest.param(
        '[kinds.x]\nhandler = "tests.no_such_module:noop"\n',
        "kinds.x.handler",
        id="handler-does-not-import",
    ),
]


@pytest.mark.parametrize(("config_text", "named_key"), BAD_CONFIGS)
@pytest.mark.parametrize(
    "command", [["serve", "--config"], ["check-config"]], ids=["serve", "check-config"]
)
def test_bad_config_exits_2_naming_the_key(tmp_path, config_text, named_key, command):
    bad = tmp_path / "bad.toml"
    bad.write_text(config_text)

    finished = run_jobwarden(*command, str(bad), cwd=tmp_path)

    assert finished.returncode == 2, finished
    assert named_key in finished.stderr
    assert "jobwarden ready" not in finished.stdout


@pytest.mark.sqlite_only("several daemons on one PostgreSQL are a cluster, not refused")
def test_second_daemon_on_the_same_database_refuses_to_start(daemons):
    first = daemons()

    second = run_jobwarden("serve", "--config", str(first.config_path), cwd=first.directory)

    assert second.returncode != 0
    assert re.search(r"another jobwarden is (already )?using", second.stdout + second.stderr)
    # Its last log line says why, stamped like every other line.
    refusal = json.loads(second.stdout.splitlines()[-1])
    assert refusal["event"] == "jobwarden could not start"
    assert refusal["level"] == "error"
    assert refusal["ts"]
    assert first.running
    assert first.socket_path.is_socket()
    job_id = submit(first, "quick", {})
    assert follow_jobs(first, until=lambda p: job_id in p.finished).latest[job_id] == "done"


# -- the CLI against the real daemon ---------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "exit_code", "expected_stdout", "expected_stderr"),
    [
        pytest.param("{}", 0, ['"slept":null', "status done"], [], id="done-exits-0"),
        pytest.param(
            '{"fail": true}', 1, ["status failed"], ["TEST_FAILURE", "asked to fail"], id="fail-1"
        ),
    ],
)
def test_cli_submit_watch_reports_the_outcome(
    daemons, payload, exit_code, expected_stdout, expected_stderr
):
    daemon = daemons()

    finished = run_jobwarden(
        "--config",
        str(daemon.config_path),
        "submit",
        "quick",
        payload,
        "--watch",
        cwd=daemon.directory,
    )

    assert finished.returncode == exit_code, finished
    # The result is pretty-printed JSON; compare it without the indentation.
    printed = finished.stdout.replace(" ", "")
    for text in expected_stdout:
        assert text.replace(" ", "") in printed, finished.stdout
    for text in expected_stderr:
        assert text in finished.stderr
    assert "submitted job" in finished.stdout


def test_cli_without_a_daemon_exits_3(tmp_path):
    finished = run_jobwarden("--socket", "/nonexistent", "status", cwd=tmp_path)

    assert finished.returncode == 3, finished
    assert "/nonexistent" in finished.stderr
