"""The one sampler of the machine's memory and CPU (and the daemon's own memory).

psutil's `cpu_percent(interval=None)` answers the CPU use since its previous call on the same
thread. Two readers on the daemon's thread would each get the use since the *other's* call, so
the daemon has one reader: a `SystemSampler`, read once per `limits.sample_every` by the
supervisor, whose every `SystemLoad` goes to each actor that decides by it (the scheduler's
pause, the monitor's health and metrics; admission takes the total memory of the first).

Under systemd's `MemoryMax=` or `CPUQuota=` (or in a container) the daemon's share of the
machine is its cgroup's, not the host's: the kernel reclaims and kills at `memory.max` and
throttles at `cpu.max` while the host looks idle. So where cgroup v2 sets a limit on the
daemon's cgroup or one above it, the figures are measured against that limit:

- memory: in use is `memory.current` less `inactive_file` from `memory.stat` (page cache the
  kernel reclaims before it gets near the limit), against `memory.max`;
- CPU: `usage_usec` from `cpu.stat`, its increase since the previous reading over the time
  passed on trio's clock, against the CPUs `cpu.max` allows (quota / period).

Where several cgroups up the tree set limits, the tightest one counts: the least memory left,
the fewest CPUs. A limit no tighter than the host itself, no limit ("max"), or no cgroup v2
leaves the host's figures, as psutil reads them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import msgspec
import psutil
import structlog
import trio

log = structlog.get_logger("system")

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")


class SystemLoad(msgspec.Struct, frozen=True):
    """One reading. Memory in bytes; `cpu_percent` is the system's CPU use since the previous
    reading, None for the first, which has no interval behind it."""

    memory_percent: float
    memory_available: int
    memory_total: int
    cpu_percent: float | None
    daemon_rss: int


class MemoryShare(msgspec.Struct, frozen=True):
    """A cgroup's memory limit and what is in use under it."""

    cgroup: Path
    limit: int
    used: int


class CpuShare(msgspec.Struct, frozen=True):
    """A cgroup's CPU limit, in CPUs, and the CPU time its processes have used."""

    cgroup: Path
    cpus: float
    usage_usec: int


class SystemSampler:
    """Reads memory and CPU; each reading's CPU is the average since the one before.

    `cgroup_root` is where cgroup v2 is mounted and `proc_cgroup` the file that names the
    daemon's cgroup, so a test can hand it a tree of its own; `clock` is trio's."""

    def __init__(
        self,
        *,
        cgroup_root: Path = CGROUP_ROOT,
        proc_cgroup: Path = PROC_CGROUP,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self._process = psutil.Process()
        self._first = True
        self._cgroups = cgroup_chain(cgroup_root, proc_cgroup)
        self._clock = clock
        # The CPU share of the previous reading and when it was taken.
        self._last_cpu: tuple[CpuShare, float] | None = None
        # What the figures were last measured against, as logged.
        self._against: dict[str, str] = {}

    def __call__(self) -> SystemLoad:
        host = psutil.virtual_memory()
        # Called every time, so that its interval is right when a cgroup limit goes away.
        host_cpu = psutil.cpu_percent(interval=None)
        memory = tightest_memory(self._cgroups, host.total)
        cpu = tightest_cpu(self._cgroups, psutil.cpu_count() or 1)
        self._log_limits(memory, cpu)
        if memory is None:
            percent, available, total = host.percent, host.available, host.total
        else:
            percent = round(100.0 * memory.used / memory.limit, 1)
            available, total = max(0, memory.limit - memory.used), memory.limit
        cpu_percent = None if self._first else host_cpu
        if cpu is not None:
            cpu_percent = self._cgroup_cpu_percent(cpu)
        self._last_cpu = None if cpu is None else (cpu, self._clock())
        self._first = False
        return SystemLoad(
            memory_percent=percent,
            memory_available=available,
            memory_total=total,
            cpu_percent=cpu_percent,
            daemon_rss=self._process.memory_info().rss,
        )

    def _cgroup_cpu_percent(self, cpu: CpuShare) -> float | None:
        """The share of the allowed CPUs used since the previous reading; None when there is
        no previous reading of the same cgroup to measure from."""
        if self._last_cpu is None:
            return None
        last, at = self._last_cpu
        elapsed = self._clock() - at
        if last.cgroup != cpu.cgroup or elapsed <= 0:
            return None
        used = (cpu.usage_usec - last.usage_usec) / 1e6
        return round(100.0 * used / (elapsed * cpu.cpus), 1)

    def _log_limits(self, memory: MemoryShare | None, cpu: CpuShare | None) -> None:
        """One line at the first reading, and whenever what the figures are measured against
        changes (a limit set or lifted at run time)."""
        against = {
            "memory": "host" if memory is None else f"{memory.cgroup}/memory.max {memory.limit}",
            "cpu": "host" if cpu is None else f"{cpu.cgroup}/cpu.max {cpu.cpus:g} CPUs",
        }
        if against != self._against:
            self._against = against
            log.info("system figures measured against", **against)


def cgroup_chain(root: Path, proc_cgroup: Path) -> list[Path]:
    """The daemon's cgroup v2 directory and each one above it up to `root`; empty without
    cgroup v2 (no "0::" line, or no v2 hierarchy mounted at `root`)."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return []
    own = next((line[3:] for line in lines if line.startswith("0::")), None)
    if own is None or not (root / "cgroup.controllers").is_file():
        return []
    directory = root / own.strip().lstrip("/")
    if not directory.is_dir():
        # Mounted from inside a container without its own cgroup namespace: the path names a
        # cgroup of the host's tree, and what is mounted here is the container's own.
        return [root]
    chain = [directory, *directory.parents]
    return chain[: chain.index(root) + 1]


def tightest_memory(cgroups: list[Path], host_total: int) -> MemoryShare | None:
    """The cgroup whose memory limit leaves the least free, if any sets one below the host's
    memory."""
    shares = []
    for cgroup in cgroups:
        # "max", no limit, reads as no figure.
        limit = _read_int(cgroup / "memory.max")
        current = _read_int(cgroup / "memory.current")
        if limit is None or limit >= host_total or current is None:
            continue
        inactive = _read_stat(cgroup / "memory.stat", "inactive_file") or 0
        shares.append(MemoryShare(cgroup, limit, max(0, current - inactive)))
    return min(shares, key=lambda share: share.limit - share.used, default=None)


def tightest_cpu(cgroups: list[Path], host_cpus: int) -> CpuShare | None:
    """The cgroup that allows the fewest CPUs, if any allows fewer than the host has."""
    shares = []
    for cgroup in cgroups:
        try:
            quota, period = (cgroup / "cpu.max").read_text().split()
            cpus = int(quota) / int(period)
        except (OSError, ValueError, ZeroDivisionError):
            continue  # no file, "max" (no limit), or not a figure
        usage = _read_stat(cgroup / "cpu.stat", "usage_usec")
        if cpus < host_cpus and usage is not None:
            shares.append(CpuShare(cgroup, cpus, usage))
    return min(shares, key=lambda share: share.cpus, default=None)


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text())
    except (OSError, ValueError):
        return None


def _read_stat(path: Path, key: str) -> int | None:
    """One `key value` line of a cgroup's stat file."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        name, _, value = line.partition(" ")
        if name == key:
            try:
                return int(value)
            except ValueError:
                return None
    return None
