"""The jobwarden CLI against a fake daemon: what a user sees, and the exit code."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from daemon.cli import main
from daemon.protocol import ErrorBody, encode_line

NOW = time.time()


class FakeDaemon:
    """Serves the admin protocol from canned replies on a Unix socket, in a thread.

    `replies` maps a command to its data, an ErrorBody, or a function of the request's args
    returning either. After the watch reply it streams `watch_events`, then hangs up, so a
    client that misses the end of a job fails fast instead of waiting forever.
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
                    for event in self.watch_events:
                        connection.sendall(encode_line({"id": request["id"], "event": event}))
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
    view = {
        "id": 12,
        "kind": "pdf",
        "user": "local",
        "status": "queued",
        "priority": 0,
        "attempt": 0,
        "max_attempts": 4,
        "created_at": NOW - 90,
        "updated_at": NOW,
        "available_at": NOW - 90,
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


def test_jobs_prints_an_aligned_table(daemon, jobwarden, capsys):
    daemon.replies["jobs"] = {
        "jobs": [
            job_view(id=13, status="running", attempt=2, progress=0.38, message="page 3/8"),
            job_view(id=9, kind="thumbnail", status="queued", reason="paused"),
        ]
    }

    code = jobwarden("jobs")

    assert code == 0
    assert capsys.readouterr().out.splitlines() == [
        "ID  KIND       USER   STATUS   ATTEMPT  PROGRESS  AGE  DETAIL",
        "13  pdf        local  running  2/4      38%       1m   page 3/8",
        "9   thumbnail  local  queued   0/4      -         1m   paused",
    ]


def test_show_prints_the_job_why_it_waits_and_its_events(daemon, jobwarden, capsys):
    daemon.replies["show"] = {
        "job": job_view(reason="paused"),
        "events": [event(1, "status", status="queued", attempt=0)],
        "waiting": "kind pdf is paused",
    }

    code = jobwarden("show", "12")

    lines = capsys.readouterr().out.splitlines()
    assert code == 0
    assert lines[:6] == [
        "job       12",
        "kind      pdf",
        "user      local",
        "status    queued (paused)",
        "waiting   kind pdf is paused",
        "attempt   0/4",
    ]
    assert 'payload   {"pages": 8}' in lines
    assert lines[-2:] == [
        "events:",
        f"  {time.strftime('%H:%M:%S', time.localtime(NOW))}  status queued attempt 0",
    ]


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
    }

    code = jobwarden("status")

    assert code == 0
    assert capsys.readouterr().out.splitlines() == [
        "daemon     jobwarden 0.1.0, pid 4242, up 2h",
        "state      accepting jobs",
        "running    1 of 2 slots",
        "jobs       queued 3, running 1, done 40, failed 0, canceled 0",
        "queued     pdf 3 (oldest waiting 1m)",
        "paused     pdf",
        "recovered  stuck 2",
        "system     memory 42% (13.2 GB free), cpu 7%",
    ]


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
    assert daemon.requests[-1]["args"] == {"job": 12, "since": 2}


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
