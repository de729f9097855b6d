"""sd_notify for Type=notify units, spoken directly over the datagram socket.

The protocol is a few "KEY=value" lines sent to $NOTIFY_SOCKET, so we implement it here
instead of depending on libsystemd bindings that would need a compiler and the C library
on every machine, including developers' laptops that never run systemd. Outside systemd
(NOTIFY_SOCKET unset) every method is a no-op, so callers never need to check.

Notifications are advisory: a failed send is logged and swallowed, because a daemon that
dies when systemd's socket hiccups would turn a status message into an outage.
"""

from __future__ import annotations

import math
import os
import socket
import time
from collections.abc import Mapping

import structlog
import trio

log = structlog.get_logger()


class SystemdNotifier:
    def __init__(self, address: str | None, watchdog_usec: int | None) -> None:
        self._address = address
        self._watchdog_usec = watchdog_usec

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] = os.environ) -> SystemdNotifier:
        socket_name = environ.get("NOTIFY_SOCKET", "")
        if not socket_name:
            return cls(address=None, watchdog_usec=None)
        # "@name" is Linux's abstract namespace, which the socket API spells with a NUL byte.
        address = "\0" + socket_name[1:] if socket_name.startswith("@") else socket_name
        return cls(address=address, watchdog_usec=_watchdog_usec_for_this_process(environ))

    @property
    def enabled(self) -> bool:
        return self._address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between pings: half the deadline, so one late ping is not fatal."""
        if self._watchdog_usec is None:
            return None
        return self._watchdog_usec / 2 / 1_000_000

    def notify(self, **fields: object) -> None:
        if self._address is None:
            return
        # A newline inside a value would start a new, unintended assignment.
        lines = (f"{key}={value}".replace("\n", " ") for key, value in fields.items())
        message = "\n".join(lines) + "\n"
        try:
            # A fresh socket per message, as libsystemd does: nothing to close on shutdown,
            # and a systemd restart that recreates the socket cannot leave us on a stale one.
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.setblocking(False)
                sock.sendto(message.encode(), self._address)
        except OSError as error:
            log.warning("sd_notify_failed", fields=sorted(fields), error=str(error))

    def ready(self, status: str) -> None:
        self.notify(READY=1, STATUS=status)

    def status(self, text: str) -> None:
        self.notify(STATUS=text)

    def stopping(self, status: str, *, expected_seconds: float) -> None:
        """STOPPING=1, and how long the stop may take: EXTEND_TIMEOUT_USEC only ever lengthens
        systemd's wait beyond TimeoutStopSec=, never shortens it, so a drain grace longer than
        the unit's stop timeout is waited for and a shorter one changes nothing."""
        self.notify(
            STOPPING=1,
            STATUS=status,
            EXTEND_TIMEOUT_USEC=math.ceil(expected_seconds * 1_000_000),
        )

    def reloading(self) -> None:
        # systemd >= 253 (Type=notify-reload) matches the reload to this timestamp.
        monotonic_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.notify(RELOADING=1, MONOTONIC_USEC=monotonic_usec)

    async def run_watchdog(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Ping WATCHDOG=1 forever; returns at once when systemd asked for no watchdog.

        Pinging from a trio task means a wedged event loop stops the pings and systemd
        restarts us, which is the failure the watchdog exists to catch.
        """
        interval = self.watchdog_interval
        task_status.started()
        if interval is None:
            return
        while True:
            await trio.sleep(interval)
            self.notify(WATCHDOG=1)


def _watchdog_usec_for_this_process(environ: Mapping[str, str]) -> int | None:
    try:
        watchdog_usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    # WATCHDOG_PID names the process the watchdog is meant for; a child that inherited
    # the environment must not keep the parent alive by pinging on its behalf.
    watchdog_pid = environ.get("WATCHDOG_PID", "")
    if watchdog_pid and watchdog_pid != str(os.getpid()):
        return None
    return watchdog_usec if watchdog_usec > 0 else None
