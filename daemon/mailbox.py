"""Reply slots, and waiting for a message or a deadline: the plumbing actors share."""

from __future__ import annotations

from typing import Any, Generic, TypeVar

import trio

T = TypeVar("T")


class ReplySlot(Generic[T]):
    """A one-shot answer. The actor fills it once; the sender awaits it."""

    __slots__ = ("_error", "_event", "_value")

    def __init__(self) -> None:
        self._event = trio.Event()
        self._value: T | None = None
        self._error: BaseException | None = None

    def set(self, value: T) -> None:
        self._value = value
        self._event.set()

    def fail(self, error: BaseException) -> None:
        self._error = error
        self._event.set()

    async def wait(self) -> T:
        await self._event.wait()
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]


async def receive_by(inbox: trio.MemoryReceiveChannel[T], deadline: float) -> T | None:
    """The next message, or None once the trio deadline passes first.

    Raises trio.EndOfChannel when every sender has closed: the actor's cue to stop.
    """
    with trio.move_on_at(deadline):
        return await inbox.receive()
    return None


async def ask(channel: trio.MemorySendChannel[Any], message: type, **fields: Any) -> Any:
    """Send `message(**fields, reply=...)` to an actor and wait for its answer."""
    reply: ReplySlot[Any] = ReplySlot()
    await channel.send(message(**fields, reply=reply))
    return await reply.wait()
