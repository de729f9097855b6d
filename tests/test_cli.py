"""The jobwarden CLI against a fake daemon: what a user sees, and the exit code."""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import pty
import shlex
import shutil
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from jobwarden import config
from jobwarden.cli import main
from jobwarden.cli.server import default_config_text
from jobwarden.wire.admin import encode_line
from jobwarden.wire.views import ErrorBody
from tests.process import daemon_env, jobwarden_command

NOW = time.time()


class FakeDaemon:
    """Serves the admin protocol from canned replies on a Unix socket, in a thread.

    `replies` maps a command to its data, an ErrorBody, or a function of the request's args
    returning either. After the watch reply it streams those of `watch_events` after the
    watch's `since`, as the daemon replays stored events and then sends live ones, then hangs
    up, so a client that misses the end of a job fails fast instead of waiting forever.
    """

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.requests: list[dict[str, Any]] = []
        self.replies: dict[str, Any] = {
            "ping": {"version": "0.1.0", "pid": 4242},
            "watch": {"watching": "job"},
        }
        self.watch_events: list[dict[str, Any]] = []
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(self.path)
        self._listener.listen()
        threading.Thread(target=self._accept_connections, daemon=True).start()

    def stop(self) -> None:
        """Stop as a daemon does on exit: stop listening and remove the socket file."""
        if self._listener.fileno() == -1:
            return
        self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        os.unlink(self.path)

    def commands(self) -> list[str]:
        return [request["cmd"] for request in self.requests]

    def _accept_connections(self) -> None:
        while True:
            try:
                connection, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(connection,), daemon=True).start()

    def _serve(self, connection: socket.socket) -> None:
        with connection, connection.makefile("rb") as lines:
            for line in lines:
                request = json.loads(line)
                self.requests.append(request)
                connection.sendall(encode_line(self._reply(request)))
                if request["cmd"] == "watch":
                    since = request["args"].get("since", 0)
                    for event in self.watch_events:
                        if event["seq"] > since:
                            line = {"id": request["id"], "event": event}
                            connection.sendall(encode_line(line))
                    return

    def _reply(self, request: dict[str, Any]) -> dict[str, Any]:
        reply = self.replies.get(
            request["cmd"], ErrorBody("INTERNAL", "the fake has no reply", False)
        )
        if callable(reply):
            reply = reply(request["args"])
        if isinstance(reply, ErrorBody):
            return {"id": request["id"], "ok": False, "error": msgspec.to_builtins(reply)}
        return {"id": request["id"], "ok": True, "data": reply}


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[FakeDaemon]:
    fake = FakeDaemon(tmp_path / "admin.sock")
    yield fake
    fake.stop()


@pytest.fixture
def jobwarden(daemon: FakeDaemon) -> Callable[..., int]:
    def run(*argv: str) -> int:
        return main(["--socket", daemon.path, *argv])

    return run


def job_view(**fields: Any) -> dict[str, Any]:
    # 90 s old when the CLI prints its age, however long the suite ran before this test (NOW
    # is taken as the module is collected).
    now = time.time()
    view = {
        "id": 12,
        "kind": "pdf",
        "user": "local",
        "status": "queued",
        "priority": 0,
        "attempt": 0,
        "max_attempts": 4,
        "created_at": now - 90,
        "updated_at": now,
        "available_at": now - 90,
        "payload": {"pages": 8},
    }
    view.update(fields)
    return view


def event(seq: int, type: str, **data: Any) -> dict[str, Any]:
    return {
        "seq": seq,
        "job": 12,
        "user": "local",
        "kind": "pdf",
        "type": type,
        "at": NOW,
        "data": data,
    }


OPEN_UNTIL = NOW + 95


def breaker_view(state: str = "closed", **fields: Any) -> dict[str, Any]:
    view = {
        "state": state,
        "open_until": None,
        "consecutive_failures": 0,
        "calls": 1520,
        "failures": 12,
        "opened": 0,
        "in_flight": 0,
        "waiting": 0,
    }
    view.update(fields)
    return view


def budget_view(**fields: Any) -> dict[str, Any]:
    view = {
        "day": "2026-11-22",
        "month": "2026-11",
        "daily_usd": 500.0,
        "monthly_usd": 10000.0,
        "spent_today": 12.34,
        "spent_month": 120.0,
        "reserved": 0.0,
        "remaining_today": 487.66,
        "remaining_month": 9880.0,
        "stopped": False,
        "stop_reason": None,
        "stopped_until": None,
        "override_today": False,
        "month_projection_usd": 3720.0,
        "alert_at": [0.5, 0.8, 1.0],
    }
    view.update(fields)
    return view


def status_reply(**fields: Any) -> dict[str, Any]:
    reply = {
        "version": "0.1.0",
        "pid": 4242,
        "uptime": 60,
        "draining": False,
        "jobs": {},
        "running": 0,
        "max_concurrent_jobs": 2,
        "paused": [],
        "paused_all": False,
        "queue_depth": {},
        "oldest_queued_seconds": None,
        "stuck": {"last_check": 0, "recovered": {}},
        "system": {"memory_percent": 41.5, "memory_available_gb": 13.2, "cpu_percent": 7.0},
    }
    reply.update(fields)
    return reply


def clock(timestamp: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(timestamp))


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


# submit


def test_submit_prints_the_new_job_id(daemon, jobwarden, capsys):
    daemon.replies["submit"] = {"job": job_view(), "existing": False}

    code = jobwarden("submit", "pdf", '{"pages": 8}', "--priority", "5")

    assert (code, capsys.readouterr().out) == (0, "submitted job 12\n")
    assert daemon.requests[0]["args"] == {"kind": "pdf", "payload": {"pages": 8}, "priority": 5}


def test_submit_with_a_known_idempotency_key_reports_the_existing_job(daemon, jobwarden, capsys):
    daemon.replies["submit"] = {"job": job_view(status="running"), "existing": True}

    code = jobwarden("submit", "pdf", "{}", "--idempotency-key", "book-7")

    assert (code, capsys.readouterr().out) == (0, "existing job 12 (running)\n")
    assert daemon.requests[0]["args"]["idempotency_key"] == "book-7"


def test_submit_sends_its_start_time_tags_and_dependencies(daemon, jobwarden, capsys):
    daemon.replies["submit"] = {"job": job_view(), "existing": False}

    code = jobwarden(
        "submit", "pdf", "{}", "--run-at", "2026-12-01T06:00:00Z", "--tag", "a,b", "--tag", "c",
        "--after", "3,4", "--after", "5", "--after-any",
    )  # fmt: skip

    assert code == 0
    assert daemon.requests[0]["args"] == {
        "kind": "pdf",
        "payload": {},
        "run_at": "2026-12-01T06:00:00Z",
        "tags": ["a", "b", "c"],
        "after": [3, 4, 5],
        "after_any": True,
    }


@pytest.mark.parametrize(
    ("options", "complaint"),
    [
        (["--run-at", "2026-12-01T06:00:00Z", "--delay", "1m"], "not allowed with argument"),
        (["--after", "3,x"], "--after: expected a positive integer, got 'x'"),
    ],
)
def test_submit_refuses_what_it_cannot_send(daemon, jobwarden, capsys, options, complaint):
    code = jobwarden("submit", "pdf", "{}", *options)

    assert code == 2
    assert complaint in capsys.readouterr().err
    assert daemon.requests == []


@pytest.mark.parametrize(
    ("payload", "complaint"),
    [
        ("{pages: 8}", "not valid JSON: Expecting property name enclosed in double quotes"),
        ("[1, 2]", "must be a JSON object"),
    ],
)
def test_submit_rejects_a_payload_that_is_not_a_json_object(
    daemon, jobwarden, capsys, payload, complaint
):
    code = jobwarden("submit", "pdf", payload)

    err = capsys.readouterr().err
    assert code == 2
    assert "PAYLOAD_JSON" in err
    assert complaint in err
    assert daemon.requests == []


def test_submit_watch_follows_the_new_job_to_its_result(daemon, jobwarden, capsys):
    daemon.replies["submit"] = {"job": job_view(), "existing": False}
    daemon.replies["show"] = {
        "job": job_view(),
        "events": [event(1, "status", status="queued", attempt=0)],
    }
    daemon.watch_events = [
        event(1, "status", status="queued", attempt=0),
        event(2, "status", status="running", attempt=1),
        event(3, "status", status="done", attempt=1, result={"pdf": "out.pdf"}),
    ]

    code = jobwarden("submit", "pdf", "{}", "--watch")

    assert code == 0
    assert capsys.readouterr().out.splitlines() == [
        "submitted job 12",
        "job 12 status queued attempt 0",
        "job 12 status running attempt 1",
        "job 12 status done attempt 1",
        "{",
        '  "pdf": "out.pdf"',
        "}",
    ]


# reaching the daemon


def test_an_absent_socket_exits_3_saying_where_it_looked(tmp_path, capsys):
    socket_path = tmp_path / "nobody-home.sock"

    code = main(["--socket", str(socket_path), "status"])

    err = capsys.readouterr().err
    assert code == 3
    assert str(socket_path) in err
    assert "no such file" in err
    assert "jobwarden serve" in err


def test_a_socket_left_behind_by_a_dead_daemon_exits_3_connection_refused(tmp_path, capsys):
    socket_path = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stale:
        stale.bind(str(socket_path))

    code = main(["--socket", str(socket_path), "jobs"])

    err = capsys.readouterr().err
    assert code == 3
    assert f"{socket_path}: connection refused" in err


def test_the_socket_path_comes_from_the_config(daemon, tmp_path, capsys):
    config = write_config(tmp_path, '[admin]\nsocket = "admin.sock"\n')
    daemon.replies["shutdown"] = {"stopping": True}

    code = main(["--config", str(config), "shutdown"])

    assert (code, capsys.readouterr().out) == (0, "daemon stopping\n")


def test_a_missing_config_is_a_usage_error(tmp_path, capsys):
    code = main(["--config", str(tmp_path / "absent.toml"), "status"])

    assert code == 2
    assert "absent.toml" in capsys.readouterr().err


# error replies


@pytest.mark.parametrize(
    ("argv", "error", "exit_code"),
    [
        (["show", "99"], ErrorBody("NOT_FOUND", "no job 99", False), 2),
        (["cancel", "12"], ErrorBody("INVALID_REQUEST", "job 12 is done", False), 2),
        (["submit", "pdf", "{}"], ErrorBody("DRAINING", "the daemon is draining", True), 1),
    ],
)
def test_an_error_reply_prints_code_and_message(daemon, jobwarden, capsys, argv, error, exit_code):
    daemon.replies[argv[0]] = error

    code = jobwarden(*argv)

    captured = capsys.readouterr()
    assert code == exit_code
    assert captured.err.startswith(f"error {error.code}: {error.message}")
    assert captured.out == ""


def json_error(captured: Any) -> dict[str, Any]:
    """The one JSON line a --json command wrote on stderr for its error; stdout empty."""
    assert captured.out == ""
    (line,) = captured.err.splitlines()
    return json.loads(line)


def test_json_errors_are_the_common_error_shape_on_stderr(daemon, jobwarden, capsys, tmp_path):
    refused = ErrorBody("QUEUE_FULL", "100 jobs queued", True, error_id="e-2", retry_after=30)
    daemon.replies["submit"] = refused

    assert jobwarden("submit", "pdf", "{}", "--json") == 1
    assert json_error(capsys.readouterr()) == msgspec.to_builtins(refused)

    # A usage error: what was typed is wrong, as an INVALID_REQUEST from the daemon would be.
    assert jobwarden("show", "twelve", "--json") == 2
    assert json_error(capsys.readouterr()) == {
        "code": "INVALID_REQUEST",
        "message": "argument JOB: expected a positive integer, got 'twelve'",
        "retryable": False,
    }
    assert jobwarden("--json", "frobnicate") == 2
    assert json_error(capsys.readouterr())["message"].startswith(
        "argument COMMAND: invalid choice: 'frobnicate'"
    )

    # No daemon: worth retrying, since one that is starting answers soon.
    absent = tmp_path / "absent.sock"
    assert main(["--socket", str(absent), "jobs", "--json"]) == 3
    unreachable = json_error(capsys.readouterr())
    assert (unreachable["code"], unreachable["retryable"]) == ("UNREACHABLE", True)
    assert unreachable["message"].startswith(f"cannot reach the jobwarden daemon at {absent}")

    bad_config = write_config(tmp_path, '[store]\nsynchronous = "normal-ish"\n')
    assert main(["--config", str(bad_config), "--json", "status"]) == 2
    assert json_error(capsys.readouterr()) == {
        "code": "INVALID_CONFIG",
        "message": f"{bad_config}: store.synchronous: expected one of OFF, NORMAL, FULL, "
        'EXTRA; got "normal-ish"',
        "retryable": False,
    }


def test_a_usage_error_without_json_reads_as_argparse_words_it(daemon, jobwarden, capsys):
    assert jobwarden("show", "twelve") == 2
    assert capsys.readouterr().err.splitlines() == [
        "usage: jobwarden show [-h] [--config PATH] [--socket PATH] [--json] JOB",
        "jobwarden show: error: argument JOB: expected a positive integer, got 'twelve'",
    ]


def test_status_pid_prints_the_answering_daemons_pid_alone(daemon, jobwarden, capsys):
    assert jobwarden("status", "--pid") == 0
    assert capsys.readouterr().out == "4242\n"
    assert daemon.commands() == ["ping"]


def test_an_internal_error_shows_the_error_id_to_look_up_in_the_log(daemon, jobwarden, capsys):
    daemon.replies["status"] = ErrorBody("INTERNAL", "something broke", False, error_id="e-1f3a")

    code = jobwarden("status")

    assert code == 1
    assert capsys.readouterr().err == "error INTERNAL: something broke (error id e-1f3a)\n"


def test_a_job_id_must_be_a_positive_integer(daemon, jobwarden, capsys):
    code = jobwarden("show", "twelve")

    assert code == 2
    assert "argument JOB: expected a positive integer, got 'twelve'" in capsys.readouterr().err
    assert daemon.requests == []


# jobs, show, status, pause


def test_jobs_json_prints_the_list_and_sends_the_filters(daemon, jobwarden, capsys):
    listed = [job_view(id=13, status="running"), job_view(id=12, status="failed")]
    daemon.replies["jobs"] = {"jobs": listed}

    code = jobwarden("jobs", "--status", "running,failed", "--status", "queued", "--json")

    assert code == 0
    assert json.loads(capsys.readouterr().out) == listed
    assert daemon.requests[0]["args"] == {"status": ["running", "failed", "queued"]}


def test_jobs_rejects_an_unknown_status(daemon, jobwarden, capsys):
    code = jobwarden("jobs", "--status", "runing")

    assert code == 2
    assert "expected statuses from queued, running" in capsys.readouterr().err


def test_jobs_prints_an_aligned_table(daemon, jobwarden, capsys, monkeypatch):
    # The ages are counted from the CLI's clock: held at the time the job views were made, so
    # a slow run reaching this test late still sees their age as a minute and a half.
    monkeypatch.setattr(time, "time", lambda: NOW)
    daemon.replies["jobs"] = {
        "jobs": [
            job_view(id=13, status="running", attempt=2, progress=0.38, message="page 3/8"),
            job_view(id=9, kind="thumbnail", status="queued", reason="paused"),
            job_view(id=8, kind="thumbnail", status="queued"),
        ],
        "waiting": {
            "9": waiting("kind thumbnail paused", position=3),
            "8": waiting("position 1 of 3", position=1),
        },
    }

    code = jobwarden("jobs")

    assert code == 0
    assert capsys.readouterr().out.splitlines() == [
        "ID  KIND       USER   STATUS   ATTEMPT  PROGRESS  AGE  WAITING                                 DETAIL",  # noqa: E501
        "13  pdf        local  running  2/4      38%       1m   -                                       page 3/8",  # noqa: E501
        "9   thumbnail  local  queued   0/4      -         1m   kind thumbnail paused; position 3 of 3  paused",  # noqa: E501
        "8   thumbnail  local  queued   0/4      -         1m   position 1 of 3 (1 of 2 in its kind)",  # noqa: E501
    ]


def waiting(reason: str, *, position: int) -> dict:
    return {
        "position": position,
        "queued": 3,
        "kind_position": 1,
        "kind_queued": 2,
        "reason": reason,
    }


def test_show_prints_the_job_why_it_waits_and_its_events(daemon, jobwarden, capsys):
    daemon.replies["show"] = {
        "job": job_view(reason="paused"),
        "events": [event(1, "status", status="queued", attempt=0)],
        "waiting": waiting("kind pdf paused", position=2),
    }

    code = jobwarden("show", "12")

    lines = capsys.readouterr().out.splitlines()
    assert code == 0
    assert lines[:6] == [
        "job       12",
        "kind      pdf",
        "user      local",
        "status    queued (paused)",
        "waiting   kind pdf paused; position 2 of 3",
        "attempt   0/4",
    ]
    assert 'payload   {"pages": 8}' in lines
    assert lines[-2:] == [
        "events:",
        f"  {time.strftime('%H:%M:%S', time.localtime(NOW))}  status queued attempt 0",
    ]


def node_view(node: int, host: str, pid: int, *, leader: bool) -> dict[str, Any]:
    return {
        "id": node,
        "host": host,
        "pid": pid,
        "started_at": 1_800_000_000.0,
        "heartbeat_at": 1_800_000_100.0,
        "lease_until": 1_800_000_130.0,
        "leader": leader,
    }


def test_status_summarises_the_daemon(daemon, jobwarden, capsys):
    daemon.replies["status"] = {
        "version": "0.1.0",
        "pid": 4242,
        "uptime": 7300,
        "draining": False,
        "jobs": {"queued": 3, "running": 1, "done": 40},
        "running": 1,
        "max_concurrent_jobs": 2,
        "paused": ["pdf"],
        "paused_all": False,
        "queue_depth": {"pdf": 3},
        "oldest_queued_seconds": 90,
        "stuck": {"last_check": 0, "recovered": {"stuck": 2}},
        "system": {"memory_percent": 41.5, "memory_available_gb": 13.2, "cpu_percent": 7.0},
        "breakers": {"image": breaker_view("open", open_until=OPEN_UNTIL), "llm": breaker_view()},
        "budget": budget_view(),
        "node": 2,
        "leader": False,
        "nodes": [
            node_view(1, "web1", 77, leader=True),
            node_view(2, "web2", 4242, leader=False),
        ],
    }

    code = jobwarden("status")

    assert code == 0
    assert capsys.readouterr().out.splitlines() == [
        "daemon     jobwarden 0.1.0, pid 4242, up 2h",
        "state      accepting jobs",
        "nodes      1 web1 pid 77 (maintenance), 2 web2 pid 4242 (this)",
        "running    1 of 2 slots",
        "jobs       queued 3, running 1, done 40, failed 0, canceled 0",
        "queued     pdf 3 (oldest waiting 1m)",
        "paused     pdf",
        "recovered  stuck 2",
        f"breakers   image open until {clock(OPEN_UNTIL)}, llm closed",
        "budget     $12.34 of $500 today",
        "system     memory 42% (13.2 GB free), cpu 7%",
    ]


def test_status_shows_a_budget_stop_and_no_breakers(daemon, jobwarden, capsys):
    daemon.replies["status"] = status_reply(
        breakers={}, budget=budget_view(stopped=True, daily_usd=0)
    )

    code = jobwarden("status")

    lines = capsys.readouterr().out.splitlines()
    assert code == 0
    assert "breakers   none" in lines
    assert "budget     $12.34 today — STOPPED" in lines


def test_status_of_an_older_daemon_leaves_out_breakers_and_budget(daemon, jobwarden, capsys):
    daemon.replies["status"] = status_reply()

    code = jobwarden("status")

    out = capsys.readouterr().out
    assert code == 0
    assert "recovered" in out
    assert "breakers" not in out
    assert "budget" not in out


def test_pause_without_a_kind_pauses_everything(daemon, jobwarden, capsys):
    daemon.replies["pause"] = {"paused": [], "all": True}

    code = jobwarden("pause")

    assert (code, capsys.readouterr().out) == (0, "paused: every kind\n")
    assert daemon.requests[0]["args"] == {}


# watch


def test_watch_prints_events_once_and_the_result_then_exits_0(daemon, jobwarden, capsys):
    daemon.replies["show"] = {
        "job": job_view(status="running", attempt=1, progress=0.25),
        "events": [
            event(1, "status", status="running", attempt=1),
            event(2, "progress", fraction=0.25, message="page 2/8"),
        ],
    }
    daemon.watch_events = [
        event(1, "status", status="running", attempt=1),
        event(2, "progress", fraction=0.25, message="page 2/8"),
        event(3, "progress", fraction=0.375, message="page 3/8"),
        event(4, "status", status="done", attempt=1, result={"pages": 8}),
    ]

    code = jobwarden("watch", "12")

    assert code == 0
    assert capsys.readouterr().out.splitlines() == [
        "job 12 status running attempt 1",
        "job 12 progress 25% page 2/8",
        "job 12 progress 38% page 3/8",
        "job 12 status done attempt 1",
        "{",
        '  "pages": 8',
        "}",
    ]
    # The whole history comes from the watch's replay, from the first event on.
    assert daemon.requests[-1]["args"] == {"job": 12, "since": 0}


def test_watch_shows_a_queued_jobs_place_and_its_costs(daemon, jobwarden, capsys):
    daemon.replies["show"] = {
        "job": job_view(status="queued"),
        "events": [event(1, "status", status="queued", attempt=0)],
    }
    daemon.watch_events = [
        event(1, "status", status="queued", attempt=0),
        event(2, "position", **waiting("no free slot (2 of 2 running)", position=2)),
        event(3, "position", **waiting("position 1 of 3", position=1)),
        event(4, "status", status="running", attempt=1),
        event(5, "cost", service="image", units=1, usd=0.024, ok=True, job_usd=0.0264),
        event(6, "status", status="done", attempt=1, result={"ok": True}),
    ]

    code = jobwarden("watch", "12")

    assert code == 0
    assert capsys.readouterr().out.splitlines()[:6] == [
        "job 12 status queued attempt 0",
        "job 12 waiting no free slot (2 of 2 running); position 2 of 3",
        "job 12 waiting position 1 of 3 (1 of 2 in its kind)",
        "job 12 status running attempt 1",
        "job 12 cost image $0.0240, job total $0.0264",
        "job 12 status done attempt 1",
    ]


def shown_waiting_for_a_slot() -> dict[str, Any]:
    """`show` of job 12, queued behind a full pool."""
    return {
        "job": job_view(status="queued"),
        "events": [event(1, "status", status="queued", attempt=0)],
        "waiting": waiting("no free slot (2 of 2 running)", position=2),
    }


def test_watch_says_first_why_a_queued_job_waits(daemon, jobwarden, capsys):
    daemon.replies["show"] = shown_waiting_for_a_slot()
    daemon.watch_events = [
        event(1, "status", status="queued", attempt=0),
        event(2, "status", status="done", attempt=1),
    ]

    code = jobwarden("watch", "12")

    assert code == 0
    assert capsys.readouterr().out.splitlines()[0] == (
        "job 12 waiting no free slot (2 of 2 running); position 2 of 3"
    )


def test_watch_exits_1_with_the_error_when_the_job_fails(daemon, jobwarden, capsys):
    daemon.replies["show"] = {"job": job_view(status="running", attempt=4), "events": []}
    error = {"code": "TIMEOUT", "message": "ran longer than 15m", "retryable": True}
    daemon.watch_events = [event(7, "status", status="failed", attempt=4, error=error)]

    code = jobwarden("watch", "12")

    captured = capsys.readouterr()
    assert code == 1
    assert captured.out == "job 12 status failed attempt 4\n"
    assert captured.err == "job 12 failed: TIMEOUT: ran longer than 15m\n"


def test_watch_shows_a_retry_being_scheduled(daemon, jobwarden, capsys):
    daemon.replies["show"] = {"job": job_view(status="running", attempt=1), "events": []}
    daemon.watch_events = [
        event(5, "status", status="queued", attempt=1, reason="TIMEOUT", available_at=NOW + 30),
        event(6, "status", status="canceled", attempt=1, reason="canceled by local"),
    ]

    code = jobwarden("watch", "12")

    assert code == 1
    assert capsys.readouterr().out.splitlines() == [
        "job 12 status queued attempt 1 (TIMEOUT) next try in 30s",
        "job 12 status canceled attempt 1 (canceled by local)",
    ]


def test_watch_of_a_finished_job_reports_it_without_waiting(daemon, jobwarden, capsys):
    daemon.replies["show"] = {"job": job_view(status="done", result=[1, 2]), "events": []}

    code = jobwarden("watch", "12")

    assert code == 0
    assert capsys.readouterr().out == "[\n  1,\n  2\n]\n"
    assert daemon.commands() == ["show"]


def test_watch_json_prints_one_event_per_line(daemon, jobwarden, capsys):
    daemon.replies["show"] = {"job": job_view(status="running"), "events": []}
    daemon.watch_events = [
        event(3, "progress", fraction=0.5),
        event(4, "status", status="done", attempt=1, result=None),
    ]

    code = jobwarden("watch", "12", "--json")

    lines = capsys.readouterr().out.splitlines()
    assert code == 0
    assert [json.loads(line) for line in lines] == daemon.watch_events


def test_watch_losing_the_daemon_mid_job_exits_3(daemon, jobwarden, capsys):
    daemon.replies["show"] = {"job": job_view(status="running"), "events": []}
    daemon.watch_events = [event(3, "progress", fraction=0.5)]

    code = jobwarden("watch", "12")

    assert code == 3
    assert "the daemon closed the connection" in capsys.readouterr().err


# drain


def test_drain_wait_returns_once_the_daemon_is_gone(daemon, jobwarden, capsys):
    def drain(args: dict[str, Any]) -> dict[str, Any]:
        daemon.stop()
        return {"draining": True, "running": 2}

    daemon.replies["drain"] = drain

    code = jobwarden("drain", "--wait")

    assert code == 0
    assert capsys.readouterr().out.splitlines() == [
        "draining: admitting no jobs; 2 running jobs may finish, then the daemon exits",
        "daemon stopped",
    ]


# breakers


def test_breakers_prints_a_table_of_services(daemon, jobwarden, capsys):
    daemon.replies["breakers"] = {
        "image": breaker_view("open", open_until=OPEN_UNTIL, opened=3, failures=40),
        "llm": breaker_view("half_open", in_flight=1, calls=9),
    }

    code = jobwarden("breakers")

    assert code == 0
    assert capsys.readouterr().out.splitlines() == [
        "SERVICE  STATE      OPEN UNTIL  CALLS  FAILURES  OPENED  IN FLIGHT",
        f"image    open       {clock(OPEN_UNTIL)}    1,520  40        3       0",
        "llm      half-open  -           9      12        0       1",
    ]
    assert daemon.requests[0]["args"] == {}


def test_breakers_with_no_services_says_so(daemon, jobwarden, capsys):
    daemon.replies["breakers"] = {}

    assert jobwarden("breakers") == 0
    assert capsys.readouterr().out == "no services configured\n"


def test_breakers_json_prints_the_reply(daemon, jobwarden, capsys):
    daemon.replies["breakers"] = {"llm": breaker_view()}

    code = jobwarden("breakers", "--json")

    assert code == 0
    assert json.loads(capsys.readouterr().out) == {"llm": breaker_view()}


@pytest.mark.parametrize(
    ("action", "view", "said"),
    [
        ("trip", breaker_view("open", open_until=OPEN_UNTIL), f"open until {clock(OPEN_UNTIL)}"),
        ("reset", breaker_view(), "closed"),
    ],
)
def test_breaker_trips_or_resets_one_service(daemon, jobwarden, capsys, action, view, said):
    daemon.replies["breaker"] = {"image": view}

    code = jobwarden("breaker", action, "image")

    assert (code, capsys.readouterr().out) == (0, f"breaker image: {said}\n")
    assert daemon.requests[0]["args"] == {"service": "image", "action": action}


def test_breaker_json_prints_the_reply(daemon, jobwarden, capsys):
    daemon.replies["breaker"] = {"image": breaker_view()}

    code = jobwarden("breaker", "reset", "image", "--json")

    assert code == 0
    assert json.loads(capsys.readouterr().out) == {"image": breaker_view()}


def test_breaker_rejects_an_unknown_action(daemon, jobwarden, capsys):
    code = jobwarden("breaker", "open", "image")

    assert code == 2
    assert "invalid choice: 'open'" in capsys.readouterr().err
    assert daemon.requests == []


def test_breaker_of_an_unknown_service_exits_2(daemon, jobwarden, capsys):
    daemon.replies["breaker"] = ErrorBody("NOT_FOUND", "no service 'imgae'", False)

    code = jobwarden("breaker", "trip", "imgae")

    assert code == 2
    assert capsys.readouterr().err == "error NOT_FOUND: no service 'imgae'\n"


# ledger


def ledger_reply(**fields: Any) -> dict[str, Any]:
    reply = {
        "period": "2026-11",
        "by": "service",
        "groups": [
            {"service": "llm", "calls": 2000, "failed": 12, "units": 1250000.0, "usd": 31.25},
            {"service": "image", "calls": 133, "failed": 0, "units": 44.5, "usd": 2.2},
        ],
        "calls": 2133,
        "failed_calls": 12,
        "usd": 33.45,
        "jobs": 150,
        "usd_per_job": 0.223,
        "month_projection_usd": 6690.0,
    }
    reply.update(fields)
    return reply


def test_ledger_prints_a_table_then_the_totals(daemon, jobwarden, capsys):
    daemon.replies["ledger"] = ledger_reply()

    code = jobwarden("ledger", "--month", "2026-11")

    assert code == 0
    assert capsys.readouterr().out.splitlines() == [
        "SERVICE  CALLS  FAILED  UNITS      USD",
        "llm      2,000  12      1,250,000  $31.2500",
        "image    133    0       44.5       $2.2000",
        "total $33.4500 for 2,133 calls (12 failed) over 150 jobs in 2026-11",
        "cost per job $0.2230",
        "month projection $6,690.00",
    ]
    assert daemon.requests[0]["args"] == {"month": "2026-11", "by": "service"}


def test_ledger_of_a_day_by_user_without_a_projection(daemon, jobwarden, capsys):
    daemon.replies["ledger"] = ledger_reply(
        period="2026-11-22",
        by="user",
        groups=[{"user": "ana", "calls": 1, "failed": 1, "units": 0.0, "usd": 0.0}],
        calls=1,
        failed_calls=1,
        usd=0.0,
        jobs=0,
        usd_per_job=None,
        month_projection_usd=None,
    )
    del daemon.replies["ledger"]["month_projection_usd"]

    code = jobwarden("ledger", "--day", "2026-11-22", "--by", "user")

    assert code == 0
    assert capsys.readouterr().out.splitlines() == [
        "USER  CALLS  FAILED  UNITS  USD",
        "ana   1      1       0      $0.0000",
        "total $0.0000 for 1 call (1 failed) over 0 jobs in 2026-11-22",
    ]
    assert daemon.requests[0]["args"] == {"day": "2026-11-22", "by": "user"}


def test_ledger_names_the_calls_that_cost_more_than_they_reserved(daemon, jobwarden, capsys):
    daemon.replies["ledger"] = ledger_reply(overruns=2, overrun_usd=4.99)

    assert jobwarden("ledger") == 0

    assert capsys.readouterr().out.splitlines()[-2:] == [
        "overruns: 2 calls past their reservations by $4.9900 (raise the services' max_units)",
        "month projection $6,690.00",
    ]


def test_ledger_without_calls_says_so(daemon, jobwarden, capsys):
    daemon.replies["ledger"] = ledger_reply(
        period="2026-11-22", groups=[], calls=0, failed_calls=0, usd=0.0, jobs=0, usd_per_job=None
    )

    code = jobwarden("ledger")

    assert (code, capsys.readouterr().out) == (0, "no calls in 2026-11-22\n")
    assert daemon.requests[0]["args"] == {"by": "service"}


def test_ledger_json_prints_the_reply(daemon, jobwarden, capsys):
    daemon.replies["ledger"] = ledger_reply()

    code = jobwarden("ledger", "--month", "2026-11", "--by", "kind", "--json")

    assert code == 0
    assert json.loads(capsys.readouterr().out) == ledger_reply()
    assert daemon.requests[0]["args"] == {"month": "2026-11", "by": "kind"}


@pytest.mark.parametrize(
    ("argv", "complaint"),
    [
        (["--day", "2026-11-31"], "argument --day: expected a day as YYYY-MM-DD, got '2026-11-31'"),
        (["--day", "2026-1-5"], "argument --day: expected a day as YYYY-MM-DD, got '2026-1-5'"),
        (["--month", "2026-13"], "argument --month: expected a month as YYYY-MM, got '2026-13'"),
        (["--month", "11/2026"], "argument --month: expected a month as YYYY-MM, got '11/2026'"),
        (["--day", "2026-11-22", "--month", "2026-11"], "not allowed with argument --day"),
        (["--by", "team"], "argument --by: invalid choice: 'team'"),
    ],
)
def test_ledger_rejects_bad_periods_and_groupings(daemon, jobwarden, capsys, argv, complaint):
    code = jobwarden("ledger", *argv)

    assert code == 2
    assert complaint in capsys.readouterr().err
    assert daemon.requests == []


# budget


def test_budget_shows_spend_against_the_limits(daemon, jobwarden, capsys):
    daemon.replies["budget"] = budget_view(reserved=0.5)

    code = jobwarden("budget")

    assert code == 0
    assert capsys.readouterr().out.splitlines() == [
        "today     $12.3400 of $500 (2%), $487.66 left",
        "month     $120.00 of $10,000 (1%), $9,880.00 left, projection $3,720.00",
        "reserved  $0.5000 held for calls in flight",
        "alerts    at 50%, 80%, 100% of the daily limit",
        "state     spending",
    ]
    assert daemon.requests[0]["args"] == {"action": "show"}


def test_budget_shows_a_stop_and_no_limits(daemon, jobwarden, capsys):
    until = time.mktime((2026, 11, 23, 0, 0, 0, 0, 0, -1))
    daemon.replies["budget"] = budget_view(
        daily_usd=0.0,
        monthly_usd=0.0,
        remaining_today=None,
        remaining_month=None,
        stopped=True,
        stop_reason="daily budget of $500 reached",
        stopped_until=until,
    )

    code = jobwarden("budget", "show")

    assert code == 0
    assert capsys.readouterr().out.splitlines() == [
        "today     $12.3400, no limit",
        "month     $120.00, no limit, projection $3,720.00",
        "reserved  $0.0000 held for calls in flight",
        "state     STOPPED: daily budget of $500 reached, until 2026-11-23 00:00:00",
    ]
    assert daemon.requests[0]["args"] == {"action": "show"}


def test_budget_set_sends_the_new_limits(daemon, jobwarden, capsys):
    daemon.replies["budget"] = budget_view(daily_usd=750.0, remaining_today=737.66)

    code = jobwarden("budget", "set", "--daily", "750")

    assert code == 0
    assert capsys.readouterr().out.splitlines()[0] == (
        "today     $12.3400 of $750 (2%), $737.66 left"
    )
    assert daemon.requests[0]["args"] == {"action": "set", "daily_usd": 750.0}


def test_budget_set_json_sends_both_limits(daemon, jobwarden, capsys):
    daemon.replies["budget"] = budget_view(daily_usd=0.0, monthly_usd=12.5)

    code = jobwarden("budget", "set", "--daily", "0", "--monthly", "12.50", "--json")

    assert code == 0
    assert json.loads(capsys.readouterr().out) == budget_view(daily_usd=0.0, monthly_usd=12.5)
    assert daemon.requests[0]["args"] == {"action": "set", "daily_usd": 0.0, "monthly_usd": 12.5}


def test_budget_resume_overrides_the_stop_for_today(daemon, jobwarden, capsys):
    daemon.replies["budget"] = budget_view(override_today=True)

    code = jobwarden("budget", "resume")

    assert code == 0
    assert capsys.readouterr().out.splitlines()[-1] == "state     spending (override for today)"
    assert daemon.requests[0]["args"] == {"action": "resume"}


@pytest.mark.parametrize(
    ("argv", "complaint"),
    [
        (["set"], "give --daily USD, --monthly USD or both"),
        (["set", "--daily", "-5"], "argument --daily: expected an amount of USD"),
        (["set", "--monthly", "lots"], "argument --monthly: expected an amount of USD"),
        (["set", "--daily", "nan"], "argument --daily: expected an amount of USD"),
        (["raise"], "invalid choice: 'raise'"),
    ],
)
def test_budget_rejects_bad_arguments(daemon, jobwarden, capsys, argv, complaint):
    code = jobwarden("budget", *argv)

    assert code == 2
    assert complaint in capsys.readouterr().err
    assert daemon.requests == []


# finding the config, and writing the default one


def test_the_config_is_looked_up_in_order(tmp_path, monkeypatch, capsys):
    """--config, then $JOBWARDEN_CONFIG, then ./config.toml, then the system-wide one."""
    places = {}
    for place in ("flag", "env", "here", "system"):
        (tmp_path / place).mkdir()
        places[place] = write_config(tmp_path / place, f'[kinds.{place}]\ncommand = ["true"]\n')
    monkeypatch.chdir(tmp_path / "here")
    monkeypatch.setattr(config, "SYSTEM_CONFIG", places["system"])
    monkeypatch.setenv("JOBWARDEN_CONFIG", str(places["env"]))

    def chosen(*argv: str) -> str:
        assert main([*argv, "check-config"]) == 0
        return capsys.readouterr().out.removeprefix("ok: 1 kind (").removesuffix(")\n")

    assert chosen("--config", str(places["flag"])) == "flag"
    assert chosen() == "env"
    monkeypatch.delenv("JOBWARDEN_CONFIG")
    assert chosen() == "here"
    places["here"].unlink()
    assert chosen() == "system"
    places["system"].unlink()
    assert main(["check-config"]) == 2
    assert "jobwarden init" in capsys.readouterr().err


def test_init_makes_the_directory_and_says_what_to_do_there(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)

    code = main(["init", "site"])

    out = capsys.readouterr().out
    assert code == 0
    assert (tmp_path / "site" / "config.toml").read_text() == default_config_text()
    assert f"next, in {tmp_path.resolve() / 'site'}:" in out


def test_init_json_says_where_everything_will_be(tmp_path, capsys):
    code = main(["--json", "init", str(tmp_path)])

    directory = tmp_path.resolve()
    assert code == 0
    assert json.loads(capsys.readouterr().out) == {
        "config": str(directory / "config.toml"),
        "directory": str(directory),
        "kinds": ["storybook", "shell"],
        "admin_socket": str(directory / "var" / "admin.sock"),
        "database": str(directory / "var" / "jobwarden.db"),
        "admin_group": None,
        "websocket": "127.0.0.1:8765",
        "http": "127.0.0.1:8766",
    }


# check-config


def test_check_config_lists_the_kinds_of_a_good_config(tmp_path, capsys):
    config = write_config(
        tmp_path,
        '[kinds.render]\nhandler = "json:dumps"\n\n[kinds.convert]\ncommand = ["true"]\n',
    )

    code = main(["check-config", str(config)])

    assert (code, capsys.readouterr().out) == (0, "ok: 2 kinds (render, convert)\n")


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ('[kinds.render]\nhandler = "no_such_module_jw:run"\n', "kinds.render.handler: cannot"),
        ('[kinds.render]\nhandler = "json:dumps"\ntimeout = "fast"\n', "kinds.render.timeout"),
    ],
)
def test_check_config_rejects_a_bad_config_naming_the_key(tmp_path, capsys, text, complaint):
    config = write_config(tmp_path, text)

    code = main(["--config", str(config), "check-config"])

    err = capsys.readouterr().err
    assert code == 2
    assert str(config) in err
    assert complaint in err


def test_watch_all_shows_breaker_changes_beside_job_events(daemon, jobwarden, capsys):
    breaker_change = {
        "seq": 40,
        "job": 0,
        "user": "",
        "kind": "image",
        "type": "breaker",
        "at": NOW,
        "data": {"service": "image", "state": "open", "open_until": OPEN_UNTIL},
    }
    daemon.watch_events = [breaker_change, event(41, "progress", fraction=0.5, message="page 4/8")]

    code = jobwarden("watch", "--all")

    lines = capsys.readouterr().out.splitlines()
    until = time.strftime("%H:%M:%S", time.localtime(OPEN_UNTIL))
    assert lines == [f"breaker image open until {until}", "job 12 progress 50% page 4/8"]
    assert code == 3  # the fake daemon hangs up after its events


def test_watch_takes_the_outcome_from_the_replay_when_the_job_just_finished(
    daemon, jobwarden, capsys
):
    # The job row was read as running, but its terminal event is already in the history.
    error = {"code": "TEST_FAILURE", "message": "asked to fail", "retryable": False}
    daemon.replies["show"] = {
        "job": job_view(status="running"),
        "events": [event(5, "status", status="failed", attempt=1, error=error)],
    }
    daemon.watch_events = [
        event(4, "status", status="running", attempt=1),
        event(5, "status", status="failed", attempt=1, error=error),
    ]

    code = jobwarden("watch", "12")

    captured = capsys.readouterr()
    assert code == 1
    assert captured.out.splitlines() == [
        "job 12 status running attempt 1",
        "job 12 status failed attempt 1",
    ]
    assert "TEST_FAILURE" in captured.err


def test_watch_of_a_finished_job_replays_its_whole_history(daemon, jobwarden, capsys):
    # `show` gives the latest 20 events; the watch replays all 60 of them, in order.
    history = [event(1, "status", status="queued", attempt=0)]
    history += [event(n, "progress", fraction=n / 100) for n in range(2, 60)]
    history.append(event(60, "status", status="done", attempt=1, result={"pages": 8}))
    daemon.replies["show"] = {"job": job_view(status="done"), "events": history[-20:]}
    daemon.watch_events = history

    code = jobwarden("watch", "12")

    lines = capsys.readouterr().out.splitlines()
    assert code == 0
    assert lines[0] == "job 12 status queued attempt 0"
    assert lines[1:59] == [f"job 12 progress {n}%" for n in range(2, 60)]
    assert lines[59] == "job 12 status done attempt 1"


def test_watch_of_a_job_retried_after_failing_follows_it_past_the_old_failure(
    daemon, jobwarden, capsys
):
    error = {"code": "TIMEOUT", "message": "too slow", "retryable": True}
    daemon.replies["show"] = {
        "job": job_view(status="queued", attempt=1),
        "events": [
            event(2, "status", status="failed", attempt=1, error=error),
            event(3, "status", status="queued", attempt=1, reason="MANUAL_RETRY"),
        ],
    }
    daemon.watch_events = [
        event(1, "status", status="running", attempt=1),
        event(2, "status", status="failed", attempt=1, error=error),
        event(3, "status", status="queued", attempt=1, reason="MANUAL_RETRY"),
        event(4, "status", status="done", attempt=1, result=None),
    ]

    code = jobwarden("watch", "12")

    assert code == 0
    assert capsys.readouterr().out.splitlines()[-1] == "job 12 status done attempt 1"


# as a process: pipes, terminals and shells


def run_cli(daemon: FakeDaemon, *argv: str, pipe_into: str, tmp_path: Path) -> tuple[int, str, str]:
    """`jobwarden ARGV | PIPE_INTO` in bash: jobwarden's exit code, what the pipe printed,
    and what jobwarden wrote on stderr."""
    errors = tmp_path / "stderr.txt"
    command = shlex.join(jobwarden_command("--socket", daemon.path, *argv))
    finished = subprocess.run(
        ["bash", "-c", f"{command} 2>{errors} | {pipe_into}; exit ${{PIPESTATUS[0]}}"],
        capture_output=True,
        text=True,
        env=daemon_env(),
        timeout=30,
        check=False,
    )
    return finished.returncode, finished.stdout, errors.read_text()


def test_a_reader_that_leaves_early_ends_show_quietly(daemon, tmp_path):
    # Far more than a pipe holds, so the reader is gone while jobwarden still writes.
    events = [event(n, "progress", fraction=0.5, message="x" * 60) for n in range(1, 5001)]
    daemon.replies["show"] = {"job": job_view(status="running"), "events": events}

    code, out, err = run_cli(daemon, "show", "12", pipe_into="head -3", tmp_path=tmp_path)

    assert (code, err) == (141, "")
    assert out.splitlines() == ["job       12", "kind      pdf", "user      local"]


def test_a_reader_that_leaves_early_ends_jobs_quietly(daemon, tmp_path):
    daemon.replies["jobs"] = {"jobs": [job_view(id=n) for n in range(5000, 0, -1)]}

    code, out, err = run_cli(daemon, "jobs", pipe_into="head -1", tmp_path=tmp_path)

    assert (code, err) == (141, "")
    assert " ".join(out.split()) == "ID KIND USER STATUS ATTEMPT PROGRESS AGE WAITING DETAIL"


def test_a_piped_watch_prints_a_readable_line_per_event(daemon, tmp_path):
    daemon.replies["show"] = shown_waiting_for_a_slot()
    daemon.watch_events = [
        event(1, "status", status="queued", attempt=0),
        event(2, "position", **waiting("position 1 of 3", position=1)),
        event(3, "status", status="running", attempt=1),
        event(4, "progress", fraction=0.5, message="page 4/8"),
        event(5, "checkpoint", pages=4),
        event(6, "cost", service="image", units=1, usd=0.024, ok=True, job_usd=0.048),
        event(7, "status", status="done", attempt=1, result={"pages": 8}),
    ]

    code, out, err = run_cli(daemon, "watch", "12", pipe_into="cat", tmp_path=tmp_path)

    assert (code, err) == (0, "")
    assert out.splitlines() == [
        "job 12 waiting no free slot (2 of 2 running); position 2 of 3",
        "job 12 status queued attempt 0",
        "job 12 waiting position 1 of 3 (1 of 2 in its kind)",
        "job 12 status running attempt 1",
        "job 12 progress 50% page 4/8",
        'job 12 checkpoint {"pages": 4}',
        "job 12 cost image $0.0240, job total $0.0480",
        "job 12 status done attempt 1",
        "{",
        '  "pages": 8',
        "}",
    ]


def on_a_terminal(daemon: FakeDaemon, *argv: str, **env: str) -> str:
    """What `jobwarden ARGV` prints on a pseudo-terminal of 120 columns."""
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    with subprocess.Popen(
        jobwarden_command("--socket", daemon.path, *argv),
        stdin=subprocess.DEVNULL,
        stdout=terminal,
        stderr=subprocess.PIPE,
        env={**daemon_env(), "TERM": "xterm-256color", "COLUMNS": "120", **env},
    ) as process:
        os.close(terminal)
        printed = b""
        while True:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            printed += chunk
        assert process.wait(timeout=30) == 0, process.stderr.read()
    os.close(controller)
    return printed.decode()


def test_statuses_are_coloured_on_a_terminal_and_plain_in_a_pipe(daemon, tmp_path):
    daemon.replies["jobs"] = {
        "jobs": [job_view(id=2, status="failed"), job_view(id=1, status="done")]
    }
    daemon.replies["show"] = {"job": job_view(status="done"), "events": []}

    table = on_a_terminal(daemon, "jobs")
    shown = on_a_terminal(daemon, "show", "12")
    plain = on_a_terminal(daemon, "jobs", NO_COLOR="1")

    assert "\x1b[1;31mfailed" in table and "\x1b[32mdone" in table
    assert "\x1b[32mdone\x1b[0m" in shown
    # NO_COLOR: the table's headers may stay bold, but no status has a colour.
    assert "\x1b[32m" not in plain and "\x1b[1;31m" not in plain
    # In a pipe the same words come plain: the piped tests above compare them line by line.


@pytest.fixture(scope="module")
def completion_scripts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """`jobwarden completion SHELL` for each shell, saved where a test can source it."""
    scripts = {}
    for shell in ("bash", "zsh", "fish"):
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            assert main(["completion", shell]) == 0
        scripts[shell] = tmp_path_factory.mktemp(shell) / f"jobwarden.{shell}"
        scripts[shell].write_text(printed.getvalue())
    return scripts


@pytest.mark.parametrize(
    ("words", "offered"),
    [
        (["wat"], ["watch"]),
        (["serve", "--ht"], ["--http-listen"]),
        (["completion", ""], ["bash", "zsh", "fish"]),
        (["jobs", "--sta"], ["--status"]),
    ],
    ids=["command", "serve-flag", "shells", "option"],
)
def test_bash_completes_commands_and_options(completion_scripts, words, offered):
    script = completion_scripts["bash"]
    line = " ".join(["jobwarden", *words])
    completed = subprocess.run(
        [
            "bash",
            "-c",
            f"source {script}; COMP_WORDS=(jobwarden {' '.join(map(shlex.quote, words))} ); "
            f"COMP_CWORD={len(words)}; COMP_LINE={shlex.quote(line)}; COMP_POINT={len(line)}; "
            '_shtab_jobwarden; printf "%s\\n" "${COMPREPLY[@]}"',
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert completed.stdout.split() == offered


@pytest.mark.skipif(shutil.which("fish") is None, reason="fish is not installed")
def test_fish_completes_commands_and_options(completion_scripts):
    script = completion_scripts["fish"]
    completed = subprocess.run(
        [
            "fish",
            "-c",
            f'source {script}; complete -C "jobwarden wat"; complete -C "jobwarden serve --we"',
        ],
        capture_output=True,
        text=True,
        check=True,
        env={**daemon_env(), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"},
    )
    assert [line.split("\t")[0] for line in completed.stdout.splitlines()] == [
        "watch",
        "--websocket-listen",
    ]


@pytest.mark.skipif(shutil.which("zsh") is None, reason="zsh is not installed")
def test_zsh_loads_the_completion_for_jobwarden(completion_scripts, tmp_path):
    functions = tmp_path / "functions"
    functions.mkdir()
    shutil.copy(completion_scripts["zsh"], functions / "_jobwarden")
    loaded = subprocess.run(
        [
            "zsh",
            "-f",
            "-c",
            f"fpath=({functions} $fpath); autoload -U compinit; compinit -u -D; "
            "print ${_comps[jobwarden]}",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert loaded.stdout.strip() == "_jobwarden"


# -- bulk actions ----------------------------------------------------------------------------


def bulk_outcome(action: str, dry_run: bool, matched: int, ids: list[int], **more: object) -> dict:
    return {"action": action, "dry_run": dry_run, "matched": matched, "ids": ids, **more}


def test_the_cli_without_a_terminal_needs_yes(daemon, jobwarden, capsys, monkeypatch):
    daemon.replies["retry_many"] = lambda args: bulk_outcome(
        "retry", args.get("dry_run", False), 2, [4, 9], changed=0 if args.get("dry_run") else 2
    )
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    code = jobwarden("retry", "--status", "failed", "--code", "SERVICE_FAILED", "--since", "1h")
    assert code == 2
    assert "add --yes to run it" in capsys.readouterr().err
    assert [r["args"]["dry_run"] for r in daemon.requests] == [True]
    assert daemon.requests[0]["args"]["filter"] == {
        "status": ["failed"],
        "code": "SERVICE_FAILED",
        "since": 3600.0,
    }

    assert jobwarden("retry", "--status", "failed", "--dry-run") == 0
    assert capsys.readouterr().out == "2 jobs match: 4, 9\n"
    assert jobwarden("retry", "--status", "failed", "--yes") == 0
    assert capsys.readouterr().out == "2 jobs queued again: 4, 9\n"
    assert [r["args"].get("dry_run") for r in daemon.requests[1:]] == [True, True, None]


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(("answer", "code", "acted"), [("y\n", 0, True), ("\n", 1, False)])
def test_the_cli_asks_on_a_terminal(
    daemon,
    jobwarden,
    capsys,
    monkeypatch,
    answer,
    code,
    acted,
):
    daemon.replies["cancel_many"] = lambda args: bulk_outcome(
        "cancel", args.get("dry_run", False), 3, [1, 2], changed=3, refused={}
    )
    monkeypatch.setattr("sys.stdin", Terminal(answer))
    assert jobwarden("cancel", "--kind", "render", "--show", "2") == code
    out = capsys.readouterr().out
    assert out.startswith("3 jobs match: 1, 2 and 1 more\ncancel 3 jobs? [y/N] ")
    assert len(daemon.requests) == (2 if acted else 1)


def test_the_cli_takes_a_job_or_a_filter(daemon, jobwarden, capsys):
    assert jobwarden("cancel") == 2
    assert "give a JOB, or a filter" in capsys.readouterr().err
    assert jobwarden("cancel", "7", "--kind", "x") == 2
    assert "not both" in capsys.readouterr().err
    assert daemon.requests == []


# -- logs ------------------------------------------------------------------------------------


def log_line(line_id: int, line: str, stream: str = "stdout") -> dict[str, Any]:
    return {"id": line_id, "attempt": 1, "at": NOW, "stream": stream, "line": line}


def test_logs_says_how_many_lines_were_dropped_and_pages_through_the_rest(
    daemon, jobwarden, capsys
):
    pages = {0: [log_line(n, f"line {n}") for n in range(1, 1001)], 1000: [log_line(1001, "last")]}
    daemon.replies["logs"] = lambda args: {"dropped": 180, "lines": pages[args.get("after", 0)]}

    assert jobwarden("logs", "12") == 0

    out = capsys.readouterr().out.splitlines()
    assert out[0] == "[180 lines dropped]"
    assert out[1] == f"{clock(NOW)} stdout line 1"
    assert out[-1] == f"{clock(NOW)} stdout last"
    assert [r["args"]["after"] for r in daemon.requests] == [0, 1000]


def test_logs_never_sends_a_control_character_to_the_terminal(daemon, jobwarden, capsys):
    # Whatever the daemon sends: the CLI makes sure of it.
    daemon.replies["logs"] = {"dropped": 0, "lines": [log_line(1, "\x1b]0;owned\x07", "stderr")]}

    assert jobwarden("logs", "12") == 0

    assert capsys.readouterr().out == f"{clock(NOW)} stderr \\x1b]0;owned\\x07\n"
