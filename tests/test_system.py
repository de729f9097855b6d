"""The one sampler of memory and CPU: every actor that reads the machine sees the same figures
for the same interval."""

from __future__ import annotations

import itertools

import psutil
import trio

from jobwarden.actors.messages import HealthQuery, SchedulerSnapshot
from jobwarden.mailbox import ask
from jobwarden.system import SystemSampler


def cpu_figures(monkeypatch) -> None:
    """psutil answers 10%, 11%, 12%, ... to each call, so a figure tells which call made it."""
    figures = itertools.count(10)
    monkeypatch.setattr(psutil, "cpu_percent", lambda interval=None: float(next(figures)))


def test_the_first_reading_has_no_cpu_figure(monkeypatch):
    cpu_figures(monkeypatch)
    sample = SystemSampler()
    # The first call only starts psutil's interval: its figure means nothing.
    assert sample().cpu_percent is None
    assert sample().cpu_percent == 11.0
    assert sample().memory_total == psutil.virtual_memory().total


async def test_the_monitor_and_the_scheduler_see_the_same_cpu_for_the_same_interval(
    autojump_clock, start_daemon, monkeypatch
):
    # Each used to call psutil itself, which measures from the previous call on the thread:
    # each got the CPU used since the other's call, and two different figures.
    cpu_figures(monkeypatch)
    daemon = await start_daemon(sample_system=SystemSampler())
    for elapsed in (7, 14, 21, 28):
        await trio.sleep_until(elapsed)
        health = await ask(daemon.handle.monitor, HealthQuery)
        scheduler = await ask(daemon.handle.scheduler, SchedulerSnapshot)
        # One reading at start (10, no figure), then one every `sample_every` (5 s).
        expected = 10.0 + elapsed // 5
        assert health["system"]["cpu_percent"] == expected
        assert scheduler["load"]["cpu_percent"] == expected
