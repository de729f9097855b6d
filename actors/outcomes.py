"""What a handler's exception means for its job: done is a return, and every exception maps to
an outcome the pool records (failed, retry, or back to the queue to wait for budget).

A handler that makes calls at once from its own nursery ends with an ExceptionGroup; its
leaves are looked into, so that calls refused for budget still wait for budget instead of
counting as a bug. A plain function, tested without a daemon.
"""

from __future__ import annotations

import traceback
from collections.abc import Iterator
from typing import Any

from jobwarden.errors import (
    BudgetExhausted,
    Fail,
    Retry,
    ServiceFailed,
    ServiceUnavailable,
    error_body,
)

# ("done" | "failed" | "retry" | "budget" | "canceled" | "interrupted", result or ErrorBody)
Outcome = tuple[str, Any]


def _precedence(exc: Exception) -> int:
    """Which leaf of a handler's ExceptionGroup decides its job's outcome, lowest first: one
    that says the job can never succeed (Fail) fails it; a bug is a bug (HANDLER_ERROR) even
    beside other outcomes; then the retries, the handler's own before a service's; a budget
    refusal, which alone gives the attempt back, decides only when nothing else went wrong."""
    match exc:
        case Fail():
            return 0
        case Retry():
            return 2
        case ServiceFailed():
            return 3
        case ServiceUnavailable():
            return 4
        case BudgetExhausted():
            return 5
    return 1


def handler_outcome(exc: Exception) -> Outcome:
    """What a handler's exception means for its job. An ExceptionGroup (from a nursery in the
    handler: calls made at once) is looked into, every leaf, and the leaf of highest
    precedence decides: calls refused for budget alone still wait for budget."""
    if isinstance(exc, ExceptionGroup):
        return handler_outcome(min(_leaves(exc), key=_precedence))
    match exc:
        case Fail():
            return "failed", error_body(exc.code, str(exc), retryable=False)
        case Retry():
            return "retry", error_body(exc.code, str(exc), retryable=True)
        case BudgetExhausted():
            return "budget", error_body("BUDGET_EXHAUSTED", str(exc), retryable=True)
        case ServiceUnavailable():
            return "retry", error_body("SERVICE_UNAVAILABLE", str(exc), retryable=True)
        case ServiceFailed():
            return "retry", error_body("SERVICE_FAILED", str(exc), retryable=True)
    return "retry", error_body(
        "HANDLER_ERROR",
        f"{type(exc).__name__}: {exc}",
        retryable=True,
        technical_message="".join(traceback.format_exception(exc)[-3:]),
    )


def _leaves(group: ExceptionGroup) -> Iterator[Exception]:
    for exc in group.exceptions:
        if isinstance(exc, ExceptionGroup):
            yield from _leaves(exc)
        else:
            yield exc
