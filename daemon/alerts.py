"""The alert message every actor may send to the monitor, which logs it and runs the hook."""

from __future__ import annotations

from typing import Any

import msgspec


class RaiseAlert(msgspec.Struct):
    name: str
    message: str
    data: dict[str, Any] = msgspec.field(default_factory=dict)
