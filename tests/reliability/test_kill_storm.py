"""A kill -9 storm against the real daemon: what "at-least-once" means, in figures.

Jobs are submitted in one pipelined batch, and another batch is cut short by a kill; the
daemon is killed -9 at random moments while they run and is restarted each time. Then:
nothing accepted is lost, every job ends exactly once in the store (one terminal status
event), and the handlers that ran to completion twice are counted: each appends "<job id>
<attempt>" to a file as it returns, so a job with two lines was killed between its handler's
return and the commit of its outcome, and ran again. That count is the honest price of
at-least-once delivery; the figures are printed (run with -s to see them).

The default form runs a few kills during a few hundred jobs; the long form (-m slow) is the
one README.md quotes: 100 kills during 10,000 jobs.
"""

from __future__ import annotations

import collections
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.process import DaemonFactory, daemon_factory
from tests.test_integration import (
    errors_logged,
    follow_jobs,
    kill_and_restart,
    open_database,
    pipelined_submit,
)


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[DaemonFactory]:
    yield from daemon_factory(tmp_path)


STORM_CONFIG = {
    # Every job is meant to end done: a crash loop would need more kills than any job sees.
    "daemon": {"max_concurrent_jobs": 16, "crash_loop_after": 1000},
    "kinds": {"recorded": {"handler": "tests.handlers:records_completion", "max_attempts": 50}},
}


@pytest.mark.parametrize(
    ("kills", "jobs", "seed"),
    [
        pytest.param(3, 300, 1, id="3-kills-300-jobs"),
        pytest.param(100, 10_000, 2, id="100-kills-10000-jobs", marks=pytest.mark.slow),
    ],
)
def test_kill_storm_loses_nothing_and_ends_every_job_once(daemons, tmp_path, kills, jobs, seed):
    rng = random.Random(seed)
    completions = tmp_path / "completions.log"
    payload = {"log": str(completions)}
    daemon = daemons(STORM_CONFIG)

    accepted = set(pipelined_submit(daemon, [payload] * jobs, kind="recorded"))
    # One more kill while a batch is still arriving: every ok reply before it must survive.
    cut_short = pipelined_submit(
        daemon, [payload] * 200, kind="recorded", kill_after_replies=rng.randrange(10, 100)
    )
    assert not daemon.running
    accepted |= set(cut_short)
    daemon.start()
    with daemon.client() as client:
        stored = sum(client.call("status")["jobs"].values())
    # Kill after a random number of jobs finished, as a client sees it: jobs are mid-run.
    for finished_before_kill in sorted(rng.sample(range(stored // 20, stored * 19 // 20), kills)):
        follow_jobs(daemon, until=lambda p, n=finished_before_kill: len(p.finished) >= n)
        kill_and_restart(daemon)
    # Submissions whose reply a kill swallowed may exist too; they must end as well.
    progress = follow_jobs(daemon, until=lambda p: len(p.finished) == stored)
    assert daemon.stop() == 0
    assert errors_logged(daemon) == []

    with open_database(daemon) as database:
        statuses = dict(database.execute("SELECT id, status FROM jobs"))
        terminal_events = collections.Counter(
            job_id
            for (job_id,) in database.execute(
                "SELECT job_id FROM events WHERE type = 'status' AND "
                "json_extract(data, '$.status') IN ('done', 'failed', 'canceled')"
            )
        )
        recovered = {
            job_id
            for (job_id,) in database.execute(
                "SELECT job_id FROM events WHERE json_extract(data, '$.reason') = 'RECOVERED'"
            )
        }
    runs = collections.Counter(
        int(line.split()[0]) for line in completions.read_text().splitlines()
    )
    lost = accepted - set(statuses)
    ended_twice = {job: n for job, n in terminal_events.items() if n != 1}
    completed_twice = {job: n for job, n in runs.items() if n > 1}
    print(
        f"\nkill storm: {daemon.starts - 1} kill -9 during {len(statuses)} jobs "
        f"({len(accepted)} acknowledged); lost {len(lost)}; ended more than once "
        f"{len(ended_twice)}; recovered after a kill {len(recovered)}; "
        f"handlers that ran to completion twice {len(completed_twice)}"
    )
    assert not lost, f"accepted jobs lost by kill -9: {sorted(lost)[:20]}"
    assert set(statuses.values()) == {"done"}
    assert ended_twice == {} and set(terminal_events) == set(statuses)
    assert progress.finished == set(statuses)
    # Every job's handler ran to completion at least once; more than once only after a kill.
    assert set(runs) == set(statuses)
    assert set(completed_twice) <= recovered
    assert recovered, "no kill landed while a job ran, so recovery went untested"
