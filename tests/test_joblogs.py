"""Job logs: what a python handler logs (ctx.log, logging inside its task) and what a command
writes besides its protocol, kept per job within a size, written in batches, read and
followed over the admin socket, the WebSocket and the CLI, pruned with the job."""

from __future__ import annotations

import logging
from functools import partial

import pytest
import trio

from jobwarden.errors import RequestError
from jobwarden.process.commands import OPERATOR, Caller
from jobwarden.store import joblogs, jobs
from jobwarden.wire.views import LogLine
from tests.conftest import opened_database
from tests.process import daemon_factory, run_jobwarden
from tests.test_websocket import Frames, add_user, open_frames

pytestmark = pytest.mark.both_stores

KINDS = """
[kinds.chatty]
handler = "tests.handlers:chatty"
timeout = "1h"
"""


def texts(lines: list[LogLine]) -> list[str]:
    return [line.line for line in lines]


async def test_a_handlers_ctx_log_and_logging_in_its_tasks_are_kept_in_order(
    autojump_clock, start_daemon
):
    daemon = await start_daemon(KINDS)
    job = await daemon.submit("chatty", {"lines": 2, "text": "two\nlines"})
    # Outside any job: not anyone's log.
    logging.getLogger("tests.chatty").warning("not in a job")
    await daemon.wait_done(job.id)
    page = await daemon.commands.logs(OPERATOR, job.id)
    assert texts(page.lines) == [
        "line 0",
        "line 1",
        "two",
        "lines",
        f"WARNING tests.chatty: from a child task of job {job.id}",
    ]
    assert {(line.stream, line.attempt) for line in page.lines} == {("log", 1)}
    assert page.dropped == 0


async def test_lines_are_printable_and_clipped(autojump_clock, start_daemon):
    daemon = await start_daemon("[job_logs]\nmax_line_chars = 40\n" + KINDS)
    job = await daemon.submit("chatty", {"lines": 0, "text": "\x07\x1b[2J" + "x" * 60})
    await daemon.wait_done(job.id)
    line = (await daemon.commands.logs(OPERATOR, job.id)).lines[0].line
    # Escaped first (the bell and the escape as text), then cut to 40 characters.
    assert line == "\\x07\\x1b[2J" + "x" * 29 + "…[31 more chars]"


async def test_a_log_past_its_size_drops_its_oldest_lines_and_counts_them(
    autojump_clock, start_daemon
):
    daemon = await start_daemon('[job_logs]\nmax_bytes = "1KB"\nmax_line_chars = 100\n' + KINDS)
    job = await daemon.submit("chatty", {"lines": 500})
    await daemon.wait_done(job.id)
    page = await daemon.commands.logs(OPERATOR, job.id)
    kept = texts(page.lines)
    # "line N" lines of 9 bytes (newline counted) or so: about a hundred fit in a KB.
    assert page.dropped + len(kept) == 501
    assert sum(len(text) + 1 for text in kept) <= 1024
    assert kept[-2] == "line 499"
    assert kept[0] == f"line {page.dropped}"


async def test_a_thousand_lines_take_a_handful_of_writes(autojump_clock, start_daemon):
    daemon = await start_daemon(KINDS)
    writes = daemon.handle.store.writes
    job = await daemon.submit("chatty", {"lines": 1000})
    await daemon.wait_done(job.id)
    # Submit, claim, outcome, and the log's batches: not a write a line.
    assert daemon.handle.store.writes - writes < 10
    assert len((await daemon.commands.logs(OPERATOR, job.id)).lines) == 1000


async def test_following_a_running_job_ends_with_it(autojump_clock, start_daemon):
    daemon = await start_daemon(KINDS)
    job = await daemon.submit("chatty", {"lines": 4, "every": 10})
    await daemon.wait_status(job.id, {"running"})
    seen: list[tuple[float, str]] = []

    async def send(line: LogLine) -> None:
        seen.append((trio.current_time(), line.line))

    started = trio.current_time()
    ended = await daemon.commands.follow_logs(OPERATOR, send, job.id)
    assert ended.status == "done"
    assert [text for _, text in seen][:4] == ["line 0", "line 1", "line 2", "line 3"]
    # Each line reached the follower within a flush of being written, not at the end.
    assert seen[1][0] - started < 10 + 1


async def test_logs_are_pruned_with_their_job(autojump_clock, start_daemon):
    daemon = await start_daemon(KINDS)
    job = await daemon.submit("chatty", {"lines": 3})
    await daemon.wait_done(job.id)
    await daemon.handle.store.write(partial(jobs.prune_finished, before=daemon.now + 1, batch=10))
    assert (
        await daemon.handle.store.read(partial(joblogs.read, job_id=job.id, after=0, limit=10))
        is None
    )
    with pytest.raises(RequestError) as caught:
        await daemon.commands.logs(OPERATOR, job.id)
    assert caught.value.body.code == "NOT_FOUND"
    with opened_database(daemon.handle.store.path) as conn:
        assert conn.execute("SELECT COUNT(*) FROM job_logs").fetchone() == (0,)


async def test_a_user_reads_only_their_own_jobs_logs(autojump_clock, start_daemon):
    daemon = await start_daemon(KINDS)
    job = await daemon.submit("chatty", {"lines": 1}, user="alice")
    await daemon.wait_done(job.id)
    with pytest.raises(RequestError) as caught:
        await daemon.commands.logs(Caller(user="bob"), job.id)
    assert caught.value.body.code == "NOT_FOUND"


async def test_logs_over_the_websocket(start_daemon):
    daemon = await start_daemon(KINDS)
    token = await add_user(daemon, "erin")
    job = await daemon.submit("chatty", {"lines": 2}, user="erin")
    other = await daemon.submit("chatty", {"lines": 2}, user="bob")
    with trio.fail_after(10):
        async with open_frames(daemon, token) as ws:
            frames = Frames(ws)
            followed = await frames.ask(op="logs", id=1, job=job.id, follow=True)
            end = await frames.receive()
            while end["type"] == "log":
                end = await frames.receive()
            page = await frames.ask(op="logs", id=2, job=job.id, after=0)
            refused = await frames.ask(op="logs", id=3, job=other.id)
    assert followed == {"type": "logs", "id": 1, "job": job.id, "dropped": 0, "lines": []}
    assert (end["type"], end["job"]["status"]) == ("log_end", "done")
    assert [line["line"] for line in page["lines"]][:2] == ["line 0", "line 1"]
    assert refused["error"]["code"] == "NOT_FOUND"


@pytest.fixture
def daemons(tmp_path):
    yield from daemon_factory(tmp_path)


COMMAND = (
    "echo started; echo '{\"progress\": 0.5}'; echo oops >&2; printf '\\033[31mred\\n';"
    ' echo \'{"result": {"ok": true}}\''
)


def test_a_commands_output_and_stderr_with_the_cli(daemons):
    daemon = daemons({"kinds": {"shell": {"command": ["sh", "-c", COMMAND]}}})
    with daemon.client() as admin:
        job = admin.call("submit", kind="shell", payload={})["job"]["id"]
        follow = list(admin.follow_logs(job))
    assert follow[-1]["ended"]["status"] == "done"
    socket = ["--socket", str(daemon.socket_path)]
    done = run_jobwarden("logs", str(job), *socket, cwd=daemon.directory)
    assert done.returncode == 0, done.stderr
    shown = [line.split(" ", 1)[1] for line in done.stdout.splitlines()]
    # The protocol lines drive the job; the rest is its log, in the order each stream wrote it.
    assert sorted(shown) == sorted(["stdout started", "stderr oops", "stdout \\x1b[31mred"])
    assert "\x1b" not in done.stdout
    followed = run_jobwarden("logs", str(job), "-f", *socket, cwd=daemon.directory)
    assert followed.stdout.splitlines()[:3] == done.stdout.splitlines()
    assert followed.stdout.splitlines()[3:] == [f"[job {job} done]"]
