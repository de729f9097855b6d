"""The event hub: fans each committed event out to the watchers that want it.

The store publishes after every commit, so a watcher never sees an event that could still be
rolled back. Each subscription has a small bounded buffer; a watcher that falls behind is cut
off (`overflowed`) instead of growing the daemon's memory, and resumes from the store with
`since=<last seq>`. One event costs one store write however many watch it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import trio

from jobwarden.wire.views import Event


class Subscription:
    def __init__(self, job: int | None, user: str | None, buffer: int) -> None:
        self.job = job
        self.user = user
        self.overflowed = False
        self._send, self.events = trio.open_memory_channel[Event](buffer)

    def wants(self, event: Event) -> bool:
        if self.job is not None and event.job != self.job:
            return False
        return self.user is None or event.user == self.user

    def offer(self, event: Event) -> None:
        try:
            self._send.send_nowait(event)
        except trio.WouldBlock:
            self.overflowed = True
            self._send.close()
        except trio.ClosedResourceError:
            pass

    def close(self) -> None:
        self._send.close()


class EventHub:
    def __init__(self) -> None:
        self._by_job: dict[int, set[Subscription]] = {}
        self._wide: set[Subscription] = set()
        # Called with the events other daemons on the same database committed (never
        # blocking), after they are published: how this daemon hears of their work.
        self.foreign_listeners: list[Callable[[list[Event]], None]] = []

    def publish(self, events: list[Event]) -> None:
        for event in events:
            for sub in self._wide:
                if sub.wants(event):
                    sub.offer(event)
            for sub in self._by_job.get(event.job, ()):
                sub.offer(event)

    def publish_foreign(self, events: list[Event]) -> None:
        for listener in self.foreign_listeners:
            listener(events)

    @contextmanager
    def subscribe(
        self, *, job: int | None = None, user: str | None = None, buffer: int = 256
    ) -> Iterator[Subscription]:
        sub = Subscription(job, user, buffer)
        bucket = self._by_job.setdefault(job, set()) if job is not None else self._wide
        bucket.add(sub)
        try:
            yield sub
        finally:
            bucket.discard(sub)
            if job is not None and not bucket:
                self._by_job.pop(job, None)
            sub.close()
