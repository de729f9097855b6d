"""Job transitions and queries, as functions of a SQLite connection.

Each transition changes a job row and adds one event row; it runs inside the store's writer
transaction via `store.write(partial(fn, ...))`. Transitions check the status they expect in
their WHERE clause, so a late or duplicate request (cancel after done, a second finish) changes
nothing and says so, instead of corrupting a job's history.

Every write of a running attempt (progress, heartbeat, checkpoint, its outcome) is fenced by
the attempt and the node that runs it (`Fence`): once another daemon has recovered the job
from a node it took for dead, or a later attempt runs it, the old attempt's writes change
nothing, and their callers learn that they lost the job.
"""

from __future__ import annotations

import math
import sqlite3
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import msgspec

from jobwarden.config import parse_rate
from jobwarden.errors import new_error_id
from jobwarden.store import webhooks
from jobwarden.store.backend import backend_of
from jobwarden.store.rows import (
    JOB_COLUMNS,
    JOB_HELD,
    LIST_COLUMNS,
    USER_HELD,
    Events,
    add_event,
    apply_each,
    dump_json,
    job_from_row,
    placeholders,
    row_lock,
)
from jobwarden.wire.views import TERMINAL_STATUSES, ErrorBody, Event, JobFilter, JobView


class SQL(str):
    """A column expression, written into an UPDATE as is (never user input)."""


class ClaimResult(msgspec.Struct):
    jobs: list[JobView]
    # The earliest time a queued job (in an allowed kind) becomes available, if any waits.
    next_available_at: float | None


class NewJob(msgspec.Struct, frozen=True):
    kind: str
    user: str
    payload_json: str
    priority: int
    idempotency_key: str | None
    max_attempts: int
    # The client's own id for this submission, the same each time it sends it again.
    submission_id: str | None = None
    # The recurring schedule that makes this job, if one does.
    schedule: str | None = None
    # When to start it (None: now); what it is tagged with; the jobs it runs after, and
    # whether it runs however they end (see docs/scheduling.md).
    run_at: float | None = None
    tags: tuple[str, ...] = ()
    after: tuple[int, ...] = ()
    after_any: bool = False

    # Where to tell of the job's final status (store/webhooks.py).
    webhook: str | None = None


class TakesTokens(Protocol):
    """A token bucket (actors/bucket.py's `TokenBucket`): the policy the store applies to a
    user's stored bucket, inside the transaction that inserts their job."""

    tokens: float
    updated: float

    def take(self, now: float) -> float: ...


class Quota(msgspec.Struct, frozen=True, kw_only=True):
    """The guards checked inside the transaction that inserts a job, so they hold across
    restarts, for every daemon on the database, and never race the refunds other actors
    write. The defaults check nothing."""

    # Today in the limits' time zone: the daily count restarts when it changes.
    day: str = ""
    daily_jobs: int = 0
    # New users' credits; None: unlimited.
    default_credits: int | None = None
    create_users: bool = True
    max_queued: int = 0
    kind_max_queued: dict[str, int] = {}
    kind_credits: dict[str, int] = {}
    # Above this many queued jobs, each admission says whether its user holds more than a
    # fair share of the queue (adaptive shedding); 0: never.
    shed_depth: int = 0
    # The rate limit: tokens a second for a user without a rate of their own (inf: off), the
    # bucket's size, and the bucket's policy; a user found above their fair share refills at
    # `shed_rate_factor` of their rate for `shed_for` seconds.
    rate: float = math.inf
    burst: float = 1.0
    bucket: Callable[..., TakesTokens] | None = None
    shed_rate_factor: float = 1.0
    shed_for: float = 0.0


NO_QUOTA = Quota()


class Admitted(msgspec.Struct):
    job: JobView
    existing: bool


class Refused(msgspec.Struct):
    """A guard said no: the code and message go to the client as they are."""

    code: str
    message: str
    retry_after: float | None = None


class ProcessGroup(NamedTuple):
    """A running command's process group as recorded: its id (the leader's pid) and the
    leader's identity ("<boot id>:<start ticks>"), so a reused pid is never taken for it."""

    job_id: int
    pgid: int
    identity: str


class Fence(NamedTuple):
    """Who may write a running job: the attempt the claim gave it, and the node running it."""

    attempt: int
    node: int


FAIR_CLOCK = "fair_clock"
# The settings row a batch of submissions locks before it counts the queue, so that two
# daemons' batches cannot both find room for the last job (PostgreSQL; SQLite's one writer
# holds the whole database already). It holds nothing else.
QUEUE_GUARD = "queue_guard"
# Completions counted back this far to estimate when a full queue has room again.
COMPLETION_WINDOW = 300.0


class Submitter:
    """A user's row as one batch of submissions sees it: read once, written back once."""

    def __init__(self, row: tuple[Any, ...], day: str, *, created: bool) -> None:
        credits, self.daily_limit, disabled, stored_day, day_count, self.last_tag = row[:6]
        self.rate: str | None = row[6]
        # The rate bucket as it was left (None: full), and until when the user is slowed.
        self.bucket_tokens: float | None = row[7]
        self.bucket_at: float | None = row[8]
        self.slowed_until: float | None = row[9]
        # On hold: their new jobs are queued held too.
        self.held = bool(row[10])
        self.credits: int | None = credits
        self.disabled = bool(disabled)
        self.today: int = day_count if stored_day == day else 0
        # Created by this batch and not yet holding a job: a failed insert takes it back.
        self.fresh = created
        self.changed = False


_SUBMITTER_COLUMNS = (
    "credits, daily_limit, disabled, day, day_count, fair_tag, rate, bucket_tokens, bucket_at,"
    " slowed_until, held"
)


def _submitter(
    conn: sqlite3.Connection,
    name: str,
    quota: Quota,
    now: float,
    seen: dict[str, Submitter],
) -> Submitter | Refused:
    if name in seen:
        return seen[name]
    select = f"SELECT {_SUBMITTER_COLUMNS} FROM users WHERE name = ?{row_lock(conn)}"
    row = conn.execute(select, (name,)).fetchone()
    created = row is None
    if created:
        if not quota.create_users:
            return Refused("FORBIDDEN", f"no user '{name}'; add it with `jobwarden users add`")
        # Another daemon may create the same user meanwhile: its row is the one to use.
        conn.execute(
            "INSERT INTO users (name, credits, created_at) VALUES (?, ?, ?) "
            "ON CONFLICT (name) DO NOTHING",
            (name, quota.default_credits, now),
        )
        row = conn.execute(select, (name,)).fetchone()
    seen[name] = Submitter(row, quota.day, created=created)
    return seen[name]


def _lock_guards(conn: sqlite3.Connection, batch: list[NewJob], quota: Quota) -> None:
    """Where the database lets writers run side by side (PostgreSQL), lock what a batch's
    guards read and change before it reads them: the queue's guard row when a depth limit
    holds, then its users' rows by name. Every batch takes them in that one order, so two
    daemons' batches wait for each other instead of each waiting for the other's lock."""
    lock = row_lock(conn)
    if not lock:
        return
    if quota.max_queued or any(quota.kind_max_queued.values()):
        _locked_setting(conn, QUEUE_GUARD, 0)
    names = sorted({new.user for new in batch})
    conn.execute(
        f"SELECT name FROM users WHERE name IN ({placeholders(names)}) ORDER BY name{lock}",
        names,
    ).fetchall()


def _take_token(user: Submitter, name: str, quota: Quota, now: float) -> Refused | None:
    """A token from the user's stored rate bucket, or RATE_LIMITED with when one is back."""
    rate = quota.rate if user.rate is None else parse_rate(user.rate)
    if quota.bucket is None or math.isinf(rate):
        return None
    slowed = user.slowed_until is not None and user.slowed_until > now
    if slowed:
        rate *= quota.shed_rate_factor
    # Built at the rate in force now: a user slowed, re-rated or reloaded since their last
    # submission refills at this one.
    bucket = quota.bucket(rate=rate, burst=quota.burst, now=now)
    if user.bucket_at is not None and user.bucket_tokens is not None:
        bucket.tokens, bucket.updated = user.bucket_tokens, user.bucket_at
    wait = bucket.take(now)
    user.bucket_tokens, user.bucket_at = bucket.tokens, bucket.updated
    user.changed = True
    if not wait:
        return None
    why = " (slowed: you hold more than a fair share of a nearly full queue)" if slowed else ""
    return Refused(
        "RATE_LIMITED",
        f"user '{name}' may submit {rate * 60:g} jobs a minute{why}",
        retry_after=round(wait, 3),
    )


def _save_submitters(conn: sqlite3.Connection, seen: dict[str, Submitter], day: str) -> None:
    conn.executemany(
        "UPDATE users SET credits = ?, day = ?, day_count = ?, fair_tag = ?, bucket_tokens = ?,"
        " bucket_at = ?, slowed_until = ? WHERE name = ?",
        [
            (
                user.credits,
                day,
                user.today,
                user.last_tag,
                user.bucket_tokens,
                user.bucket_at,
                user.slowed_until,
                name,
            )
            for name, user in seen.items()
            if user.changed
        ],
    )


def _key_holder(
    conn: sqlite3.Connection, new: NewJob, now: float, window: float
) -> tuple[Any, ...] | None:
    """The row of the job a keyed submission repeats, if any: the user's queued or running
    job with that key; else the finished job that this very submission made (a client's
    resend, by its submission_id); else the job with that key that finished the latest, if
    within `window` seconds."""
    key = (new.user, new.idempotency_key)
    row = conn.execute(
        f"SELECT {JOB_COLUMNS} FROM jobs INDEXED BY jobs_idempotency_active "
        "WHERE user = ? AND idempotency_key = ? AND status IN ('queued', 'running')",
        key,
    ).fetchone()
    if row is None and new.submission_id is not None:
        # Walks the key's finished jobs from the latest, which is the resent one but when
        # the same key has been used again since.
        row = conn.execute(
            f"SELECT {JOB_COLUMNS} FROM jobs INDEXED BY jobs_idempotency_finished "
            "WHERE user = ? AND idempotency_key = ? AND finished_at IS NOT NULL "
            "AND submission_id = ? ORDER BY finished_at DESC LIMIT 1",
            (*key, new.submission_id),
        ).fetchone()
    if row is None and window > 0:
        row = conn.execute(
            f"SELECT {JOB_COLUMNS} FROM jobs INDEXED BY jobs_idempotency_finished "
            "WHERE user = ? AND idempotency_key = ? AND finished_at >= ? "
            "ORDER BY finished_at DESC LIMIT 1",
            (*key, now - window),
        ).fetchone()
    return row


def _repeat(
    conn: sqlite3.Connection, new: NewJob, now: float, window: float
) -> Admitted | Refused | None:
    """A submission whose key holds a job gets that job, if it asks for the same work (kind
    and payload); else CONFLICT, naming the job. None: the key holds no job."""
    if new.idempotency_key is None:
        return None
    row = _key_holder(conn, new, now, window)
    if row is None:
        return None
    job = job_from_row(row)
    if job.kind == new.kind and _same_json(job.payload, msgspec.json.decode(new.payload_json)):
        return Admitted(job, True)
    what = "kind" if job.kind != new.kind else "payload"
    return Refused(
        "CONFLICT",
        f"idempotency key '{new.idempotency_key}' belongs to job {job.id} ({job.status}), "
        f"submitted with another {what}; use a new key for new work",
    )


def _same_json(a: Any, b: Any) -> bool:
    """Equal as JSON: key order aside, exactly (1 and 1.0, or true and 1, differ)."""
    return msgspec.json.encode(a, order="sorted") == msgspec.json.encode(b, order="sorted")


def _insert(
    conn: sqlite3.Connection,
    events: Events,
    new: NewJob,
    now: float,
    quota: Quota,
    window: float,
    fair_clock: int,
    seen: dict[str, Submitter],
) -> Admitted | Refused:
    """One submission of a batch: the user's guards, then the job. A repeat of a job (see
    `_repeat`) gets that job or CONFLICT instead, and no guard applies to it."""
    repeat = _repeat(conn, new, now, window)
    if repeat is not None:
        return repeat
    user = _submitter(conn, new.user, quota, now, seen)
    if isinstance(user, Refused):
        return user
    if user.disabled:
        return Refused("FORBIDDEN", f"user '{new.user}' is disabled")
    refused = _take_token(user, new.user, quota, now)
    if refused is not None:
        return refused
    limit = quota.daily_jobs if user.daily_limit is None else user.daily_limit
    if limit and user.today >= limit:
        return Refused(
            "DAILY_LIMIT", f"user '{new.user}' has submitted {user.today} of {limit} jobs today"
        )
    refused = _queue_full(conn, new.kind, quota, now)
    if refused is not None:
        return refused
    price = quota.kind_credits.get(new.kind, 0)
    if user.credits is not None and user.credits < price:
        return Refused(
            "INSUFFICIENT_CREDITS",
            f"a {new.kind} job costs {price} credits; user '{new.user}' has {user.credits}",
        )
    pending = 0
    if new.after:
        waits = _after_pending(conn, new)
        if isinstance(waits, Refused):
            return waits
        pending = waits
    available_at = now if new.run_at is None else new.run_at
    tag = max(user.last_tag + 1, fair_clock)
    [job_id] = backend_of(conn).insert_ids(
        conn,
        'INSERT INTO jobs (kind, "user", status, priority, payload, idempotency_key,'
        " submission_id, max_attempts, created_at, updated_at, available_at, fair_tag, credits,"
        " run_at, tags, after_ids, after_any, after_pending, held, schedule)"
        " VALUES (?, ?, 'queued', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            new.kind,
            new.user,
            new.priority,
            new.payload_json,
            new.idempotency_key,
            new.submission_id,
            new.max_attempts,
            now,
            now,
            available_at,
            tag,
            price,
            new.run_at,
            dump_json(list(new.tags)) if new.tags else None,
            dump_json(list(new.after)) if new.after else None,
            int(new.after_any),
            pending,
            USER_HELD if user.held else 0,
            new.schedule,
        ),
        "id",
        1,
    )
    # Built here, not read back: in SQLite, RETURNING would cost more than the INSERT itself.
    job = JobView(
        id=job_id,
        kind=new.kind,
        user=new.user,
        status="queued",
        priority=new.priority,
        attempt=0,
        max_attempts=new.max_attempts,
        created_at=now,
        updated_at=now,
        available_at=available_at,
        idempotency_key=new.idempotency_key,
        schedule=new.schedule,
        payload=msgspec.json.decode(new.payload_json),
    )
    # Only when given, as job_from_row does: most jobs have none of these.
    job.run_at = new.run_at
    if new.after:
        job.after, job.after_any = list(new.after), new.after_any
        conn.executemany(
            "INSERT INTO job_deps (job_id, after_id) VALUES (?, ?)",
            [(job.id, after_id) for after_id in new.after],
        )
    if new.tags:
        job.tags = list(new.tags)
        conn.executemany(
            "INSERT INTO job_tags (job_id, tag) VALUES (?, ?)", [(job.id, tag) for tag in new.tags]
        )
    add_event(events, job, "status", now, {"status": "queued", "attempt": 0})
    if new.webhook is not None:
        webhooks.remember(conn, job.id, new.webhook)
    # Only once the job is in: a failed insert leaves the user as it was.
    if user.credits is not None:
        user.credits -= price
    user.today += 1
    user.last_tag = tag
    user.fresh = False
    user.changed = True
    # Only the latest verdict counts: a user no longer above their share refills at full rate.
    heavy = _holds_more_than_fair_share(conn, new.user, quota)
    user.slowed_until = now + quota.shed_for if heavy else None
    return Admitted(job, False)


def _after_pending(conn: sqlite3.Connection, new: NewJob) -> int | Refused:
    """How many of the jobs a submission runs after have not ended yet; INVALID_REQUEST
    naming the ids that are no job of its user's, or, unless it runs after any outcome, the
    ones that have failed or were canceled (it would never run). Only existing jobs can be
    named, so no cycle can be made."""
    rows = conn.execute(
        f'SELECT id, "user", status FROM jobs WHERE id IN ({placeholders(new.after)})', new.after
    ).fetchall()
    found = {job_id: status for job_id, user, status in rows if user == new.user}
    unknown = [job_id for job_id in new.after if job_id not in found]
    if unknown:
        return Refused("INVALID_REQUEST", f"after: no job {_ids(unknown)} of user '{new.user}'")
    ended_badly = [job_id for job_id in new.after if found[job_id] in ("failed", "canceled")]
    if ended_badly and not new.after_any:
        return Refused(
            "INVALID_REQUEST",
            f"after: job {_ids(ended_badly)} has {found[ended_badly[0]]}, so this job would "
            "never run; retry it first, or submit with after_any",
        )
    return sum(1 for job_id in new.after if found[job_id] in ("queued", "running"))


def _ids(job_ids: list[int]) -> str:
    return ", ".join(str(job_id) for job_id in job_ids)


def _queued_up_to(conn: sqlite3.Connection, limit: int, kind: str | None = None) -> int:
    """Queued jobs (of one kind), counted no further than `limit`: the guard needs to know
    only whether the queue is full, and a full count would walk the whole queue."""
    if kind is None:
        sql = "SELECT 1 FROM jobs WHERE status = 'queued' LIMIT ?"
        params: tuple[Any, ...] = (limit,)
    else:
        sql = "SELECT 1 FROM jobs WHERE kind = ? AND status = 'queued' LIMIT ?"
        params = (kind, limit)
    return conn.execute(f"SELECT COUNT(*) FROM ({sql}) AS counted", params).fetchone()[0]


def _queue_full(conn: sqlite3.Connection, kind: str, quota: Quota, now: float) -> Refused | None:
    for scope, limit in ((None, quota.max_queued), (kind, quota.kind_max_queued.get(kind, 0))):
        if limit and _queued_up_to(conn, limit, scope) >= limit:
            where = "the queue" if scope is None else f"the {kind} queue"
            return Refused(
                "QUEUE_FULL",
                f"{where} holds {limit} jobs, its limit",
                retry_after=_room_expected_in(conn, now),
            )
    return None


def _room_expected_in(conn: sqlite3.Connection, now: float) -> float:
    """Seconds until one queued job is expected to have left, from the recent completion
    rate; a minute when nothing finished lately."""
    finished = conn.execute(
        "SELECT COUNT(*) FROM jobs INDEXED BY jobs_finished "
        "WHERE status IN ('done', 'failed', 'canceled') AND finished_at > ?",
        (now - COMPLETION_WINDOW,),
    ).fetchone()[0]
    if not finished:
        return 60.0
    return round(max(1.0, COMPLETION_WINDOW / finished), 1)


def _holds_more_than_fair_share(conn: sqlite3.Connection, user: str, quota: Quota) -> bool:
    if not quota.shed_depth or _queued_up_to(conn, quota.shed_depth) < quota.shed_depth:
        return False
    queued, users = conn.execute(
        "SELECT COUNT(*), COUNT(DISTINCT user) FROM jobs WHERE status = 'queued'"
    ).fetchone()
    mine = conn.execute(
        "SELECT COUNT(*) FROM jobs WHERE user = ? AND status = 'queued'", (user,)
    ).fetchone()[0]
    return mine * users > queued


def insert_many(
    conn: sqlite3.Connection,
    events: Events,
    *,
    batch: list[NewJob],
    now: float,
    quota: Quota = NO_QUOTA,
    idempotency_window: float = 0.0,
) -> list[Admitted | Refused | Exception]:
    """Insert a batch of submissions in one write; one that the database refuses is answered
    with its error while the others are accepted. A finished job's key returns that job for
    `idempotency_window` seconds after it finished."""
    _lock_guards(conn, batch, quota)
    fair_clock = get_setting(conn, FAIR_CLOCK, 0)
    seen: dict[str, Submitter] = {}

    def insert_one(new: NewJob) -> Admitted | Refused:
        try:
            return _insert(conn, events, new, now, quota, idempotency_window, fair_clock, seen)
        except Exception:
            # Its savepoint is rolled back: a user it created is gone again.
            if new.user in seen and seen[new.user].fresh:
                del seen[new.user]
            raise

    results = apply_each(conn, events, batch, insert_one, reset=seen.clear)
    _save_submitters(conn, seen, quota.day)
    return results


class BatchRefused(Exception):
    """An all-or-none batch met a refusal: the item at `index` (0-based) was refused (a
    guard's `Refused`) or failed (an exception). Raised to roll the whole write back."""

    def __init__(self, index: int, refusal: Refused | Exception) -> None:
        super().__init__(f"item {index} refused")
        self.index = index
        self.refusal = refusal


def insert_all_or_none(conn: sqlite3.Connection, events: Events, **batch: Any) -> list[Admitted]:
    """`insert_many(**batch)` for every submission of the batch, or none: the first one
    refused raises BatchRefused, and the engine rolls back the write (its savepoint) with
    every row and user count the others changed."""
    results = insert_many(conn, events, **batch)
    admitted = []
    for index, result in enumerate(results):
        if not isinstance(result, Admitted):
            raise BatchRefused(index, result)
        admitted.append(result)
    return admitted


# -- bulk actions: jobs by filter, a bounded batch per write ------------------------------


# Jobs one write of a bulk action changes at most: a bulk action over 100,000 jobs takes the
# writer in turns, between which every other write goes on.
BULK_BATCH = 500


class Matched(NamedTuple):
    """How many jobs a filter matches now, and the first of them (lowest ids)."""

    count: int
    first: list[int]


class BulkBatch(msgspec.Struct):
    """One write of a bulk action: the jobs it changed, the ones it could not (by code),
    and the id to go on after; `more`: the batch was full, so more may match."""

    changed: list[JobView]
    refused: dict[str, int]
    last_id: int
    more: bool


def _filter_where(
    job_filter: JobFilter, statuses: list[str], now: float, after_id: int = 0
) -> tuple[str, list[Any]]:
    """The WHERE clause for `job_filter` among jobs in `statuses`, above `after_id`."""
    clauses = [f"status IN ({placeholders(statuses)})", "id > ?"]
    params: list[Any] = [*statuses, after_id]
    for clause, value in (
        ("kind = ?", job_filter.kind),
        ('"user" = ?', job_filter.user),
        ("id IN (SELECT job_id FROM job_tags WHERE tag = ?)", job_filter.tag),
        ("reason = ?", job_filter.code),
        ("updated_at >= ?", None if job_filter.since is None else now - job_filter.since),
        (
            "created_at <= ?",
            None if job_filter.older_than is None else now - job_filter.older_than,
        ),
    ):
        if value is not None:
            clauses.append(clause)
            params.append(value)
    return " AND ".join(clauses), params


def count_matching(
    conn: sqlite3.Connection,
    *,
    job_filter: JobFilter,
    statuses: list[str],
    now: float,
    first: int,
) -> Matched:
    """What a bulk action would take now: a dry run."""
    where, params = _filter_where(job_filter, statuses, now)
    total = conn.execute(f"SELECT COUNT(*) FROM jobs WHERE {where}", params).fetchone()[0]
    ids = conn.execute(
        f"SELECT id FROM jobs WHERE {where} ORDER BY id LIMIT ?", (*params, first)
    ).fetchall()
    return Matched(total, [row[0] for row in ids])


def matching_ids(
    conn: sqlite3.Connection, *, job_filter: JobFilter, statuses: list[str], now: float
) -> list[int]:
    where, params = _filter_where(job_filter, statuses, now)
    return [row[0] for row in conn.execute(f"SELECT id FROM jobs WHERE {where}", params)]


def _matching_page(
    conn: sqlite3.Connection,
    job_filter: JobFilter,
    statuses: list[str],
    now: float,
    after_id: int,
    limit: int,
) -> list[tuple[int, str]]:
    """(id, kind) of up to `limit` matching jobs, from the lowest id above `after_id`."""
    where, params = _filter_where(job_filter, statuses, now, after_id)
    return conn.execute(
        f"SELECT id, kind FROM jobs WHERE {where} ORDER BY id LIMIT ?", (*params, limit)
    ).fetchall()


def cancel_matching(
    conn: sqlite3.Connection,
    events: Events,
    *,
    job_filter: JobFilter,
    now: float,
    after_id: int,
    limit: int,
) -> BulkBatch:
    """Cancel up to `limit` queued jobs that match, from the lowest id above `after_id`.
    Running ones are the pool's to stop."""
    rows = _matching_page(conn, job_filter, ["queued"], now, after_id, limit)
    changed = [
        job
        for job_id, _ in rows
        if (job := cancel(conn, events, job_id, now=now, expect=("queued",))) is not None
    ]
    return BulkBatch(changed, {}, rows[-1][0] if rows else after_id, len(rows) == limit)


def requeue_matching(
    conn: sqlite3.Connection,
    events: Events,
    *,
    job_filter: JobFilter,
    now: float,
    after_id: int,
    limit: int,
    policies: dict[str, tuple[int, int]],
) -> BulkBatch:
    """An operator's retry (requeue_manual) of up to `limit` failed or canceled jobs that
    match, from the lowest id above `after_id`. `policies`: each configured kind's
    (max_attempts, credits); a job of a kind no longer configured stays as it is."""
    rows = _matching_page(conn, job_filter, ["failed", "canceled"], now, after_id, limit)
    changed: list[JobView] = []
    refused: dict[str, int] = {}
    for job_id, kind in rows:
        policy = policies.get(kind)
        result = (
            Refused("INVALID_REQUEST", f"kind '{kind}' is no longer configured")
            if policy is None
            else requeue_manual(
                conn, events, job_id, max_attempts=policy[0], credits=policy[1], now=now
            )
        )
        if isinstance(result, JobView):
            changed.append(result)
        else:
            code = "CHANGED" if result is None else result.code
            refused[code] = refused.get(code, 0) + 1
    return BulkBatch(changed, refused, rows[-1][0] if rows else after_id, len(rows) == limit)


def claim(
    conn: sqlite3.Connection,
    events: Events,
    *,
    capacity: dict[str, int],
    total: int,
    now: float,
    node: int,
    running_by_user: dict[str, int] | None = None,
    max_running_per_user: int = 0,
    kind_limits: dict[str, int] | None = None,
) -> ClaimResult:
    """Mark up to `total` due jobs running on `node` in dispatch order (priority, then fair
    tag, then age) within each kind's free capacity and each user's running limit. Kinds
    missing from `capacity` (paused, unknown, full) are not touched. `kind_limits`: the most
    jobs of a kind that may run at once on all daemons together.

    Where several daemons share the database, a claim never waits on another's locks: it
    passes over the rows another claim holds (`skip_locked`), so two daemons never take one
    job and neither waits for the other's commit."""
    backend = backend_of(conn)
    free = dict(capacity)
    contended = _cap_by_cluster_limits(conn, free, kind_limits or {})
    allowed = {kind for kind, room in free.items() if room > 0}
    running = dict(running_by_user or {})
    full_users: set[str] = set()
    claimed: list[JobView] = []
    highest_tag = 0
    while total > 0 and allowed:
        kinds = sorted(allowed)
        # PostgreSQL takes no empty list after IN.
        but_users = f'AND jobs."user" NOT IN ({placeholders(full_users)}) ' if full_users else ""
        # Walk the dispatch order and stop at `total` rows. Left to itself, SQLite picks the
        # (status, available_at) index and sorts every due row: 17 ms a round at 100k queued.
        rows = conn.execute(
            f"SELECT {_qualified(JOB_COLUMNS)}, jobs.fair_tag, users.max_running "
            f'FROM jobs INDEXED BY jobs_order LEFT JOIN users ON users.name = jobs."user" '
            f"WHERE jobs.status = 'queued' AND jobs.available_at <= ? "
            # The first two name jobs_order's condition; users.held decides a user's hold (a
            # job retried or recovered while its user is held is back without its copy).
            f"AND jobs.held = 0 AND jobs.after_pending = 0 AND COALESCE(users.held, 0) = 0 "
            f"AND jobs.kind IN ({placeholders(kinds)}) {but_users}"
            f"ORDER BY jobs.priority DESC, jobs.fair_tag, jobs.id LIMIT ?"
            f"{backend.skip_locked('jobs')}",
            (now, *kinds, *full_users, total),
        ).fetchall()
        if not rows:
            break
        skipped = False
        for row in rows:
            job = job_from_row(row)
            if free[job.kind] <= 0 or job.user in full_users:
                # Filled up earlier in this pass; the next query leaves it out.
                skipped = True
                continue
            own = row[-1]
            limit = max_running_per_user if own is None else own
            if limit and running.get(job.user, 0) >= limit:
                full_users.add(job.user)
                skipped = True
                continue
            attempt = job.attempt + 1
            # progress_at restarts with the attempt, so an old report cannot look like a stall.
            conn.execute(
                "UPDATE jobs SET status = 'running', attempt = ?, node = ?, started_at = ?,"
                " updated_at = ?, heartbeat_at = ?, progress_at = NULL, reason = NULL"
                " WHERE id = ? AND status = 'queued'",
                (attempt, node, now, now, now, job.id),
            )
            add_event(events, job, "status", now, {"status": "running", "attempt": attempt})
            claimed.append(
                msgspec.structs.replace(
                    job, status="running", attempt=attempt, started_at=now, updated_at=now
                )
            )
            highest_tag = max(highest_tag, row[-2])
            running[job.user] = running.get(job.user, 0) + 1
            free[job.kind] -= 1
            total -= 1
            if free[job.kind] <= 0:
                allowed.discard(job.kind)
        if not skipped:
            break
    if claimed:
        _advance_fair_clock(conn, highest_tag)
    waiting = sorted(k for k, n in capacity.items() if n > 0)
    next_at = None
    if waiting:
        next_at = conn.execute(
            "SELECT MIN(available_at) FROM jobs INDEXED BY jobs_dispatch "
            "WHERE status = 'queued' AND available_at > ? "
            f"AND kind IN ({placeholders(waiting)})",
            (now, *waiting),
        ).fetchone()[0]
    if contended:
        # Another daemon's claim holds a limited kind: look again once it has committed.
        retry_at = now + CONTENDED_RETRY
        next_at = retry_at if next_at is None else min(next_at, retry_at)
    return ClaimResult(jobs=claimed, next_available_at=next_at)


# A kind whose cluster-wide limit another daemon's claim is counting is looked at again after
# this long: that claim commits within a group commit's time.
CONTENDED_RETRY = 0.05


def _cap_by_cluster_limits(
    conn: sqlite3.Connection, free: dict[str, int], limits: dict[str, int]
) -> bool:
    """Lower each limited kind's room to its limit less the jobs of the kind running on every
    daemon. The count is taken under a lock of the kind held to the commit, so two daemons
    never both fill the last slot. A kind another claim holds gets no room this time: a
    claim never waits (a lock wait inside a group-commit batch, which holds the locks of its
    other writes, could deadlock with another daemon's). Returns whether one was held."""
    contended = False
    backend = backend_of(conn)
    for kind in sorted(set(limits) & {kind for kind, room in free.items() if room > 0}):
        if not backend.try_lock(conn, f"claim:{kind}"):
            free[kind] = 0
            contended = True
            continue
        running = conn.execute(
            "SELECT COUNT(*) FROM jobs WHERE status = 'running' AND kind = ?", (kind,)
        ).fetchone()[0]
        free[kind] = min(free[kind], limits[kind] - running)
    return contended


def _advance_fair_clock(conn: sqlite3.Connection, tag: int) -> None:
    """New users' first jobs start at the tag being dispatched, so they queue one round behind
    nobody's backlog. It only moves forward: a retried job keeps its old tag. A claim on
    another daemon moving it at the same moment is left to do so, not waited for: every
    writer of it holds the lock, so the write below never waits either."""
    if backend_of(conn).try_lock(conn, FAIR_CLOCK) and tag > get_setting(conn, FAIR_CLOCK, 0):
        set_setting(conn, [], FAIR_CLOCK, tag)


def _qualified(columns: str) -> str:
    """Job columns named as the jobs table's, for a query that joins another table."""
    return ", ".join(f"jobs.{column.strip()}" for column in columns.split(","))


def _transition(
    conn: sqlite3.Connection,
    events: Events,
    job_id: int,
    *,
    expect: tuple[str, ...],
    status: str,
    reason: str | None,
    now: float,
    sets: dict[str, Any] | None = None,
    detail: dict[str, Any] | None = None,
    fence: Fence | None = None,
    settle_dependents: bool = True,
) -> JobView | None:
    """Move a job to `status` if it is in one of the `expect` statuses, and a running job only
    if `fence` still holds; None if not.

    The event carries the new status, the reason, the attempt and any `detail`. A job that
    ends settles the jobs waiting for it (unless the caller does so itself).
    """
    assert fence is not None or "running" not in expect, "a running job's write is fenced"
    columns = {"status": status, "reason": reason, **(sets or {})}
    assignments = ", ".join(
        f"{column} = {value}" if isinstance(value, SQL) else f"{column} = ?"
        for column, value in columns.items()
    )
    values = [value for value in columns.values() if not isinstance(value, SQL)]
    fenced, fence_values = _fence_clause(fence)
    changed = conn.execute(
        f"UPDATE jobs SET {assignments}, updated_at = ? "
        f"WHERE id = ? AND status IN ({placeholders(expect)}){fenced}",
        (*values, now, job_id, *expect, *fence_values),
    ).rowcount
    if not changed:
        return None
    # Read back rather than RETURNING: in SQLite 3.40 that costs twice an UPDATE and a SELECT.
    # Whether jobs wait for this one, in the same statement: most jobs have none waiting.
    row = conn.execute(
        f"SELECT {JOB_COLUMNS}, credits, "
        "EXISTS (SELECT 1 FROM job_deps WHERE job_deps.after_id = jobs.id) "
        "FROM jobs WHERE id = ?",
        (job_id,),
    ).fetchone()
    job = job_from_row(row)
    credits, awaited = row[-2], row[-1]
    if status in TERMINAL_STATUSES and credits:
        _settle_credits(conn, job.id, job.user, credits, refund=status != "done")
    data = {"status": status, "attempt": job.attempt, **(detail or {})}
    if reason is not None:
        data["reason"] = reason
    add_event(events, job, "status", now, data)
    if awaited and settle_dependents and status in TERMINAL_STATUSES:
        _settle_dependents(conn, events, job.id, status, now)
    return job


def _fence_clause(fence: Fence | None) -> tuple[str, tuple[int, ...]]:
    """The WHERE condition a fenced write adds: the job is on the fence's attempt and node
    (or, when not running, the condition holds of itself)."""
    if fence is None:
        return "", ()
    return (
        " AND (status <> 'running' OR (attempt = ? AND node = ?))",
        (fence.attempt, fence.node),
    )


# The jobs a dependent waits for: those of its dependencies that have not ended.
_UNENDED_DEPENDENCIES = (
    "SELECT COUNT(*) FROM job_deps JOIN jobs AS dependency ON dependency.id = job_deps.after_id "
    "WHERE job_deps.job_id = jobs.id AND dependency.status IN ('queued', 'running')"
)


def _settle_dependents(
    conn: sqlite3.Connection, events: Events, job_id: int, status: str, now: float
) -> None:
    """In the write that ends a job: the queued jobs that run after it count it as ended
    (one whose count reaches 0 may be dispatched), or, when it failed or was canceled and
    they do not run after any outcome, fail DEPENDENCY_FAILED, and so on down the chain."""
    ended = [(job_id, status)]
    while ended:
        ended_id, outcome = ended.pop()
        dependents = conn.execute(
            "SELECT jobs.id, jobs.after_any FROM job_deps JOIN jobs ON jobs.id = job_deps.job_id "
            "WHERE job_deps.after_id = ? AND jobs.status = 'queued'",
            (ended_id,),
        ).fetchall()
        released = [job for job, after_any in dependents if outcome == "done" or after_any]
        if released:
            # Counted from the rows, not down by one: a dependency retried by an operator may
            # end more than once.
            conn.execute(
                f"UPDATE jobs SET after_pending = ({_UNENDED_DEPENDENCIES}) "
                f"WHERE id IN ({placeholders(released)})",
                released,
            )
        for dependent, after_any in dependents:
            if outcome == "done" or after_any:
                continue
            error = ErrorBody(
                code="DEPENDENCY_FAILED",
                message=f"job {ended_id}, which this job runs after, "
                + ("failed" if outcome == "failed" else "was canceled"),
                retryable=False,
                error_id=new_error_id(),
            )
            failed = _transition(
                conn,
                events,
                dependent,
                expect=("queued",),
                status="failed",
                reason=error.code,
                now=now,
                sets={"finished_at": now, "error": dump_json(error)},
                detail={"error": msgspec.to_builtins(error)},
                settle_dependents=False,
            )
            if failed is not None:
                ended.append((dependent, "failed"))


def _settle_credits(
    conn: sqlite3.Connection, job_id: int, user: str, credits: int, *, refund: bool
) -> None:
    """A finished job's reserved credits: spent when it is done, back to the user when it
    failed or was canceled. The job keeps what it was charged, which a refund zeroes."""
    if refund:
        conn.execute(
            "UPDATE users SET credits = credits + ? WHERE name = ? AND credits IS NOT NULL",
            (credits, user),
        )
        conn.execute("UPDATE jobs SET credits = 0 WHERE id = ?", (job_id,))
    else:
        conn.execute("UPDATE users SET spent = spent + ? WHERE name = ?", (credits, user))


def finish(
    conn: sqlite3.Connection,
    events: Events,
    job_id: int,
    *,
    fence: Fence,
    result: Any,
    now: float,
) -> JobView | None:
    return _transition(
        conn,
        events,
        job_id,
        expect=("running",),
        status="done",
        reason=None,
        now=now,
        sets={"finished_at": now, "result": dump_json(result), "error": None},
        detail={"result": result},
        fence=fence,
    )


def fail(
    conn: sqlite3.Connection,
    events: Events,
    job_id: int,
    *,
    error: ErrorBody,
    now: float,
    expect: tuple[str, ...] = ("running",),
    fence: Fence | None = None,
) -> JobView | None:
    return _transition(
        conn,
        events,
        job_id,
        expect=expect,
        status="failed",
        reason=error.code,
        now=now,
        sets={"finished_at": now, "error": dump_json(error)},
        detail={"error": msgspec.to_builtins(error)},
        fence=fence,
    )


def retry_later(
    conn: sqlite3.Connection,
    events: Events,
    job_id: int,
    *,
    fence: Fence,
    error: ErrorBody,
    available_at: float,
    now: float,
) -> JobView | None:
    return _transition(
        conn,
        events,
        job_id,
        expect=("running",),
        status="queued",
        reason="RETRY",
        now=now,
        sets={"available_at": available_at, "error": dump_json(error)},
        detail={"available_at": available_at, "error": msgspec.to_builtins(error)},
        fence=fence,
    )


def cancel(
    conn: sqlite3.Connection,
    events: Events,
    job_id: int,
    *,
    now: float,
    expect: tuple[str, ...] = ("queued",),
    fence: Fence | None = None,
) -> JobView | None:
    """Cancel a queued job; a running one (`expect` running) only with its attempt's fence."""
    return _transition(
        conn,
        events,
        job_id,
        expect=expect,
        status="canceled",
        reason="CANCELED",
        now=now,
        sets={"finished_at": now},
        fence=fence,
    )


def requeue_unspent(
    conn: sqlite3.Connection,
    events: Events,
    job_id: int,
    *,
    fence: Fence,
    reason: str,
    now: float,
) -> JobView | None:
    """Back to the queue without spending the attempt that was cut short: by a shutdown
    (INTERRUPTED) or by a call refused for budget (BUDGET_WAIT). The checkpoint stays."""
    return _transition(
        conn,
        events,
        job_id,
        expect=("running",),
        status="queued",
        reason=reason,
        now=now,
        sets={"available_at": now, "attempt": SQL("attempt - 1")},
        fence=fence,
    )


def set_held(
    conn: sqlite3.Connection, events: Events, job_id: int, *, held: bool, now: float
) -> JobView | None:
    """An operator's hold on a queued job, or its release: a `status` event (reason HELD or
    RELEASED) when it changes. The job as it is now; None if there is no such job."""
    changed = conn.execute(
        f"UPDATE jobs SET held = held {'|' if held else '-'} {JOB_HELD}, updated_at = ? "
        f"WHERE id = ? AND status = 'queued' AND (held & {JOB_HELD}) = ?",
        (now, job_id, 0 if held else JOB_HELD),
    ).rowcount
    job = get_job(conn, job_id)
    if changed and job is not None:
        data = {"status": "queued", "reason": "HELD" if held else "RELEASED"}
        add_event(events, job, "status", now, {**data, "attempt": job.attempt})
    return job


def requeue_manual(
    conn: sqlite3.Connection,
    events: Events,
    job_id: int,
    *,
    max_attempts: int,
    credits: int,
    now: float,
) -> JobView | Refused | None:
    """An operator's retry of a failed or canceled job: a fresh set of attempts, checkpoint
    kept, and its credits reserved again. None when the job is in no state to retry;
    CONFLICT when its idempotency key belongs to another active job now."""
    holder = conn.execute(
        "SELECT active.id, active.status, retried.idempotency_key FROM jobs AS retried "
        "JOIN jobs AS active INDEXED BY jobs_idempotency_active "
        "ON active.user = retried.user AND active.idempotency_key = retried.idempotency_key "
        "AND active.status IN ('queued', 'running') "
        "WHERE retried.id = ? AND retried.status IN ('failed', 'canceled')",
        (job_id,),
    ).fetchone()
    if holder is not None:
        return Refused(
            "CONFLICT",
            f"job {job_id}'s idempotency key '{holder[2]}' belongs to job {holder[0]} "
            f"({holder[1]}) now; retry job {job_id} once that one has finished",
        )
    ended_badly = conn.execute(
        "SELECT dependency.id, dependency.status FROM jobs AS retried "
        "JOIN job_deps ON job_deps.job_id = retried.id "
        "JOIN jobs AS dependency ON dependency.id = job_deps.after_id "
        "WHERE retried.id = ? AND retried.status IN ('failed', 'canceled') "
        "AND retried.after_any = 0 AND dependency.status IN ('failed', 'canceled') "
        "ORDER BY dependency.id LIMIT 1",
        (job_id,),
    ).fetchone()
    if ended_badly is not None:
        return Refused(
            "CONFLICT",
            f"job {job_id} runs after job {ended_badly[0]}, which has {ended_badly[1]}; "
            f"retry job {ended_badly[0]} first",
        )
    row = conn.execute(
        "SELECT users.credits, users.name FROM jobs JOIN users ON users.name = jobs.user "
        "WHERE jobs.id = ? AND jobs.status IN ('failed', 'canceled')",
        (job_id,),
    ).fetchone()
    if row is not None and row[0] is not None:
        if row[0] < credits:
            return Refused(
                "INSUFFICIENT_CREDITS",
                f"a retry costs {credits} credits; user '{row[1]}' has {row[0]}",
            )
        conn.execute("UPDATE users SET credits = credits - ? WHERE name = ?", (credits, row[1]))
    return _transition(
        conn,
        events,
        job_id,
        expect=("failed", "canceled"),
        status="queued",
        reason="MANUAL_RETRY",
        now=now,
        sets={
            "available_at": now,
            "attempt": 0,
            "recoveries": 0,
            "max_attempts": max_attempts,
            "finished_at": None,
            "error": None,
            "credits": credits,
            # It waits again for those of its dependencies that have not ended.
            "after_pending": SQL(f"({_UNENDED_DEPENDENCIES})"),
        },
    )


def still_held(conn: sqlite3.Connection, *, node: int, attempts: dict[int, int]) -> set[int]:
    """Of the jobs `attempts` maps to the attempt a node runs, those whose fence still holds:
    running on that attempt on `node`."""
    if not attempts:
        return set()
    rows = conn.execute(
        f"SELECT id, attempt FROM jobs WHERE id IN ({placeholders(attempts)}) "
        "AND status = 'running' AND node = ?",
        (*attempts, node),
    )
    return {job_id for job_id, attempt in rows if attempts[job_id] == attempt}


def running_node(conn: sqlite3.Connection, job_id: int) -> int | None:
    """The node a running job runs on; None when it is not running."""
    row = conn.execute(
        "SELECT node FROM jobs WHERE id = ? AND status = 'running'", (job_id,)
    ).fetchone()
    return None if row is None else row[0]


def request_cancel(conn: sqlite3.Connection, events: Events, job_id: int, *, now: float) -> bool:
    """Ask the daemon running a job to cancel it: a `cancel` event, which that daemon's tail
    of the log hands to its pool. False when the job no longer runs."""
    row = conn.execute(
        "SELECT \"user\", kind FROM jobs WHERE id = ? AND status = 'running'", (job_id,)
    ).fetchone()
    if row is None:
        return False
    add_event(events, (job_id, row[0], row[1]), "cancel", now, {})
    return True


def report_progress(
    conn: sqlite3.Connection,
    events: Events,
    job_id: int,
    *,
    fence: Fence,
    fraction: float,
    message: str | None,
    now: float,
) -> bool:
    """False: the attempt no longer holds the job (see Fence), and nothing changed."""
    cursor = conn.execute(
        "UPDATE jobs SET progress = ?, message = ?, heartbeat_at = ?, updated_at = ?, "
        "progress_at = CASE WHEN progress = ? AND progress_at IS NOT NULL "
        "THEN progress_at ELSE ? END "
        "WHERE id = ? AND status = 'running' AND attempt = ? AND node = ? RETURNING user, kind",
        (fraction, message, now, now, fraction, now, job_id, *fence),
    )
    # Step a RETURNING statement to its end, or it stays open and blocks the next savepoint.
    rows = cursor.fetchall()
    if not rows:
        return False
    row = rows[0]
    data: dict[str, Any] = {"fraction": fraction}
    if message is not None:
        data["message"] = message
    add_event(events, (job_id, row[0], row[1]), "progress", now, data)
    return True


def _set_while_running(conn: sqlite3.Connection, job_id: int, fence: Fence, **columns: Any) -> bool:
    """Set columns of a job still running on the fence's attempt and node; False once it is
    not (it ended meanwhile, or the attempt lost it). The column names are the callers' own,
    never input."""
    assignments = ", ".join(f"{column} = ?" for column in columns)
    cursor = conn.execute(
        f"UPDATE jobs SET {assignments} "
        "WHERE id = ? AND status = 'running' AND attempt = ? AND node = ?",
        (*columns.values(), job_id, *fence),
    )
    return cursor.rowcount > 0


def heartbeat(
    conn: sqlite3.Connection, events: Events, job_id: int, *, fence: Fence, now: float
) -> bool:
    return _set_while_running(conn, job_id, fence, heartbeat_at=now)


def prune_finished(conn: sqlite3.Connection, events: Events, *, before: float, batch: int) -> int:
    """Delete up to `batch` jobs that finished before `before`, with their events."""
    ids = [
        row[0]
        for row in conn.execute(
            "SELECT id FROM jobs INDEXED BY jobs_finished "
            "WHERE status IN ('done', 'failed', 'canceled') AND finished_at < ? LIMIT ?",
            (before, batch),
        )
    ]
    if ids:
        conn.execute(f"DELETE FROM events WHERE job_id IN ({placeholders(ids)})", ids)
        conn.execute(f"DELETE FROM job_logs WHERE job_id IN ({placeholders(ids)})", ids)
        conn.execute(f"DELETE FROM job_tags WHERE job_id IN ({placeholders(ids)})", ids)
        conn.execute(f"DELETE FROM job_deps WHERE job_id IN ({placeholders(ids)})", ids)
        conn.execute(f"DELETE FROM job_webhooks WHERE job_id IN ({placeholders(ids)})", ids)
        conn.execute(f"DELETE FROM webhook_deliveries WHERE job_id IN ({placeholders(ids)})", ids)
        conn.execute(f"DELETE FROM jobs WHERE id IN ({placeholders(ids)})", ids)
    return len(ids)


def save_checkpoint(
    conn: sqlite3.Connection,
    events: Events,
    job_id: int,
    *,
    fence: Fence,
    checkpoint: Any,
    now: float,
) -> bool:
    return _set_while_running(
        conn, job_id, fence, checkpoint=dump_json(checkpoint), heartbeat_at=now, updated_at=now
    )


def record_process_group(
    conn: sqlite3.Connection,
    events: Events,
    job_id: int,
    *,
    fence: Fence,
    pgid: int,
    identity: str,
) -> bool:
    return _set_while_running(conn, job_id, fence, process_group=pgid, process_identity=identity)


def recover_running(
    conn: sqlite3.Connection,
    events: Events,
    *,
    now: float,
    crash_loop_after: int,
    nodes: list[int] | None = None,
) -> dict[str, int]:
    """Jobs left `running` by a daemon that died go back to the queue (RECOVERED); one that
    has now been running at `crash_loop_after` deaths fails CRASH_LOOP. `nodes`: the dead
    daemons whose jobs these are; None: every running job (a start-up on a store only one
    daemon opens). Their recorded process groups are forgotten: the caller has ended what was
    left of them where it could. Each row is written only if it still runs on the node it
    was found on, so two recoveries at once recover a job once."""
    select = "SELECT id, user, kind, recoveries, attempt, credits, node FROM jobs"
    if nodes is None:
        rows = conn.execute(f"{select} WHERE status = 'running'").fetchall()
    else:
        rows = conn.execute(
            f"{select} WHERE status = 'running' AND node IN ({placeholders(nodes)})", nodes
        ).fetchall()
    counts = {"recovered": 0, "crash_loop": 0}
    for job_id, user, kind, recoveries, attempt, credits, node in rows:
        recoveries += 1
        still_there = "WHERE id = ? AND status = 'running' AND node IS NOT DISTINCT FROM ?"
        if recoveries >= crash_loop_after:
            error = ErrorBody(
                code="CRASH_LOOP",
                message=f"the daemon stopped {recoveries} times while this job was running",
                retryable=False,
                error_id=new_error_id(),
            )
            changed = conn.execute(
                "UPDATE jobs SET status = 'failed', recoveries = ?, finished_at = ?,"
                " updated_at = ?, error = ?, reason = 'CRASH_LOOP', process_group = NULL,"
                f" process_identity = NULL {still_there}",
                (recoveries, now, now, dump_json(error), job_id, node),
            ).rowcount
            if not changed:
                continue
            if credits:
                _settle_credits(conn, job_id, user, credits, refund=True)
            add_event(
                events,
                (job_id, user, kind),
                "status",
                now,
                {"status": "failed", "reason": "CRASH_LOOP", "error": msgspec.to_builtins(error)},
            )
            _settle_dependents(conn, events, job_id, "failed", now)
            counts["crash_loop"] += 1
            continue
        changed = conn.execute(
            "UPDATE jobs SET status = 'queued', recoveries = ?, available_at = ?, updated_at = ?,"
            f" reason = 'RECOVERED', process_group = NULL, process_identity = NULL {still_there}",
            (recoveries, now, now, job_id, node),
        ).rowcount
        if not changed:
            continue
        add_event(
            events,
            (job_id, user, kind),
            "status",
            now,
            {"status": "queued", "reason": "RECOVERED", "attempt": attempt},
        )
        counts["recovered"] += 1
    return counts


def set_setting(conn: sqlite3.Connection, events: Events, key: str, value: Any) -> None:
    conn.execute(
        "INSERT INTO settings (key, value) VALUES (?, ?) "
        "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        (key, dump_json(value)),
    )


def update_setting(
    conn: sqlite3.Connection,
    events: Events,
    *,
    key: str,
    change: Callable[[Any], Any],
    default: Any = None,
) -> Any:
    """Change a setting as it is stored now, in one transaction with its row locked, so two
    daemons' changes (a pause of one kind here, of another there) both land; returns the new
    value. `change` is a plain function of the old value."""
    value = change(_locked_setting(conn, key, default))
    set_setting(conn, events, key, value)
    return value


def _locked_setting(conn: sqlite3.Connection, key: str, default: Any) -> Any:
    """A setting's value, its row locked until the transaction ends (made with `default`
    first if it is missing: a row that does not exist yet cannot be locked)."""
    conn.execute(
        "INSERT INTO settings (key, value) VALUES (?, ?) ON CONFLICT DO NOTHING",
        (key, dump_json(default)),
    )
    row = conn.execute(
        f"SELECT value FROM settings WHERE key = ?{row_lock(conn)}", (key,)
    ).fetchone()
    return msgspec.json.decode(row[0])


# -- queries (read connection) --------------------------------------------------------------


def get_setting(conn: sqlite3.Connection, key: str, default: Any = None) -> Any:
    row = conn.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
    return default if row is None else msgspec.json.decode(row[0])


def running_process_groups(
    conn: sqlite3.Connection, nodes: list[int] | None = None
) -> list[ProcessGroup]:
    """The process groups recorded for running jobs (of `nodes`; None: of all): after a
    crash, what may be left."""
    sql = (
        "SELECT id, process_group, process_identity FROM jobs "
        "WHERE status = 'running' AND process_group IS NOT NULL"
    )
    if nodes is None:
        rows = conn.execute(sql)
    else:
        rows = conn.execute(f"{sql} AND node IN ({placeholders(nodes)})", nodes)
    return [ProcessGroup(*row) for row in rows]


def get_job(conn: sqlite3.Connection, job_id: int) -> JobView | None:
    row = conn.execute(f"SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
    return None if row is None else job_from_row(row)


def list_jobs(
    conn: sqlite3.Connection,
    *,
    statuses: list[str] | None,
    kind: str | None,
    user: str | None,
    limit: int,
    tag: str | None = None,
    before: int | None = None,
) -> list[JobView]:
    """Jobs newest first; `before`: only those with a smaller id (the next page's cursor)."""
    clauses, params = [], []
    if before is not None:
        clauses.append("id < ?")
        params.append(before)
    if statuses:
        clauses.append(f"status IN ({placeholders(statuses)})")
        params.extend(statuses)
    if kind is not None:
        clauses.append("kind = ?")
        params.append(kind)
    if user is not None:
        clauses.append('"user" = ?')
        params.append(user)
    if tag is not None:
        clauses.append("id IN (SELECT job_id FROM job_tags WHERE tag = ?)")
        params.append(tag)
    where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
    rows = conn.execute(
        f"SELECT {LIST_COLUMNS} FROM jobs {where} ORDER BY id DESC LIMIT ?", (*params, limit)
    ).fetchall()
    return [job_from_row(row) for row in rows]


def events_since(
    conn: sqlite3.Connection,
    *,
    since: int,
    job: int | None = None,
    user: str | None = None,
    limit: int = 1000,
) -> list[Event]:
    clauses, params = ["seq > ?"], [since]
    if job is not None:
        clauses.append("job_id = ?")
        params.append(job)
    if user is not None:
        clauses.append("user = ?")
        params.append(user)
    rows = conn.execute(
        f"SELECT seq, job_id, user, kind, type, at, data FROM events "
        f"WHERE {' AND '.join(clauses)} ORDER BY seq LIMIT ?",
        (*params, limit),
    ).fetchall()
    return [
        Event(seq=r[0], job=r[1], user=r[2], kind=r[3], type=r[4], at=r[5], data=_loads(r[6]))
        for r in rows
    ]


# The rows of the dispatch order (the partial index jobs_order), named as its definition does.
_IN_ORDER = "status = 'queued' AND held = 0 AND after_pending = 0"
# Positions are counted no further than this; a job deeper in the queue shows this bound.
POSITION_HORIZON = 100_000
QUEUED_COLUMNS = (
    'id, kind, "user", status, priority, attempt, max_attempts, created_at, updated_at, '
    "available_at"
)


def _queued_count(conn: sqlite3.Connection, kind: str | None) -> int:
    """Queued jobs (of a kind), up to POSITION_HORIZON: counting a million rows every tick
    would take a core from dispatch to say what nobody reads."""
    return _queued_up_to(conn, POSITION_HORIZON, kind)


def queue_positions(
    conn: sqlite3.Connection, job_ids: list[int]
) -> dict[int, tuple[int, int, int, int]]:
    """For each queued job among `job_ids`: (position, queued, kind position, kind queued),
    positions 1-based in dispatch order. Each count walks only the jobs ahead (range scans
    on the order indexes), up to POSITION_HORIZON."""
    found: dict[int, tuple[int, int, int, int]] = {}
    totals: dict[str | None, int] = {}
    for job_id in job_ids:
        row = conn.execute(
            "SELECT kind, priority, fair_tag FROM jobs WHERE id = ? AND status = 'queued'",
            (job_id,),
        ).fetchone()
        if row is None:
            continue
        kind, priority, tag = row
        # Counted among the jobs in the dispatch order: a held job, or one waiting for others,
        # is ahead of nobody.
        ahead = (
            conn.execute(
                "SELECT COUNT(*) FROM (SELECT 1 FROM jobs INDEXED BY jobs_order"
                f" WHERE {_IN_ORDER} AND priority > ? LIMIT ?) AS ahead",
                (priority, POSITION_HORIZON),
            ).fetchone()[0]
            + conn.execute(
                f"SELECT COUNT(*) FROM (SELECT 1 FROM jobs WHERE {_IN_ORDER} AND priority = ?"
                " AND (fair_tag, id) < (?, ?) LIMIT ?) AS ahead",
                (priority, tag, job_id, POSITION_HORIZON),
            ).fetchone()[0]
        )
        kind_ahead = (
            conn.execute(
                f"SELECT COUNT(*) FROM (SELECT 1 FROM jobs WHERE kind = ? AND {_IN_ORDER}"
                " AND priority > ? LIMIT ?) AS ahead",
                (kind, priority, POSITION_HORIZON),
            ).fetchone()[0]
            + conn.execute(
                f"SELECT COUNT(*) FROM (SELECT 1 FROM jobs WHERE kind = ? AND {_IN_ORDER}"
                " AND priority = ? AND (fair_tag, id) < (?, ?) LIMIT ?) AS ahead",
                (kind, priority, tag, job_id, POSITION_HORIZON),
            ).fetchone()[0]
        )
        for scope in (None, kind):
            if scope not in totals:
                totals[scope] = _queued_count(conn, scope)
        found[job_id] = (ahead + 1, totals[None], kind_ahead + 1, totals[kind])
    return found


def queue_head(
    conn: sqlite3.Connection, limit: int
) -> list[tuple[JobView, tuple[int, int, int, int]]]:
    """The first `limit` queued jobs in dispatch order, each with its place."""
    rows = conn.execute(
        f"SELECT {QUEUED_COLUMNS} FROM jobs INDEXED BY jobs_order WHERE {_IN_ORDER} "
        "ORDER BY priority DESC, fair_tag, id LIMIT ?",
        (limit,),
    ).fetchall()
    if not rows:
        return []
    totals: dict[str | None, int] = {None: _queued_count(conn, None)}
    in_kind: dict[str, int] = {}
    head = []
    for index, row in enumerate(rows):
        job = JobView(*row)
        in_kind[job.kind] = in_kind.get(job.kind, 0) + 1
        if job.kind not in totals:
            totals[job.kind] = _queued_count(conn, job.kind)
        head.append((job, (index + 1, totals[None], in_kind[job.kind], totals[job.kind])))
    return head


def unended_dependencies(conn: sqlite3.Connection, job_ids: list[int]) -> dict[int, list[int]]:
    """For each of `job_ids` that runs after jobs still queued or running: their ids."""
    if not job_ids:
        return {}
    rows = conn.execute(
        "SELECT job_deps.job_id, job_deps.after_id FROM job_deps "
        "JOIN jobs ON jobs.id = job_deps.after_id "
        f"WHERE job_deps.job_id IN ({placeholders(job_ids)}) "
        "AND jobs.status IN ('queued', 'running') ORDER BY job_deps.job_id, job_deps.after_id",
        job_ids,
    ).fetchall()
    waiting: dict[int, list[int]] = {}
    for job_id, after_id in rows:
        waiting.setdefault(job_id, []).append(after_id)
    return waiting


def add_position_events(
    conn: sqlite3.Connection,
    events: Events,
    *,
    changed: list[tuple[JobView, dict[str, Any]]],
    now: float,
) -> None:
    """One `position` event per job whose place or reason changed, for those still queued."""
    still_queued = {
        row[0]
        for row in conn.execute(
            f"SELECT id FROM jobs WHERE status = 'queued' AND id IN ({placeholders(changed)})",
            [job.id for job, _ in changed],
        )
    }
    for job, data in changed:
        if job.id in still_queued:
            add_event(events, job, "position", now, data)


def job_with_events(
    conn: sqlite3.Connection, job_id: int, limit: int
) -> tuple[JobView | None, list[Event]]:
    """A job and its latest events from one snapshot: a job that finishes between two
    separate reads would otherwise look running beside its own terminal event."""
    conn.execute("BEGIN")
    try:
        return get_job(conn, job_id), recent_events(conn, job_id, limit)
    finally:
        conn.execute("COMMIT")


def last_seq(conn: sqlite3.Connection) -> int:
    return conn.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()[0]


def recent_events(conn: sqlite3.Connection, job_id: int, limit: int) -> list[Event]:
    rows = conn.execute(
        "SELECT seq, job_id, user, kind, type, at, data FROM events WHERE job_id = ? "
        "ORDER BY seq DESC LIMIT ?",
        (job_id, limit),
    ).fetchall()
    return [
        Event(seq=r[0], job=r[1], user=r[2], kind=r[3], type=r[4], at=r[5], data=_loads(r[6]))
        for r in reversed(rows)
    ]


def _loads(text: str) -> dict[str, Any]:
    return msgspec.json.decode(text)


def counts_by_status(conn: sqlite3.Connection) -> dict[str, int]:
    rows = conn.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall()
    return {status: n for status, n in rows}


def queued_by_kind(conn: sqlite3.Connection) -> dict[str, int]:
    rows = conn.execute(
        "SELECT kind, COUNT(*) FROM jobs WHERE status = 'queued' GROUP BY kind"
    ).fetchall()
    return {kind: n for kind, n in rows}


def counts_by_status_and_kind(conn: sqlite3.Connection) -> dict[tuple[str, str], int]:
    rows = conn.execute("SELECT status, kind, COUNT(*) FROM jobs GROUP BY status, kind")
    return {(status, kind): n for status, kind, n in rows}


def finished_per_span(
    conn: sqlite3.Connection, *, since: float, width: float, spans: int
) -> list[dict[str, float | int]]:
    """How many jobs finished done, failed and canceled in each of `spans` spans of `width`
    seconds from `since`, oldest first. One pass over the finished rows of the whole period
    (the finished_at index), counted per span with CASE: no dialect's own date or rounding
    function is needed."""
    bounds = [(since + i * width, since + (i + 1) * width) for i in range(spans)]
    counts = ", ".join(
        "COUNT(CASE WHEN finished_at >= ? AND finished_at < ? THEN 1 END)" for _ in bounds
    )
    rows = conn.execute(
        f"SELECT status, {counts} FROM jobs "
        "WHERE finished_at >= ? AND finished_at < ? GROUP BY status",
        [*(edge for span in bounds for edge in span), since, since + spans * width],
    ).fetchall()
    per_span: list[dict[str, float | int]] = [
        {"start": start, "done": 0, "failed": 0, "canceled": 0} for start, _ in bounds
    ]
    for status, *numbers in rows:
        if status in ("done", "failed", "canceled"):
            for span, n in zip(per_span, numbers, strict=True):
                span[status] = n
    return per_span


def oldest_queued_since(conn: sqlite3.Connection) -> float | None:
    """When the longest-waiting queued job was to start: its submission, or its run_at."""
    return conn.execute(
        "SELECT MIN(COALESCE(run_at, created_at)) FROM jobs WHERE status = 'queued'"
    ).fetchone()[0]
