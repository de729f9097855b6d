"""The monitor on MockClock: rules fire exactly at their thresholds, and only then."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import trio
from structlog.testing import capture_logs

from jobwarden.actors.messages import HealthQuery, RunRules
from jobwarden.actors.rules import evaluate, failure_rate, paused_since, still_stuck
from jobwarden.config import load_config_text
from jobwarden.mailbox import ReplySlot
from jobwarden.metrics import Metrics
from jobwarden.store import jobs
from jobwarden.store.monitor import Candidates, Row, StuckRow
from tests.conftest import EPOCH

pytestmark = pytest.mark.both_stores

KINDS = """
[monitor]
interval = "30s"
stuck_after = "15m"
stall_after = "5m"
queued_timeout = "30m"

[kinds.stepper]
handler = "tests.handlers:stepper"
timeout = "off"

[kinds.hang]
handler = "tests.handlers:hang"
timeout = "off"
max_attempts = 2
backoff = ["0s"]

[kinds.hang_once]
handler = "tests.handlers:hang_once"
timeout = "off"

[kinds.stalled]
handler = "tests.handlers:stalled"
timeout = "off"
max_attempts = 1

[kinds.sleepy]
handler = "tests.handlers:sleepy"
timeout = "off"
"""


def trail(events) -> list[tuple[float, str, str | None]]:
    return [
        (round(e.at - EPOCH, 3), e.data["status"], e.data.get("reason"))
        for e in events
        if e.type == "status"
    ]


async def run_rules(daemon, *, dry_run: bool) -> list[dict]:
    reply = ReplySlot()
    await daemon.handle.monitor.send(RunRules(dry_run=dry_run, reply=reply))
    return await reply.wait()


async def test_a_job_that_reports_for_an_hour_is_never_flagged(autojump_clock, start_daemon):
    daemon = await start_daemon(KINDS)
    job = await daemon.submit("stepper", {"steps": 60, "step_seconds": 60})
    final = await daemon.wait_done(job.id)
    assert final.status == "done"
    assert final.finished_at - EPOCH == 3600
    assert trail(await daemon.events(job.id)) == [
        (0, "queued", None),
        (0, "running", None),
        (3600, "done", None),
    ]


async def test_a_hung_job_is_stopped_at_exactly_stuck_after_then_fails(
    autojump_clock, start_daemon
):
    daemon = await start_daemon(KINDS)
    job = await daemon.submit("hang")
    final = await daemon.wait_done(job.id)
    assert (final.status, final.error.code, final.attempt) == ("failed", "STUCK_TIMEOUT", 2)
    assert "no heartbeat for 15m" in final.error.message
    assert trail(await daemon.events(job.id)) == [
        (0, "queued", None),
        (0, "running", None),
        (900, "queued", "RETRY"),
        (900, "running", None),
        (1800, "failed", "STUCK_TIMEOUT"),
    ]


async def test_heartbeats_without_progress_are_caught_as_a_stall(autojump_clock, start_daemon):
    daemon = await start_daemon(KINDS)
    job = await daemon.submit("stalled")
    final = await daemon.wait_done(job.id)
    assert (final.status, final.error.code) == ("failed", "STUCK_TIMEOUT")
    assert final.error.message.startswith("stall: progress unchanged at 50%")
    assert final.finished_at - EPOCH == 300


async def test_three_injected_stuck_jobs_are_all_recovered(autojump_clock, start_daemon):
    daemon = await start_daemon(KINDS, max_concurrent_jobs=3)
    stuck = [await daemon.submit("hang_once") for _ in range(3)]
    finals = [await daemon.wait_done(job.id) for job in stuck]
    assert [(f.status, f.attempt) for f in finals] == [("done", 2)] * 3
    assert all(f.finished_at - EPOCH == 900 for f in finals)
    status = await daemon_health(daemon)
    assert status["stuck"]["recovered"] == {"stuck": 3}


async def daemon_health(daemon, *, by_kind: bool = False) -> dict:
    reply = ReplySlot()
    await daemon.handle.monitor.send(HealthQuery(reply=reply, by_kind=by_kind))
    return await reply.wait()


@pytest.mark.parametrize("where", ["running", "queued"])
async def test_sla_breach_fails_the_job(autojump_clock, start_daemon, where):
    daemon = await start_daemon(
        KINDS + '\n[kinds.late]\nhandler = "tests.handlers:hang"\nsla = "10m"\ntimeout = "off"\n',
        max_concurrent_jobs=1,
    )
    if where == "queued":
        await daemon.submit("sleepy", {"seconds": 7200})
    job = await daemon.submit("late")
    final = await daemon.wait_done(job.id)
    assert (final.status, final.error.code) == ("failed", "SLA_BREACH")
    assert final.finished_at - EPOCH == 600
    assert trail(await daemon.events(job.id))[-2][1] == where


async def test_a_job_waiting_too_long_for_a_slot_fails_queued_timeout(autojump_clock, start_daemon):
    daemon = await start_daemon(KINDS, max_concurrent_jobs=1)
    blocker = await daemon.submit("stepper", {"steps": 120, "step_seconds": 60})
    waiting = await daemon.submit("sleepy", {"seconds": 1})
    final = await daemon.wait_done(waiting.id)
    assert (final.status, final.error.code) == ("failed", "QUEUED_TIMEOUT")
    assert final.finished_at - EPOCH == 1800
    assert (await daemon.job(blocker.id)).status == "running"


async def test_a_paused_kind_waits_without_timing_out(autojump_clock, start_daemon):
    from jobwarden.actors.messages import Pause

    daemon = await start_daemon(KINDS)
    reply = ReplySlot()
    await daemon.handle.scheduler.send(Pause(kind="sleepy", reply=reply))
    await reply.wait()
    job = await daemon.submit("sleepy", {"seconds": 1})
    await trio.sleep(4 * 3600)
    assert (await daemon.job(job.id)).status == "queued"


async def test_dry_run_reports_and_changes_nothing(autojump_clock, start_daemon):
    daemon = await start_daemon(KINDS)
    job = await daemon.submit("hang")
    await daemon.wait_status(job.id, {"running"})
    # Between two of the monitor's 30 s checks, so only the dry run looks.
    await trio.sleep(45)
    # The handler's last sign of life is made an hour old behind the monitor's back.
    await daemon.handle.store.write(
        lambda conn, events: conn.execute(
            "UPDATE jobs SET heartbeat_at = heartbeat_at - 3600 WHERE id = ?", (job.id,)
        )
    )
    findings = await run_rules(daemon, dry_run=True)
    assert findings == [
        {
            "job": job.id,
            "kind": "hang",
            "status": "running",
            "rule": "stuck",
            "action": "requeue",
            "detail": "no heartbeat for 1h45s",
        }
    ]
    assert (await daemon.job(job.id)).status == "running"
    assert len(await daemon.events(job.id)) == 2
    findings = await run_rules(daemon, dry_run=False)
    assert [f["rule"] for f in findings] == ["stuck"]
    assert (await daemon.job(job.id)).attempt == 2


async def test_finished_jobs_are_pruned_after_retain_finished(autojump_clock, start_daemon):
    daemon = await start_daemon(
        KINDS.replace('interval = "30s"', 'interval = "30s"\nretain_finished = "1h"')
    )
    job = await daemon.submit("sleepy", {"seconds": 1})
    await daemon.wait_done(job.id)
    await trio.sleep(3600 + 60)
    assert await daemon.handle.store.read(partial(jobs.get_job, job_id=job.id)) is None
    assert await daemon.events(job.id) == []


RULES_CONFIG = load_config_text(
    """
[monitor]
stuck_after = "15m"
stall_after = "5m"
queued_timeout = "30m"

[kinds.render]
handler = "tests.handlers:noop"
sla = "2h"
""",
    base_dir=Path("."),
)


def row(status: str, **times: float) -> Row:
    """A render job created at 0, started at 60 if running, on its first of three attempts."""
    fields = {
        "id": 1,
        "kind": "render",
        "status": status,
        "created_at": 0.0,
        "started_at": 60.0 if status == "running" else None,
        "heartbeat_at": None,
        "progress_at": None,
        "progress": None,
        "attempt": 1,
        "max_attempts": 3,
        "available_at": 0.0,
    }
    return Row(**{**fields, **times})


@pytest.mark.parametrize(
    ("job", "now", "held", "rule", "next_check"),
    [
        pytest.param(row("running", heartbeat_at=600), 1000, False, None, 600 + 900, id="fine"),
        pytest.param(row("running", heartbeat_at=600), 1500, False, "stuck", None, id="stuck"),
        pytest.param(
            row("running", heartbeat_at=900, progress_at=700, progress=0.4),
            1000,
            False,
            "stall",
            None,
            id="stall",
        ),
        pytest.param(row("running", heartbeat_at=7000), 7200, False, "sla", None, id="sla"),
        pytest.param(row("queued"), 1800, False, "queued_timeout", None, id="queued too long"),
        pytest.param(row("queued"), 1800, True, None, 7200, id="held on purpose"),
        pytest.param(row("queued", held_back=True), 1800, False, None, None, id="job held"),
        pytest.param(
            row("queued", created_at=0, run_at=3600, available_at=3600),
            7200,
            True,
            None,
            None,
            id="sla counts from run_at",
        ),
        pytest.param(
            row("queued", created_at=0, run_at=3600, available_at=3600),
            3600 + 7200,
            True,
            "sla",
            None,
            id="sla breached after run_at",
        ),
    ],
)
def test_the_rules_are_a_function_of_the_rows_and_the_time(job, now, held, rule, next_check):
    running, queued = ([job], []) if job.status == "running" else ([], [job])
    found = Candidates(running, queued, None if running else 0.0, None if running else 0.0)
    findings, deadline = evaluate(
        RULES_CONFIG, found, held={"render"} if held else set(), all_held=False, now=now
    )
    assert [f.rule for f in findings] == ([rule] if rule else [])
    if next_check is not None:
        assert deadline == next_check


def test_a_pause_moves_the_deadlines_of_jobs_that_were_waiting_through_it():
    # The daemon was not running from 1000 to 1030 s.
    pauses = [(1030.0, 30.0)]
    assert paused_since(pauses, 600) == 30
    assert paused_since(pauses, 1020) == 10
    assert paused_since(pauses, 1030) == 0
    found = Candidates([row("running", heartbeat_at=600)], [], None, None)
    findings, deadline = evaluate(
        RULES_CONFIG, found, held=set(), all_held=False, now=1500, pauses=pauses
    )
    assert (findings, deadline) == ([], 600 + 900 + 30)


@pytest.mark.parametrize(
    ("now", "stuck"),
    [
        pytest.param(StuckRow(1, "running", 1, 60.0, 60.0), True, id="still being stopped"),
        pytest.param(StuckRow(1, "queued", 1, 60.0, 60.0), True, id="waits for its retry"),
        pytest.param(StuckRow(1, "running", 2, 900.0, 900.0), True, id="retry silent so far"),
        pytest.param(StuckRow(1, "running", 2, 900.0, 905.0), False, id="retry reported"),
        pytest.param(StuckRow(1, "queued", 2, 900.0, 900.0), False, id="retry ended"),
        pytest.param(StuckRow(1, "failed", 1, 60.0, 60.0), False, id="failed for good"),
    ],
)
def test_a_job_found_stuck_stays_stuck_until_it_is_heard_from(now, stuck):
    assert still_stuck({1: 1}, [now]) == ({1} if stuck else set())


def test_failure_rate_over_a_window():
    from collections import deque

    history = deque([(0.0, 0, 0), (300.0, 50, 0), (600.0, 100, 5), (1200.0, 200, 20)])
    rate, finished = failure_rate(history, now=1200.0, window=900.0)
    # The window starts at 300 s: the sample taken then is the baseline; older ones go.
    assert (rate, finished) == (20 / 170, 170)
    assert [sample[0] for sample in history] == [300.0, 600.0, 1200.0]


async def test_a_high_failure_rate_raises_an_alert(autojump_clock, start_daemon):
    daemon = await start_daemon(
        KINDS.replace('interval = "30s"', 'interval = "30s"\nfailure_min_jobs = 4')
    )
    with capture_logs() as logs:
        for n in range(6):
            await daemon.wait_done((await daemon.submit("sleepy", {"fail": n % 2 == 0})).id)
        await trio.sleep(120)
    alerts = [entry for entry in logs if entry["event"] == "alert"]
    assert [a["alert"] for a in alerts] == ["failure_rate"]
    assert alerts[0]["finished"] == 6


# A check every 10 minutes, thresholds of seconds: only exact deadlines catch these jobs.
SPARSE_CHECKS = (
    KINDS.replace(
        'interval = "30s"\nstuck_after = "15m"\nstall_after = "5m"',
        'interval = "10m"\nstuck_after = "3s"\nstall_after = "5s"\nstuck_alert = 2',
    )
    + """
[kinds.hang_always]
handler = "tests.handlers:hang"
timeout = "off"
max_attempts = 3
backoff = ["0s"]
"""
)


async def test_a_job_started_after_the_last_check_is_caught_at_exactly_stuck_after(
    autojump_clock, start_daemon
):
    daemon = await start_daemon(SPARSE_CHECKS)
    # The monitor checked at start-up; the job starts a second later.
    await trio.sleep(1)
    job = await daemon.submit("hang")
    await daemon.wait_done(job.id)
    assert trail(await daemon.events(job.id)) == [
        (1, "queued", None),
        (1, "running", None),
        (4, "queued", "RETRY"),
        (4, "running", None),
        (7, "failed", "STUCK_TIMEOUT"),
    ]


async def test_a_first_progress_report_starts_the_stall_clock_at_once(autojump_clock, start_daemon):
    daemon = await start_daemon(SPARSE_CHECKS.replace('stuck_after = "3s"', 'stuck_after = "1h"'))
    await trio.sleep(1)
    # It reports 50% as it starts, then only heartbeats.
    job = await daemon.submit("stalled")
    final = await daemon.wait_done(job.id)
    assert final.error.message.startswith("stall: progress unchanged at 50%")
    assert final.finished_at - EPOCH == 6


async def test_jobs_found_stuck_in_separate_checks_add_up(autojump_clock, start_daemon):
    daemon = await start_daemon(SPARSE_CHECKS, max_concurrent_jobs=4)
    with capture_logs() as logs:
        hung = []
        for _ in range(3):
            hung.append(await daemon.submit("hang_always"))
            await trio.sleep(1)
        recovers = await daemon.submit("hang_once")
        # Each is found alone, at its own deadline; retried, each hangs again.
        await trio.sleep(4)
        health = await daemon_health(daemon)
    assert health["stuck"]["now"] == 3
    assert health["stuck"]["last_check"] == 1
    alerts = [entry for entry in logs if entry["event"] == "alert"]
    assert [(a["alert"], a["count"], a["message"]) for a in alerts] == [
        ("stuck_jobs", 3, "3 jobs stuck now")
    ]
    assert (await daemon.job(recovers.id)).status == "done"
    # Once a job has failed for good it is no longer stuck; the rest still are.
    await daemon.wait_done(hung[0].id)
    assert (await daemon_health(daemon))["stuck"]["now"] == 2
    for job in hung[1:]:
        await daemon.wait_done(job.id)
    health = await daemon_health(daemon, by_kind=True)
    assert health["stuck"]["now"] == 0
    metrics = Metrics()
    metrics.set_state(health, health.pop("by_status_kind"), trio.current_time())
    assert b"jobwarden_jobs_stuck 0.0" in metrics.render()


async def test_time_the_daemon_was_not_running_is_not_counted_against_jobs(
    autojump_clock, start_daemon
):
    daemon = await start_daemon(
        SPARSE_CHECKS.replace('stuck_after = "3s"', 'stuck_after = "10s"'), max_concurrent_jobs=2
    )
    silent = await daemon.submit("hang")
    reporting = await daemon.submit("stepper", {"steps": 40, "step_seconds": 1})
    with capture_logs() as logs:
        await trio.sleep(5.5)
        # The process stops for 30 s (SIGSTOP, a paused VM): every timer is late at once.
        autojump_clock.jump(30)
        await daemon.wait_done(silent.id)
        done = await daemon.wait_done(reporting.id)
    # 10 s of its own silence, not 40: found at 10 s plus the pause. The probe was due at 6 s
    # and woke 29.5 s late; the pause may have begun up to its 1 s period earlier, and the job
    # gets the benefit of that doubt: 30.5 s. Its second attempt ran with no pause.
    assert trail(await daemon.events(silent.id))[2:] == [
        (10 + 30.5, "queued", "RETRY"),
        (40.5, "running", None),
        (40.5 + 10, "failed", "STUCK_TIMEOUT"),
    ]
    assert (done.status, done.attempt) == ("done", 1)
    pauses = [e for e in logs if e["event"].startswith("the daemon was not running")]
    assert [p["seconds"] for p in pauses] == [30.5]
