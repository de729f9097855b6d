"""Command kinds: a real child process speaking JSON lines, killed by process group."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import structlog
import trio

from jobwarden.errors import RequestError

pytestmark = pytest.mark.both_stores

SCRIPT = """
import json, os, sys, time
mode = sys.argv[1]
print(json.dumps({"progress": 0.5, "message": "halfway"}), flush=True)
print("not a protocol line", flush=True)
print(json.dumps({"checkpoint": {"at": 1, "attempt": os.environ["JOBWARDEN_ATTEMPT"]}}), flush=True)
if mode == "ok":
    print(json.dumps({"charge": {"service": "paid", "units": 2}}), flush=True)
    print(json.dumps({"result": {"word": sys.argv[2]}}), flush=True)
elif mode == "malformed":
    print(sys.argv[2], flush=True)
    print(json.dumps({"result": {"word": "otter"}}), flush=True)
    print(sys.argv[2], flush=True)
elif mode == "retry":
    sys.exit(75 if int(os.environ["JOBWARDEN_ATTEMPT"]) < 2 else 0)
elif mode == "fail":
    for n in range(30):
        print(f"stderr line {n}", file=sys.stderr)
    sys.exit(3)
elif mode == "hang":
    import subprocess
    child = subprocess.Popen(["sleep", "300"])
    open(sys.argv[2], "w").write(str(child.pid))
    time.sleep(300)
"""


@pytest.fixture
def kinds(tmp_path: Path) -> str:
    script = tmp_path / "child.py"
    script.write_text(SCRIPT)
    python = os.environ.get("PYTHON", __import__("sys").executable)
    return f"""
[services.paid]
price_usd = 0.5

[kinds.cmd]
command = ["{python}", "{script}", "{{payload.mode}}", "{{payload.arg}}"]
timeout = "2s"
max_attempts = 2
backoff = ["0s"]
stderr_tail_lines = 5
"""


async def test_command_reports_progress_checkpoint_and_result(start_daemon, kinds):
    daemon = await start_daemon(kinds)
    job = await daemon.submit("cmd", {"mode": "ok", "arg": "otter"})
    final = await daemon.wait_done(job.id)
    assert final.status == "done"
    assert final.result == {"word": "otter"}
    assert final.checkpoint == {"at": 1, "attempt": "1"}
    progress = [e.data for e in await daemon.events(job.id) if e.type == "progress"]
    assert progress == [{"fraction": 0.5, "message": "halfway"}]
    charged = await daemon.handle.store.read(
        lambda conn: conn.execute("SELECT service, units, usd FROM ledger").fetchall()
    )
    assert charged == [("paid", 2.0, 1.0)]


@pytest.mark.parametrize(
    "line",
    [
        '{"progress": 0.7, "message": {"a": 1}}',
        '{"progress": "half"}',
        '{"progress": 1' + "0" * 400 + "}",
        '{"heartbeat": "yes"}',
        '{"charge": "paid"}',
        '{"charge": {"service": 7}}',
        '{"charge": {"service": "paid", "units": "two"}}',
        '{"charge": {"service": "paid", "units": 1' + "0" * 400 + "}}",
        '{"charge": {"service": "unknown", "units": 1}}',
    ],
    ids=[
        "message-not-text",
        "progress-not-a-number",
        "progress-too-large",
        "heartbeat-not-boolean",
        "charge-not-an-object",
        "charge-service-not-text",
        "charge-units-not-a-number",
        "charge-units-too-large",
        "charge-unknown-service",
    ],
)
async def test_a_malformed_protocol_line_is_ignored_with_one_warning(start_daemon, kinds, line):
    daemon = await start_daemon(kinds)
    with structlog.testing.capture_logs() as logs:
        job = await daemon.submit("cmd", {"mode": "malformed", "arg": line})
        final = await daemon.wait_done(job.id)
    assert (final.status, final.attempt, final.result) == ("done", 1, {"word": "otter"})
    progress = [e.data for e in await daemon.events(job.id) if e.type == "progress"]
    assert progress == [{"fraction": 0.5, "message": "halfway"}]
    charged = await daemon.handle.store.read(
        lambda conn: conn.execute("SELECT count(*) FROM ledger").fetchone()[0]
    )
    assert charged == 0
    warnings = [entry for entry in logs if entry["log_level"] == "warning"]
    assert [entry["event"] for entry in warnings] == ["bad protocol line from command"]


async def test_exit_75_retries_and_succeeds(start_daemon, kinds):
    daemon = await start_daemon(kinds)
    final = await daemon.wait_done((await daemon.submit("cmd", {"mode": "retry", "arg": 1})).id)
    assert (final.status, final.attempt) == ("done", 2)


async def test_other_exit_fails_with_the_stderr_tail(start_daemon, kinds):
    daemon = await start_daemon(kinds)
    final = await daemon.wait_done((await daemon.submit("cmd", {"mode": "fail", "arg": 1})).id)
    assert final.status == "failed"
    assert final.attempt == 1
    assert final.error.message.startswith("exit status 3")
    assert "stderr line 29" in final.error.message
    assert "stderr line 24" not in final.error.message


async def test_timeout_kills_the_whole_process_group(start_daemon, kinds, tmp_path):
    daemon = await start_daemon(kinds.replace("max_attempts = 2", "max_attempts = 1"))
    pidfile = tmp_path / "grandchild.pid"
    job = await daemon.submit("cmd", {"mode": "hang", "arg": str(pidfile)})
    final = await daemon.wait_done(job.id)
    assert (final.status, final.error.code) == ("failed", "TIMEOUT")
    await exited(int(pidfile.read_text()))


async def exited(pid: int) -> None:
    """Wait (bounded) until `pid` is gone: a pidfd turns readable when the process exits."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        with trio.fail_after(10):
            await trio.lowlevel.wait_readable(pidfd)
    finally:
        os.close(pidfd)


async def test_missing_template_field_is_refused_at_admission(start_daemon, kinds):
    daemon = await start_daemon(kinds)
    with pytest.raises(RequestError) as refused:
        await daemon.submit("cmd", {"mode": "ok"})
    assert refused.value.body.code == "INVALID_REQUEST"
    assert "payload.arg is required" in refused.value.body.message
    with pytest.raises(RequestError) as refused:
        await daemon.submit("cmd", {"mode": {"nested": 1}, "arg": 1})
    assert "payload.mode must be a string or number" in refused.value.body.message
