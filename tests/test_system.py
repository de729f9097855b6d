"""The one sampler of memory and CPU: every actor that reads the machine sees the same figures
for the same interval."""

from __future__ import annotations

import itertools
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
import trio

from jobwarden.actors.messages import Explain, HealthQuery, SchedulerSnapshot
from jobwarden.mailbox import ask
from jobwarden.system import SystemSampler
from tests.conftest import GB

KINDS = """
[kinds.noop]
handler = "tests.handlers:noop"
"""


def cpu_figures(monkeypatch) -> None:
    """psutil answers 10%, 11%, 12%, ... to each call, so a figure tells which call made it."""
    figures = itertools.count(10)
    monkeypatch.setattr(psutil, "cpu_percent", lambda interval=None: float(next(figures)))


def test_the_first_reading_has_no_cpu_figure(monkeypatch, tmp_path):
    cpu_figures(monkeypatch)
    # No cgroup v2 there: the host's figures, whatever the machine running the test has.
    sample = SystemSampler(cgroup_root=tmp_path, proc_cgroup=tmp_path / "none")
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


# -- cgroup v2 limits (systemd's MemoryMax= and CPUQuota=) -----------------------------------

SERVICE = "system.slice/jobwarden.service"


class Cgroups:
    """A cgroup v2 tree of a test's own: `root` as /sys/fs/cgroup, `proc` as /proc/self/cgroup
    naming the daemon's cgroup, and files written as the kernel would show them."""

    def __init__(self, tmp_path: Path, own: str = SERVICE, *, v2: bool = True) -> None:
        self.root = tmp_path / "sys-fs-cgroup"
        self.proc = tmp_path / "proc-self-cgroup"
        (self.root / own).mkdir(parents=True)
        if v2:
            (self.root / "cgroup.controllers").write_text("cpu memory pids\n")
        self.proc.write_text(f"0::/{own}\n")

    def write(self, cgroup: str, **files: object) -> None:
        """`memory_max="2147483648"` writes memory.max in `cgroup`."""
        for name, value in files.items():
            (self.root / cgroup / name.replace("_", ".", 1)).write_text(f"{value}\n")

    def sampler(self) -> SystemSampler:
        return SystemSampler(cgroup_root=self.root, proc_cgroup=self.proc)


@pytest.fixture
def host(monkeypatch):
    """The host the test imagines: 32 GB, 8 GB of it in use, 8 CPUs at 10%."""
    memory = SimpleNamespace(total=32 * GB, available=24 * GB, percent=25.0)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: memory)
    monkeypatch.setattr(psutil, "cpu_percent", lambda interval=None: 10.0)
    monkeypatch.setattr(psutil, "cpu_count", lambda logical=True: 8)


def memory_stat(inactive_file: int) -> str:
    return f"anon 1000\nfile 2000\ninactive_file {inactive_file}\nactive_file 500"


async def test_memory_is_measured_against_memory_max(host, tmp_path):
    cgroups = Cgroups(tmp_path)
    cgroups.write(
        SERVICE,
        memory_max=2 * GB,
        memory_current=int(1.5 * GB),
        # Page cache the kernel reclaims first is not counted as in use.
        memory_stat=memory_stat(GB // 2),
    )
    load = cgroups.sampler()()
    assert (load.memory_percent, load.memory_available, load.memory_total) == (50.0, GB, 2 * GB)


async def test_cpu_is_measured_against_the_cpu_max_quota_over_trios_clock(
    autojump_clock, host, tmp_path
):
    cgroups = Cgroups(tmp_path)
    cgroups.write(SERVICE, cpu_max="150000 100000", cpu_stat="usage_usec 1000000\nuser_usec 1")
    sample = cgroups.sampler()
    assert sample().cpu_percent is None
    await trio.sleep(5)
    # 6 CPU-seconds in 5 s, of the 1.5 CPUs CPUQuota=150% allows.
    cgroups.write(SERVICE, cpu_stat="usage_usec 7000000")
    assert sample().cpu_percent == 80.0
    await trio.sleep(2)
    cgroups.write(SERVICE, cpu_stat="usage_usec 10000000")
    assert sample().cpu_percent == 100.0


async def test_the_tightest_limit_up_the_tree_counts(autojump_clock, host, tmp_path):
    cgroups = Cgroups(tmp_path)
    # The slice leaves 100 MB of its 1 GB; the service itself could have 3.5 GB more.
    cgroups.write("system.slice", memory_max=GB, memory_current=GB - 100 * 1024**2)
    cgroups.write(SERVICE, memory_max=4 * GB, memory_current=GB // 2)
    cgroups.write("system.slice", cpu_max="200000 100000", cpu_stat="usage_usec 0")
    cgroups.write(SERVICE, cpu_max="50000 100000", cpu_stat="usage_usec 0")
    sample = cgroups.sampler()
    first = sample()
    assert (first.memory_total, first.memory_available) == (GB, 100 * 1024**2)
    await trio.sleep(10)
    cgroups.write(SERVICE, cpu_stat="usage_usec 2500000")
    cgroups.write("system.slice", cpu_stat="usage_usec 9000000")
    assert sample().cpu_percent == 50.0


@pytest.mark.parametrize(
    ("layout", "files"),
    [
        ("v2", {"memory_max": "max", "memory_current": GB, "cpu_max": "max 100000"}),
        ("v2", {"memory_max": 64 * GB, "memory_current": GB, "cpu_max": "1600000 100000"}),
        ("no-v2-mount", {"memory_max": GB, "memory_current": GB // 2, "cpu_max": "50000 100000"}),
        ("v1-only", {"memory_max": GB, "memory_current": GB // 2, "cpu_max": "50000 100000"}),
    ],
    ids=["no-limit", "limits-above-the-host", "no-cgroup-v2-mounted", "cgroup-v1-only"],
)
async def test_without_a_limit_below_the_host_the_host_figures_count(
    autojump_clock, host, tmp_path, layout, files
):
    cgroups = Cgroups(tmp_path, v2=layout != "no-v2-mount")
    cgroups.write(SERVICE, cpu_stat="usage_usec 0", **files)
    if layout == "v1-only":
        cgroups.proc.write_text("4:memory:/jobwarden\n1:cpu:/jobwarden\n")
    sample = cgroups.sampler()
    sample()
    await trio.sleep(5)
    cgroups.write(SERVICE, cpu_stat="usage_usec 5000000")
    load = sample()
    assert (load.memory_percent, load.memory_available, load.memory_total) == (
        25.0,
        24 * GB,
        32 * GB,
    )
    assert load.cpu_percent == 10.0


async def test_dispatch_pauses_at_the_cgroups_limit_while_the_host_is_idle(
    autojump_clock, host, tmp_path, start_daemon
):
    cgroups = Cgroups(tmp_path)
    cgroups.write(SERVICE, memory_max=2 * GB, memory_current=int(1.8 * GB))
    daemon = await start_daemon(
        KINDS + '[limits]\nmax_memory_percent = 80\nrate = "off"\n',
        sample_system=cgroups.sampler(),
    )
    job = await daemon.submit("noop")
    await trio.sleep(1)
    explained = await ask(daemon.handle.scheduler, Explain, jobs=[await daemon.job(job.id)])
    assert explained[job.id].reason == "memory 90% > 80%"
    cgroups.write(SERVICE, memory_current=GB)
    assert (await daemon.wait_done(job.id)).status == "done"
