"""The one error shape, and the exception that carries it across actor boundaries."""

from __future__ import annotations

import uuid

from daemon.protocol import ErrorBody

RETRYABLE_CODES = frozenset({"RATE_LIMITED", "DAILY_LIMIT", "QUEUE_FULL", "DRAINING"})
# The HTTP meaning of each request code, for listeners that speak HTTP and for reports.
HTTP_STATUS = {
    "INVALID_REQUEST": 400,
    "UNAUTHENTICATED": 401,
    "INSUFFICIENT_CREDITS": 402,
    "FORBIDDEN": 403,
    "NOT_FOUND": 404,
    "PAYLOAD_TOO_LARGE": 413,
    "RATE_LIMITED": 429,
    "DAILY_LIMIT": 429,
    "QUEUE_FULL": 503,
    "DRAINING": 503,
    "BUDGET_EXHAUSTED": 503,
    "INTERNAL": 500,
}


def new_error_id() -> str:
    return uuid.uuid4().hex[:12]


def error_body(
    code: str,
    message: str,
    *,
    retryable: bool | None = None,
    retry_after: float | None = None,
    technical_message: str | None = None,
    request_id: str | None = None,
) -> ErrorBody:
    return ErrorBody(
        code=code,
        message=message,
        retryable=code in RETRYABLE_CODES if retryable is None else retryable,
        error_id=new_error_id(),
        retry_after=retry_after,
        technical_message=technical_message,
        request_id=request_id,
    )


class StartupError(Exception):
    """The daemon cannot start: a resource it needs is taken or unusable."""


class RequestError(Exception):
    """A request refused with a code a client can act on."""

    def __init__(self, code: str, message: str, **extra: object) -> None:
        super().__init__(message)
        self.body = error_body(code, message, **extra)  # type: ignore[arg-type]
