"""Reply slots: how a message that needs an answer carries it back to its sender."""

from __future__ import annotations

from typing import Generic, TypeVar

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
