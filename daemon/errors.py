"""Every exception of jobwarden, and the one error shape a refusal travels in.

Request refusals carry an `ErrorBody` (`RequestError`); the rest name what went wrong where it
happened: the config, the store, a service call, the budget, a handler's verdict."""

from __future__ import annotations

import uuid

from jobwarden.wire.views import ErrorBody

RETRYABLE_CODES = frozenset(
    {
        "RATE_LIMITED",
        "DAILY_LIMIT",
        "QUEUE_FULL",
        "DRAINING",
        "STORAGE_FULL",
        "STORAGE_ERROR",
        "STORAGE_UNAVAILABLE",
    }
)
# The HTTP meaning of each request code, for listeners that speak HTTP and for reports.
HTTP_STATUS = {
    "INVALID_REQUEST": 400,
    "UNAUTHENTICATED": 401,
    "INSUFFICIENT_CREDITS": 402,
    "FORBIDDEN": 403,
    "NOT_FOUND": 404,
    "METHOD_NOT_ALLOWED": 405,
    "REQUEST_TIMEOUT": 408,
    "CONFLICT": 409,
    "PAYLOAD_TOO_LARGE": 413,
    "RATE_LIMITED": 429,
    "DAILY_LIMIT": 429,
    "QUEUE_FULL": 503,
    "DRAINING": 503,
    "BUDGET_EXHAUSTED": 503,
    # The database cannot take writes: the disk is full (507 Insufficient Storage), the
    # file is read-only, failing or damaged (503), or the database server cannot be reached
    # (503: PostgreSQL restarting, say).
    "STORAGE_FULL": 507,
    "STORAGE_ERROR": 503,
    "STORAGE_UNAVAILABLE": 503,
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


class ConfigError(Exception):
    """A config file that cannot be used; the message names the key path."""


class StoreError(Exception):
    """The database refused a write: the disk is full (`full`), the database server cannot be
    reached (`unavailable`), or the file is read-only, failing or damaged. Not the write's
    fault, and not the request's: a client may try again after `retry_after` seconds, when the
    store next tries a write of its own."""

    def __init__(
        self,
        message: str,
        *,
        full: bool,
        unavailable: bool = False,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.full = full
        self.unavailable = unavailable
        self.retry_after = retry_after

    @classmethod
    def with_code(cls, code: str, message: str, *, retry_after: float | None = None) -> StoreError:
        """The error for a code that `code` gave before (a fault kept in the store's health)."""
        return cls(
            message,
            full=code == "STORAGE_FULL",
            unavailable=code == "STORAGE_UNAVAILABLE",
            retry_after=retry_after,
        )

    @property
    def code(self) -> str:
        if self.full:
            return "STORAGE_FULL"
        return "STORAGE_UNAVAILABLE" if self.unavailable else "STORAGE_ERROR"

    def refusal(self) -> RequestError:
        """The refusal a client gets for a request that needed this write."""
        if self.full:
            why = "its disk is full"
        elif self.unavailable:
            why = "its database server cannot be reached"
        else:
            why = "its database file refuses writes"
        return RequestError(
            self.code,
            f"the daemon cannot store anything now: {why}; what it already accepted is kept",
            retry_after=self.retry_after,
            technical_message=str(self),
        )


class ServiceUnavailable(Exception):
    """The service's circuit is open: the call was not made."""

    def __init__(self, service: str, until: float | None) -> None:
        super().__init__(f"service '{service}' is unavailable (circuit open)")
        self.service = service
        self.until = until


class ServiceFailed(Exception):
    """A service call failed on every try its retry policy allows."""

    def __init__(self, service: str, tries: int, cause: BaseException) -> None:
        super().__init__(f"{service} failed {tries} times; last: {type(cause).__name__}: {cause}")
        self.service = service
        self.cause = cause


class BudgetExhausted(Exception):
    """A call was refused: it would cross the budget. The job waits for the next budget day."""

    def __init__(self, message: str, until: float) -> None:
        super().__init__(message)
        self.until = until


class HandlerVerdict(Exception):
    """A handler's own say in what happens to its job, with the code its failure records."""

    def __init__(self, message: str, *, code: str = "HANDLER_ERROR") -> None:
        super().__init__(message)
        self.code = code


class Retry(HandlerVerdict):
    """Raise to ask for another attempt (with backoff) when the error is transient."""


class Fail(HandlerVerdict):
    """Raise to fail the job now, without retrying: retrying would not help."""


class DaemonUnreachable(Exception):
    """The admin socket could not be used; the message says where we looked and why."""

    def __init__(self, path: str, reason: str, *, not_running: bool = False) -> None:
        self.path = path
        self.reason = reason
        # No socket file or nobody listening on it: the daemon is not running (any more).
        self.not_running = not_running
        message = f"cannot reach the jobwarden daemon at {path}: {reason}"
        if not_running:
            message += "; is it running? Start it with `jobwarden serve`"
        super().__init__(message)


class DaemonError(Exception):
    """The daemon refused a request; `error` is the common error shape."""

    def __init__(self, error: ErrorBody) -> None:
        self.error = error
        super().__init__(f"{error.code}: {error.message}")


class AdminError(DaemonError):
    """The daemon answered a request on the admin socket with ok=false."""
