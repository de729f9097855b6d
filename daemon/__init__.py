"""jobwarden: a job daemon on trio that keeps expensive, failure-prone jobs alive, within budget
and visible.

This module is the public face for handler authors:

    from jobwarden import JobContext, Retry, Fail, Metered

The names are loaded on first use, so `import jobwarden` (the CLI's start-up, a client) does not
pull in the daemon.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_PUBLIC = {
    "JobContext": "jobwarden.actors.handlers",
    "Metered": "jobwarden.actors.services",
    "Retry": "jobwarden.errors",
    "Fail": "jobwarden.errors",
    "ServiceFailed": "jobwarden.errors",
    "ServiceUnavailable": "jobwarden.errors",
    "BudgetExhausted": "jobwarden.errors",
}
__all__ = ["__version__", *_PUBLIC]

if TYPE_CHECKING:
    from jobwarden.actors.handlers import JobContext as JobContext
    from jobwarden.actors.services import Metered as Metered
    from jobwarden.errors import BudgetExhausted as BudgetExhausted
    from jobwarden.errors import Fail as Fail
    from jobwarden.errors import Retry as Retry
    from jobwarden.errors import ServiceFailed as ServiceFailed
    from jobwarden.errors import ServiceUnavailable as ServiceUnavailable


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'jobwarden' has no attribute {name!r}")
