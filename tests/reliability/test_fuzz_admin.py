"""Fuzzing the admin socket of a real `jobwarden serve`, as a hostile local user would.

Each connection sends a few generated lines (see fuzz.Hostile), then either shuts down its
sending side and reads every reply, or hangs up at once. Throughout, the daemon must not exit,
every request on a connection that waits must be answered with a documented code, and `status`
on a fresh connection must answer within 2 s; RSS and the log must stay bounded.

The default run sends a few hundred lines; `-m slow` sends JOBWARDEN_FUZZ_FRAMES (100,000).
The figures are printed (`-s` shows them).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.process import DaemonFactory, daemon_factory
from tests.reliability.fuzz import (
    SEED,
    Figures,
    Hostile,
    Probe,
    admin_exchange,
    long_form,
    requests_in,
)

CONFIG = {
    # A line may hold several fields nested 100,000 deep: it must meet the depth check, not
    # the line limit.
    "admin": {"max_line_bytes": 8 * 1024 * 1024},
    "daemon": {"max_concurrent_jobs": 4},
}


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[DaemonFactory]:
    yield from daemon_factory(tmp_path)


def fuzz_admin(daemons: DaemonFactory, lines: int, seed: int) -> Figures:
    daemon = daemons(CONFIG)
    with daemon.client() as admin:
        admin.call("users", action="add", name="fuzz")
    rng = random.Random(seed)
    hostile = Hostile(seed, kinds=["quick"])
    figures = Figures("admin socket", daemon)
    figures.start()
    with Probe(daemon) as probe:
        while figures.sent < lines and daemon.running:
            batch = [hostile.admin_request(hostile.request_id()) for _ in range(rng.randint(1, 8))]
            # Now and then the last line comes without its newline: it is never answered.
            data = b"\n".join(batch) + (b"\n" if rng.random() < 0.9 else b"")
            waits = rng.random() < 0.9
            try:
                replies, clean = admin_exchange(daemon.socket_path, data, half_close=waits)
            except (TimeoutError, ConnectionError, ValueError) as exc:
                figures.unanswered.append(f"{type(exc).__name__}: {exc}: {data[:200]!r}")
                continue
            figures.sent += len(batch)
            figures.connections += 1
            for reply in replies:
                figures.answered(reply)
            if waits and (len(replies) != requests_in(data) or not clean):
                figures.unanswered.append(f"{len(replies)} replies to {data[:300]!r}")
        figures.finish(probe)
    print(figures.report())
    return figures


def test_a_few_hundred_hostile_admin_lines_are_each_answered_and_the_daemon_serves_on(daemons):
    fuzz_admin(daemons, lines=400, seed=SEED).check()


@pytest.mark.slow
def test_a_hundred_thousand_hostile_admin_lines_are_each_answered_and_the_daemon_serves_on(
    daemons,
):
    lines, seed = long_form()
    fuzz_admin(daemons, lines=lines, seed=seed).check()
