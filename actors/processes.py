"""A command kind's processes: how they start, what identifies them, how they are stopped.

Each command starts in its own session, so its process group is its whole process tree; the
pool stops a job by signalling that group (SIGTERM, `KILL_GRACE` on trio's clock, SIGKILL).

What keeps them from outliving a crashed daemon (Linux):
- the command's own process gets SIGKILL the moment the daemon dies (prctl PR_SET_PDEATHSIG,
  set between fork and exec). The kernel ties that signal to the *thread* that forked, so
  commands are forked by one spawner thread that lives as long as the daemon: forked from
  trio's worker threads, which end after 10 s idle, they would be killed with that thread.
- PR_SET_PDEATHSIG does not reach what the command starts itself (`sleep 600 &`): those live
  on after a crash, orphaned. So the store records each running command's group and what
  identifies it beyond a reusable pid (the leader's boot id and start time), and at start-up,
  before a job a crash left running runs again, whatever is left of its group is stopped
  (`end_leftover_groups`): only processes proven to be the job's, so a reused pid is never
  killed.
- Under systemd the unit's cgroup does the rest: `KillMode=mixed` kills every process left
  in it once the daemon has died, whatever it did to escape its group.

What none of this catches: a descendant that left the group (`setsid`, `setpgid`) and, once
the command is gone, is no longer in the group recorded for it. Outside a cgroup that
process outlives the job.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import functools
import math
import os
import signal
import subprocess
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import structlog
import trio

from jobwarden.store.jobs import ProcessGroup

log = structlog.get_logger("processes")

# How long a command gets between SIGTERM and SIGKILL when it is stopped.
KILL_GRACE = 5.0
# The environment variable a command and everything it starts carry: a leftover whose group
# leader is gone is recognized by it, beside its start time.
JOB_ID_VARIABLE = "JOBWARDEN_JOB_ID"

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)
# One thread forks every command and lives as long as the daemon: see the module docstring.
_spawner = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="spawner")


def _die_with_daemon(daemon_pid: int) -> None:
    """Runs in the child between fork and exec."""
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != daemon_pid:
        # The daemon died before the prctl took effect: no signal will come.
        os.kill(os.getpid(), signal.SIGKILL)


class Command:
    """A running command: its pid (also its group and session id), output, exit status."""

    def __init__(
        self, popen: subprocess.Popen[bytes], stdout: int, stderr: int, pidfd: int
    ) -> None:
        self._popen = popen
        self.stdout = trio.lowlevel.FdStream(stdout)
        self.stderr = trio.lowlevel.FdStream(stderr)
        # Readable once the process has exited: waiting needs no thread and no SIGCHLD.
        self._pidfd = pidfd
        self.pid = popen.pid

    @property
    def returncode(self) -> int | None:
        return self._popen.returncode

    async def wait(self) -> int:
        if self._popen.returncode is None:
            await trio.lowlevel.wait_readable(self._pidfd)
            # It has exited: this reaps it at once.
            self._popen.wait()
            os.close(self._pidfd)
        return self._popen.returncode

    def signal_group(self, signum: signal.Signals) -> bool:
        """Signal the whole process group; False once nothing is left in it."""
        try:
            os.killpg(self.pid, signum)
        except ProcessLookupError:
            return False
        return True

    def close(self) -> None:
        self.stdout.close()
        self.stderr.close()


async def spawn(argv: list[str], env: dict[str, str]) -> Command:
    """Start `argv` in a new session, its output piped, dying with the daemon."""
    stdout_read, stdout_write = os.pipe()
    stderr_read, stderr_write = os.pipe()
    popen_for = functools.partial(
        subprocess.Popen,
        argv,
        stdin=subprocess.DEVNULL,
        stdout=stdout_write,
        stderr=stderr_write,
        start_new_session=True,
        env=env,
        preexec_fn=functools.partial(_die_with_daemon, os.getpid()),
    )
    try:
        # Not abandoned on cancel: a process started meanwhile must not be lost.
        popen = await trio.to_thread.run_sync(_spawner.submit(popen_for).result)
    except BaseException:
        os.close(stdout_read)
        os.close(stderr_read)
        raise
    finally:
        os.close(stdout_write)
        os.close(stderr_write)
    return Command(popen, stdout_read, stderr_read, os.pidfd_open(popen.pid))


async def stop_escalating(
    signal_all: Callable[[signal.Signals], bool],
    wait_gone: Callable[[], Awaitable[object]],
    *,
    after_kill: float = math.inf,
) -> bool:
    """Ask nicely (SIGTERM), wait up to KILL_GRACE, then force (SIGKILL) and wait up to
    `after_kill`. `signal_all` says whether anything was left to signal. True once gone."""
    for signum, grace in ((signal.SIGTERM, KILL_GRACE), (signal.SIGKILL, after_kill)):
        if not signal_all(signum):
            return True
        with trio.move_on_after(grace):
            await wait_gone()
            return True
    return False


# -- what identifies a process beyond its pid -------------------------------------------------


@functools.cache
def _boot_id() -> str:
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip()


class _Stat(NamedTuple):
    exited: bool  # a zombie: dead, its pid held until its parent reaps it
    group: int
    started: int  # clock ticks since boot


def _stat(pid: int) -> _Stat | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses; the rest follows the last ")".
    fields = text[text.rindex(")") + 2 :].split()
    return _Stat(fields[0] in ("Z", "X"), int(fields[2]), int(fields[19]))


def identity(pid: int) -> str | None:
    """What tells this process from a later one given the same pid: the boot and the time it
    started ("<boot id>:<start ticks>"). None once it is gone."""
    stat = _stat(pid)
    return None if stat is None else f"{_boot_id()}:{stat.started}"


def _carries_job(pid: int, job_id: int) -> bool:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False
    return f"{JOB_ID_VARIABLE}={job_id}".encode() in environ.split(b"\0")


def _group_pids(pgid: int) -> list[int]:
    """The group's processes that still run (not those dead and waiting to be reaped)."""
    pids = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            stat = _stat(int(entry.name))
            if stat is not None and stat.group == pgid and not stat.exited:
                pids.append(int(entry.name))
    return pids


def _leftovers(group: ProcessGroup) -> list[int]:
    """pidfds of what is left of a crashed daemon's command, each proven to be the job's: the
    group's leader if its identity matches; if the leader is gone, the group's processes that
    started after it and carry the job's id in their environment. A pidfd pins the process,
    so what was checked is what gets signalled."""
    boot, _, started = group.identity.partition(":")
    if boot != _boot_id():
        return []  # recorded in an earlier boot: every process of that run is gone
    leader_started = int(started)
    leader = _stat(group.pgid)
    if leader is not None and leader.started != leader_started:
        # The pid is someone else's now: the group it named died whole before that.
        return []
    pidfds = []
    for pid in _group_pids(group.pgid):
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            continue
        # Read again after pinning it: the pid might have been reused in between.
        stat = _stat(pid)
        ours = stat is not None and stat.group == group.pgid and stat.started >= leader_started
        # A leader still there, even dead but not yet reaped, holds the group's id: nobody
        # else can have it. Without one, each process must show it runs for this job.
        if ours and leader is None:
            ours = _carries_job(pid, group.job_id)
        if ours:
            pidfds.append(pidfd)
        else:
            os.close(pidfd)
    return pidfds


async def _end_leftover(group: ProcessGroup) -> int:
    pidfds = _leftovers(group)
    if not pidfds:
        return 0

    def signal_all(signum: signal.Signals) -> bool:
        alive = False
        for pidfd in pidfds:
            try:
                signal.pidfd_send_signal(pidfd, signum)
                alive = True
            except ProcessLookupError:
                pass
        return alive

    async def wait_gone() -> None:
        for pidfd in pidfds:
            await trio.lowlevel.wait_readable(pidfd)

    try:
        gone = await stop_escalating(signal_all, wait_gone, after_kill=KILL_GRACE)
    finally:
        for pidfd in pidfds:
            trio.lowlevel.notify_closing(pidfd)
            os.close(pidfd)
    if not gone:
        log.error("a leftover process survived SIGKILL", job=group.job_id, group=group.pgid)
    return len(pidfds)


async def end_leftover_groups(groups: Sequence[ProcessGroup]) -> int:
    """At start-up: stop what is left of the commands a crash left running, all at once.
    Returns how many processes were found and stopped."""
    ended = [0] * len(groups)

    async def end(index: int) -> None:
        ended[index] = await _end_leftover(groups[index])

    async with trio.open_nursery() as nursery:
        for index in range(len(groups)):
            nursery.start_soon(end, index)
    return sum(ended)
