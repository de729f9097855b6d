"""The admin socket's client: blocking, so the CLI and scripts need no event loop.

It speaks the protocol of jobwarden.wire.admin, one request and its reply at a time.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from typing import Any

import msgspec

from jobwarden.errors import AdminError, DaemonUnreachable
from jobwarden.wire.admin import Reply, encode_line
from jobwarden.wire.views import ErrorBody


class AdminClient:
    """One connection to the admin socket; requests on it are answered in order.

    `with AdminClient(path) as client: client.call("status")`
    """

    def __init__(self, path: str | os.PathLike[str], timeout: float = 10.0) -> None:
        self.path = os.fspath(path)
        self.timeout = timeout
        self._next_id = 1

    def __enter__(self) -> AdminClient:
        self._socket = self._connect()
        self._reader = self._socket.makefile("rb")
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._reader.close()
        self._socket.close()

    def call(self, cmd: str, **args: Any) -> Any:
        """Send one command and return the reply's data; arguments left None are not sent,
        so the daemon applies its defaults."""
        self._send(cmd, args)
        return _data_of(self._receive())

    def watch(
        self, job: int | None = None, since: int | None = None, user: str | None = None
    ) -> Iterator[dict[str, Any]]:
        """Yield event dicts (see jobwarden.wire.views.Event): stored ones after seq `since`
        (omitted: a job's whole history, or from now when watching all jobs), then live ones
        as the daemon streams them, forever.

        The stream takes over the connection: make no other calls on this client afterwards.
        """
        self._send("watch", {"job": job, "since": since, "user": user})
        _data_of(self._receive())
        # Events arrive whenever jobs move, which may be hours apart.
        self._socket.settimeout(None)
        while True:
            message = self._receive()
            if "event" in message:
                yield message["event"]
            else:
                # Only an error reply can interrupt a stream: the daemon ending the watch.
                _data_of(message)

    def follow_logs(self, job: int, after: int = 0) -> Iterator[dict[str, Any]]:
        """Yield the job's log lines (see jobwarden.wire.views.LogLine) after line id
        `after`, then new ones as they are written, until the job is final; the first item
        is `{"dropped": N}`, how many older lines were dropped to keep the log in bounds, and
        the last `{"ended": job}`. The stream takes over the connection, as `watch` does."""
        self._send("logs", {"job": job, "after": after, "follow": True})
        yield {"dropped": _data_of(self._receive())["dropped"]}
        # Lines come whenever the job writes them, which may be hours apart.
        self._socket.settimeout(None)
        while True:
            message = self._receive()
            if "log" in message:
                yield message["log"]
            elif "ended" in message:
                yield {"ended": message["ended"]}
                return
            else:
                _data_of(message)

    def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except OSError as exc:
            sock.close()
            reason, not_running = self._why_connect_failed(exc)
            raise self._unreachable(reason, not_running=not_running) from None
        return sock

    def _why_connect_failed(self, exc: OSError) -> tuple[str, bool]:
        if isinstance(exc, FileNotFoundError):
            return "no such file", True
        if isinstance(exc, ConnectionRefusedError):
            return "connection refused (a socket left behind by a daemon that is gone)", True
        if isinstance(exc, PermissionError):
            return (
                "permission denied (connect as the daemon's user, or as a member of the "
                "group set in admin.group)",
                False,
            )
        if isinstance(exc, TimeoutError):
            return f"no answer within {self.timeout:g}s", False
        return exc.strerror or str(exc), False

    def _send(self, cmd: str, args: dict[str, Any]) -> None:
        sent_args = {name: value for name, value in args.items() if value is not None}
        # Any command by name, typed by the daemon: its reply says what is wrong with one.
        request = {"id": self._next_id, "cmd": cmd, "args": sent_args}
        self._next_id += 1
        try:
            self._socket.sendall(encode_line(request))
        except OSError as exc:
            raise self._unreachable(exc.strerror or str(exc)) from None

    def _receive(self) -> dict[str, Any]:
        try:
            line = self._reader.readline()
        except TimeoutError:
            raise self._unreachable(f"no reply within {self.timeout:g}s") from None
        except OSError as exc:
            raise self._unreachable(exc.strerror or str(exc)) from None
        if not line:
            raise self._unreachable("the daemon closed the connection")
        return msgspec.json.decode(line)

    def _unreachable(self, reason: str, *, not_running: bool = False) -> DaemonUnreachable:
        return DaemonUnreachable(self.path, reason, not_running=not_running)


def _data_of(message: dict[str, Any]) -> Any:
    reply = msgspec.convert(message, Reply)
    if not reply.ok:
        raise AdminError(
            reply.error
            or ErrorBody(
                code="INTERNAL", message="the daemon refused without saying why", retryable=False
            )
        )
    return reply.data
