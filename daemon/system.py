"""The one sampler of the machine's memory and CPU (and the daemon's own memory).

psutil's `cpu_percent(interval=None)` answers the CPU use since its previous call on the same
thread. Two readers on the daemon's thread would each get the use since the *other's* call, so
the daemon has one reader: a `SystemSampler`, read once per `limits.sample_every` by the
supervisor, whose every `SystemLoad` goes to each actor that decides by it (the scheduler's
pause, the monitor's health and metrics; admission takes the total memory of the first).
"""

from __future__ import annotations

import msgspec
import psutil


class SystemLoad(msgspec.Struct, frozen=True):
    """One reading. Memory in bytes; `cpu_percent` is the system's CPU use since the previous
    reading, None for the first, which has no interval behind it."""

    memory_percent: float
    memory_available: int
    memory_total: int
    cpu_percent: float | None
    daemon_rss: int


class SystemSampler:
    """Reads memory and CPU; each reading's CPU is the average since the one before."""

    def __init__(self) -> None:
        self._process = psutil.Process()
        self._first = True

    def __call__(self) -> SystemLoad:
        memory = psutil.virtual_memory()
        cpu_percent = psutil.cpu_percent(interval=None)
        load = SystemLoad(
            memory_percent=memory.percent,
            memory_available=memory.available,
            memory_total=memory.total,
            cpu_percent=None if self._first else cpu_percent,
            daemon_rss=self._process.memory_info().rss,
        )
        self._first = False
        return load
