"""The event log as the hub sees it where several daemons share the database.

Every daemon's watchers must see every event, whichever daemon wrote it, in seq order and
once. The engine hands the tail the events this daemon committed; the tail reads the events
the others commit from the log itself. Both reach the hub through the tail, in seq order:

- seq order is commit order (rows.insert_events: PostgreSQL numbers a transaction's events
  under a lock held to its commit), so once an event with seq N is committed, every event
  below N that will ever exist is committed and visible too;
- the tail keeps a watermark: the highest seq it has published. This daemon's own events
  that follow it directly are published at once, with no read. Where another daemon's events
  come first (or a rolled-back transaction left a gap), the tail reads the log past the
  watermark, publishes what it finds, and moves on;
- it is woken by this daemon's commits, by the other daemons' (LISTEN/NOTIFY, on a
  connection of its own on a thread of its own), and every FALLBACK_POLL seconds in case a
  notification was lost with its connection.

What the others wrote is also handed to the hub's `foreign` listeners (the cluster relay),
which turn it into wake-ups for this daemon's actors.
"""

from __future__ import annotations

import threading
from functools import partial
from typing import TYPE_CHECKING, Any

import structlog
import trio

from jobwarden.hub import EventHub
from jobwarden.store.jobs import events_since, last_seq
from jobwarden.wire.views import Event

if TYPE_CHECKING:
    from jobwarden.store.engine import Store

log = structlog.get_logger("store")

# Seconds between reads of the log when no notification came: the safety net for one lost.
FALLBACK_POLL = 1.0
# Events read from the log at a time.
PAGE = 1000


class EventTail:
    def __init__(self, store: Store, hub: EventHub, backend: Any) -> None:
        self._store = store
        self._hub = hub
        self._backend = backend
        self._watermark = 0
        # This daemon's committed events not yet published, by seq.
        self._own: dict[int, Event] = {}
        self._wake = trio.Event()

    def committed(self, events: list[Event]) -> None:
        """This daemon's events, once committed (called on the trio thread). Those that follow
        the watermark are published now, before the writer's caller goes on, as where the
        daemon is the only writer; the others wait for the tail to read what comes first."""
        for event in events:
            if event.seq > self._watermark:
                self._own[event.seq] = event
        self._publish_own_run()
        if self._own:
            self._wake.set()

    def wake(self) -> None:
        self._wake.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        # History is the watchers' to read from the store (`since`); the hub carries what
        # commits from now on.
        self._watermark = await self._store.read(last_seq)
        stopping = threading.Event()
        token = trio.lowlevel.current_trio_token()

        def notified() -> None:
            try:
                token.run_sync_soon(self.wake)
            except trio.RunFinishedError:
                stopping.set()

        thread = threading.Thread(
            target=self._backend.listen,
            args=(self._store.path, notified, stopping),
            name="jobwarden-listen",
            daemon=True,
        )
        thread.start()
        task_status.started()
        try:
            while True:
                with trio.move_on_after(FALLBACK_POLL):
                    await self._wake.wait()
                self._wake = trio.Event()
                await self._catch_up()
        finally:
            stopping.set()

    async def _catch_up(self) -> None:
        while True:
            if self._publish_own_run():
                continue
            # This daemon's next event, as known before the read: committed before it began.
            next_own = min(self._own, default=None)
            page = await self._store.read(partial(events_since, since=self._watermark, limit=PAGE))
            # Our own events published meanwhile are not published twice.
            page = [event for event in page if event.seq > self._watermark]
            if page:
                self._publish_read(page)
                continue
            if next_own is None:
                return
            # The read began after `next_own` committed, so it saw every seq below it that will
            # ever exist: those it did not see were a transaction that rolled back. (An event
            # of ours delivered during the read proves nothing of the kind: the read may have
            # begun before the others' events below it committed.)
            self._watermark = max(self._watermark, next_own - 1)

    def _publish_own_run(self) -> bool:
        """Publish this daemon's events that follow the watermark; whether there were any."""
        run = []
        while self._watermark + 1 in self._own:
            self._watermark += 1
            run.append(self._own.pop(self._watermark))
        if run:
            self._hub.publish(run)
        return bool(run)

    def _publish_read(self, page: list[Event]) -> None:
        foreign = []
        for event in page:
            own = self._own.pop(event.seq, None)
            if own is None:
                foreign.append(event)
            self._watermark = event.seq
        # The page in seq order: this daemon's events among them are the same rows.
        self._hub.publish(page)
        if foreign:
            self._hub.publish_foreign(foreign)
