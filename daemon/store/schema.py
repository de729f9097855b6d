"""The schema: the tables and indexes as a list of migrations, one per schema version.

A database records the version it is at; opening it runs the migrations it has not had, each
in its own transaction. A migration is never edited once released: a change is a new one. The
statements are SQLite's; PostgreSQL runs them as postgres.py translates them, so a new
migration keeps to what both take: the types INTEGER, REAL and TEXT, a surrogate key as
`id INTEGER PRIMARY KEY AUTOINCREMENT`, booleans as INTEGER 0/1, plain and partial indexes.
"""

from __future__ import annotations

from typing import Any

from jobwarden.errors import StartupError
from jobwarden.store.backend import backend_of

MIGRATIONS: list[str] = [
    """
    CREATE TABLE jobs (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        kind TEXT NOT NULL,
        user TEXT NOT NULL,
        status TEXT NOT NULL,
        priority INTEGER NOT NULL,
        payload TEXT NOT NULL,
        idempotency_key TEXT,
        attempt INTEGER NOT NULL DEFAULT 0,
        max_attempts INTEGER NOT NULL,
        recoveries INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        available_at REAL NOT NULL,
        started_at REAL,
        finished_at REAL,
        heartbeat_at REAL,
        progress REAL,
        message TEXT,
        reason TEXT,
        checkpoint TEXT,
        result TEXT,
        error TEXT
    );
    -- The next backoff deadline: MIN(available_at) among queued jobs.
    CREATE INDEX jobs_dispatch ON jobs(status, available_at, priority, id);
    -- Dispatch order: highest priority first, then oldest.
    CREATE INDEX jobs_order ON jobs(status, priority DESC, id);
    CREATE INDEX jobs_kind_status ON jobs(kind, status);
    CREATE INDEX jobs_user ON jobs(user, id);
    CREATE UNIQUE INDEX jobs_idempotency ON jobs(user, idempotency_key)
        WHERE idempotency_key IS NOT NULL;
    CREATE TABLE events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        job_id INTEGER NOT NULL,
        user TEXT NOT NULL,
        kind TEXT NOT NULL,
        type TEXT NOT NULL,
        at REAL NOT NULL,
        data TEXT NOT NULL
    );
    CREATE INDEX events_job ON events(job_id, seq);
    CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    """,
    """
    -- When the reported progress last changed: the stall rule's clock.
    ALTER TABLE jobs ADD COLUMN progress_at REAL;
    CREATE INDEX jobs_finished ON jobs(status, finished_at);
    """,
    """
    -- One row per external call: what it cost, to whom. Kept when finished jobs are pruned.
    CREATE TABLE ledger (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        job_id INTEGER,
        user TEXT NOT NULL,
        kind TEXT NOT NULL,
        service TEXT NOT NULL,
        units REAL NOT NULL,
        usd REAL NOT NULL,
        ok INTEGER NOT NULL,
        at REAL NOT NULL,
        day TEXT NOT NULL,
        month TEXT NOT NULL
    );
    CREATE INDEX ledger_day ON ledger(day);
    CREATE INDEX ledger_month ON ledger(month);
    CREATE INDEX ledger_job ON ledger(job_id);
    CREATE TABLE breakers (
        service TEXT PRIMARY KEY,
        state TEXT NOT NULL,
        open_until REAL,
        changed_at REAL NOT NULL
    );
    """,
    """
    -- Users: limits, credits, and only a hash of the token.
    CREATE TABLE users (
        name TEXT PRIMARY KEY,
        token_hash TEXT UNIQUE,
        credits INTEGER,
        spent INTEGER NOT NULL DEFAULT 0,
        daily_limit INTEGER,
        rate TEXT,
        max_running INTEGER,
        disabled INTEGER NOT NULL DEFAULT 0,
        -- Jobs created on `day` (in the limits' time zone): the daily limit's count.
        day TEXT,
        day_count INTEGER NOT NULL DEFAULT 0,
        -- The fair-queueing tag of the user's latest job.
        fair_tag INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL
    ) WITHOUT ROWID;
    -- Round-robin across users within a priority level: the n-th job a user has waiting
    -- gets a tag one past their previous job's and never below the tag being dispatched.
    ALTER TABLE jobs ADD COLUMN fair_tag INTEGER NOT NULL DEFAULT 0;
    -- Credits reserved at admission: spent when done, refunded on failure or cancel.
    ALTER TABLE jobs ADD COLUMN credits INTEGER NOT NULL DEFAULT 0;
    DROP INDEX jobs_order;
    CREATE INDEX jobs_order ON jobs(status, priority DESC, fair_tag, id);
    DROP INDEX jobs_kind_status;
    CREATE INDEX jobs_kind_order ON jobs(kind, status, priority DESC, fair_tag, id);
    """,
    """
    -- The queue's indexes hold queued rows only, so that a job's later transitions (running,
    -- done) leave them alone: each transition changes one index on status instead of four.
    -- Queries name `status = 'queued'` literally, which is what lets SQLite use them.
    DROP INDEX jobs_dispatch;
    DROP INDEX jobs_order;
    DROP INDEX jobs_kind_order;
    DROP INDEX jobs_finished;
    CREATE INDEX jobs_status ON jobs(status, kind);
    CREATE INDEX jobs_dispatch ON jobs(available_at) WHERE status = 'queued';
    CREATE INDEX jobs_order ON jobs(priority DESC, fair_tag, id) WHERE status = 'queued';
    CREATE INDEX jobs_kind_order ON jobs(kind, priority DESC, fair_tag, id)
        WHERE status = 'queued';
    CREATE INDEX jobs_finished ON jobs(finished_at) WHERE finished_at IS NOT NULL;
    """,
    """
    -- An idempotency key binds the user's active job only: once the job has finished, the key
    -- starts a new one. Two active jobs of a user never share a key, however the submissions
    -- race, and an operator's retry may not bring back a job whose key is taken again.
    DROP INDEX jobs_idempotency;
    CREATE UNIQUE INDEX jobs_idempotency_active ON jobs(user, idempotency_key)
        WHERE idempotency_key IS NOT NULL AND status IN ('queued', 'running');
    -- The finished jobs with a key: for the idempotency window, and for a resend of the very
    -- submission that made one (its client's submission_id).
    CREATE INDEX jobs_idempotency_finished ON jobs(user, idempotency_key, finished_at)
        WHERE idempotency_key IS NOT NULL AND finished_at IS NOT NULL;
    ALTER TABLE jobs ADD COLUMN submission_id TEXT;
    """,
    """
    -- What a call cost beyond the worst case it reserved (0: it kept within): an overrun.
    ALTER TABLE ledger ADD COLUMN overrun_usd REAL NOT NULL DEFAULT 0;
    """,
    """
    -- A running command's process group, and what identifies its leader beyond a reusable pid
    -- (boot id and start time): what a restart after a crash ends before the job runs again.
    ALTER TABLE jobs ADD COLUMN process_group INTEGER;
    ALTER TABLE jobs ADD COLUMN process_identity TEXT;
    """,
    """
    -- Recurring schedules: what a restart, and every daemon on the database, must agree on.
    CREATE TABLE schedules (
        name TEXT PRIMARY KEY,
        -- The cron and time zone its slots follow: a change starts it afresh from now.
        spec TEXT NOT NULL,
        paused INTEGER NOT NULL DEFAULT 0,
        -- No slot at or before this runs: when it was first seen, changed or resumed.
        since REAL NOT NULL,
        changed_at REAL NOT NULL
    );
    -- One row per slot a schedule has decided, run or skipped, and per trigger (slot NULL):
    -- the unique (schedule, slot) makes each slot fire once, whoever inserts it first.
    CREATE TABLE schedule_runs (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        schedule TEXT NOT NULL,
        slot REAL,
        at REAL NOT NULL,
        job_id INTEGER,
        -- Why the slot made no job (its previous run still active, a guard's refusal).
        skipped TEXT
    );
    CREATE UNIQUE INDEX schedule_runs_slot ON schedule_runs(schedule, slot);
    CREATE INDEX schedule_runs_latest ON schedule_runs(schedule, id);
    -- The schedule a job was made by; its active runs, for overlap = "skip".
    ALTER TABLE jobs ADD COLUMN schedule TEXT;
    CREATE INDEX jobs_schedule_active ON jobs(schedule)
        WHERE schedule IS NOT NULL AND status IN ('queued', 'running');
    """,
    """
    -- What a job waits for besides its turn (docs/scheduling.md). Dispatch takes a queued
    -- job only when available_at has come, held = 0, after_pending = 0 and its user's
    -- held = 0. run_at: when the submitter asked it to start (NULL: at once); available_at
    -- carries it until the first attempt, and the SLA counts from it.
    ALTER TABLE jobs ADD COLUMN run_at REAL;
    -- Tags as a JSON list, for the job's views; job_tags finds the jobs with a tag.
    ALTER TABLE jobs ADD COLUMN tags TEXT;
    -- Bits: 1 held by an operator until released, 2 its user is on hold (users.held, which
    -- decides; this copy keeps such jobs out of the dispatch index).
    ALTER TABLE jobs ADD COLUMN held INTEGER NOT NULL DEFAULT 0;
    -- The jobs it runs after (a JSON list), whether it runs after they end however they end,
    -- and how many of them have not ended yet: the write that ends one counts it down.
    ALTER TABLE jobs ADD COLUMN after_ids TEXT;
    ALTER TABLE jobs ADD COLUMN after_any INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE jobs ADD COLUMN after_pending INTEGER NOT NULL DEFAULT 0;
    -- 1: the user's queued jobs wait until released (unlike disabled, which refuses new ones).
    ALTER TABLE users ADD COLUMN held INTEGER NOT NULL DEFAULT 0;
    -- The dispatch order holds only jobs that nothing but time or their turn keeps waiting:
    -- a hold or a dependency can keep many jobs waiting, and the claim would walk them all.
    -- Queries name these conditions literally, which is what lets SQLite use it.
    DROP INDEX jobs_order;
    CREATE INDEX jobs_order ON jobs(priority DESC, fair_tag, id)
        WHERE status = 'queued' AND held = 0 AND after_pending = 0;
    CREATE TABLE job_tags (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        job_id INTEGER NOT NULL,
        tag TEXT NOT NULL
    );
    CREATE INDEX job_tags_tag ON job_tags(tag, job_id);
    CREATE INDEX job_tags_job ON job_tags(job_id);
    CREATE TABLE job_deps (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        job_id INTEGER NOT NULL,
        after_id INTEGER NOT NULL
    );
    -- The jobs waiting for one that ends.
    CREATE INDEX job_deps_after ON job_deps(after_id);
    CREATE INDEX job_deps_job ON job_deps(job_id);
    """,
    """
    -- Operator tokens for the HTTP API: what the admin socket may do, by Bearer token. Only
    -- the token's SHA-256 is kept; revoking one deletes its row.
    CREATE TABLE operator_tokens (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        name TEXT NOT NULL UNIQUE,
        token_hash TEXT NOT NULL UNIQUE,
        created_at REAL NOT NULL
    );
    """,
    """
    -- Guards every daemon on the database shares (docs/guards.md). A user's rate bucket, as
    -- its last take left it (NULL: full), and until when adaptive shedding slows the user.
    ALTER TABLE users ADD COLUMN bucket_tokens REAL;
    ALTER TABLE users ADD COLUMN bucket_at REAL;
    ALTER TABLE users ADD COLUMN slowed_until REAL;
    -- The spend of each budget day ('YYYY-MM-DD') and month ('YYYY-MM'), grown by each
    -- booking: the rows a reservation locks and the totals it checks (store/ledger.py).
    CREATE TABLE budget_spend (period TEXT PRIMARY KEY, usd REAL NOT NULL);
    INSERT INTO budget_spend (period, usd) SELECT day, SUM(usd) FROM ledger GROUP BY day;
    INSERT INTO budget_spend (period, usd) SELECT month, SUM(usd) FROM ledger GROUP BY month;
    -- The one daemon that probes a half-open circuit, and until when (store/breakers.py).
    ALTER TABLE breakers ADD COLUMN probe_holder TEXT;
    ALTER TABLE breakers ADD COLUMN probe_until REAL;
    -- Counts the changes written, for the daemons that take them up.
    ALTER TABLE breakers ADD COLUMN version INTEGER NOT NULL DEFAULT 0;
    -- A service's limits for every daemon: its rate bucket, and its calls in flight, each
    -- held until it ends or its lease runs out (store/breakers.py).
    CREATE TABLE service_limits (service TEXT PRIMARY KEY, tokens REAL, updated_at REAL);
    CREATE TABLE service_calls (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        service TEXT NOT NULL,
        holder TEXT NOT NULL,
        expires_at REAL NOT NULL
    );
    CREATE INDEX service_calls_service ON service_calls(service, expires_at);
    -- Each call's worst case until it is booked, held by one daemon under a lease it renews.
    CREATE TABLE budget_reservations (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        holder TEXT NOT NULL,
        job_id INTEGER,
        service TEXT NOT NULL,
        usd REAL NOT NULL,
        expires_at REAL NOT NULL
    );
    """,
    """
    -- Where to tell an application that its job is final (the submission's webhook URL).
    CREATE TABLE job_webhooks (
        job_id INTEGER PRIMARY KEY,
        url TEXT NOT NULL
    );
    -- One row per final status to deliver: written in the transaction of that status, so a
    -- delivery survives a crash. next_at doubles as a lease: a sender pushes it past the
    -- send's timeout before sending, so a daemon that dies mid-send leaves it due again.
    CREATE TABLE webhook_deliveries (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        job_id INTEGER NOT NULL,
        url TEXT NOT NULL,
        status TEXT NOT NULL,
        created_at REAL NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_at REAL,
        delivered_at REAL,
        answer TEXT
    );
    CREATE INDEX webhook_deliveries_due ON webhook_deliveries(next_at) WHERE next_at IS NOT NULL;
    CREATE INDEX webhook_deliveries_job ON webhook_deliveries(job_id);
    """,
    """
    -- A job's own output (a command's stderr and non-protocol stdout, a python handler's
    -- log), oldest lines dropped past a size per job; deleted with the job.
    CREATE TABLE job_logs (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        job_id INTEGER NOT NULL,
        attempt INTEGER NOT NULL,
        at REAL NOT NULL,
        stream TEXT NOT NULL,
        line TEXT NOT NULL,
        size INTEGER NOT NULL
    );
    CREATE INDEX job_logs_job ON job_logs(job_id, id);
    -- The bytes of its lines kept, and how many older lines were dropped to stay in bounds.
    ALTER TABLE jobs ADD COLUMN log_bytes INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE jobs ADD COLUMN log_dropped INTEGER NOT NULL DEFAULT 0;
    """,
    """
    -- The daemons sharing the database: each renews its lease while it lives. A node whose
    -- lease has run out is dead; its running jobs are recovered by the elected daemon.
    CREATE TABLE nodes (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        host TEXT NOT NULL,
        pid INTEGER NOT NULL,
        started_at REAL NOT NULL,
        heartbeat_at REAL NOT NULL,
        lease_until REAL NOT NULL
    );
    -- Roles one daemon holds at a time ("maintenance"): the holder renews its lease; another
    -- takes the role only once that lease has run out.
    CREATE TABLE leases (
        name TEXT PRIMARY KEY,
        node INTEGER NOT NULL,
        until REAL NOT NULL
    );
    -- The node running the job's current attempt: with the attempt, the fence every write of
    -- that attempt must match.
    ALTER TABLE jobs ADD COLUMN node INTEGER;
    CREATE INDEX jobs_running_node ON jobs(node) WHERE status = 'running';
    """,
]


def migrate(conn: Any) -> int:
    """Bring the database to the newest schema version; returns that version."""
    backend = backend_of(conn)
    # The version is read under the lock: a daemon that waited for another's migration finds
    # the schema up to date.
    with backend.migrating(conn):
        version = backend.schema_version(conn)
        if version > len(MIGRATIONS):
            raise StartupError(
                f"database schema version {version} is newer than this jobwarden knows "
                f"({len(MIGRATIONS)}); upgrade jobwarden"
            )
        for number in range(version, len(MIGRATIONS)):
            backend.migrate_to(conn, number + 1, MIGRATIONS[number])
    return len(MIGRATIONS)
