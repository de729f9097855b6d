"""The /v1 HTTP API's bodies: what a request sends and a response carries, beside the views
(JobView, Event, ErrorBody) every client shares. The OpenAPI document is generated from these
Structs, and the clients built on the API decode with them.

Requests are decoded with forbid_unknown_fields, so a misspelt field is a 400 that names it.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from jobwarden.wire.admin import BulkArgs, NonNegative
from jobwarden.wire.views import (
    BatchResult,
    BulkOutcome,
    ErrorBody,
    Event,
    JobLog,
    JobStatus,
    JobView,
    StoredInt,
    Submission,
)


class Body(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class SubmitBody(Submission):
    """A job to run. An operator's token may submit for any `user` (default "local"); a user's
    token submits as its user, and may name only that user. A repeated idempotency key
    answers 200 with the existing job instead of 202 with a new one."""

    user: str | None = None


class BatchBody(Body):
    """Jobs to run, committed in one write; `user` as in SubmitBody. `atomic`: every item is
    accepted, or the batch is refused with the first item's refusal, which names its index."""

    items: list[Submission]
    atomic: bool = False
    user: str | None = None


class JobDetail(msgspec.Struct, omit_defaults=True):
    """One job, its latest events (newest last), and while it is queued where it stands and
    why it waits."""

    job: JobView
    events: list[Event]
    waiting: dict[str, Any] | None = None


class JobPage(msgspec.Struct):
    """Jobs, newest first; `next_cursor` (null on the last page) fetches the next page."""

    jobs: list[JobView]
    next_cursor: str | None


class JobResult(msgspec.Struct, omit_defaults=True):
    """A job's outcome: `result` when it is done, `error` when it failed or was canceled;
    neither while it is still queued or running."""

    id: int
    status: JobStatus
    result: Any = None
    error: ErrorBody | None = None


class BudgetBody(Body):
    """New budget limits, in USD; a limit left out stays as it is."""

    daily_usd: Annotated[float, msgspec.Meta(ge=0)] | None = None
    monthly_usd: Annotated[float, msgspec.Meta(ge=0)] | None = None


class UserLimitsBody(Body):
    """A user's own limits over the [limits] defaults. credits: the balance, or "unlimited";
    daily_limit and max_running 0, and rate "off": no limit."""

    credits: NonNegative | Literal["unlimited"] | None = None
    daily_limit: NonNegative | None = None
    rate: str | None = None
    max_running: NonNegative | None = None


class NewUserBody(UserLimitsBody, kw_only=True):
    name: str


class UserChangeBody(UserLimitsBody, kw_only=True):
    """Change a user's limits; `disabled` refuses (true) or accepts (false) them again."""

    disabled: bool | None = None


class CreditsBody(Body):
    """Add credits to a user's balance (a negative change takes them)."""

    change: StoredInt


# Every Struct the API's document describes, in the order its components are listed.
SCHEMAS: tuple[type[msgspec.Struct], ...] = (
    SubmitBody,
    BatchBody,
    BatchResult,
    BulkArgs,
    BulkOutcome,
    JobLog,
    JobView,
    JobDetail,
    JobPage,
    JobResult,
    Event,
    ErrorBody,
    BudgetBody,
    NewUserBody,
    UserChangeBody,
    CreditsBody,
)
