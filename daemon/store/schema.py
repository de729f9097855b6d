"""The schema: the tables and indexes as a list of migrations, one per schema version.

A database records the version it is at; opening it runs the migrations it has not had, each
in its own transaction. A migration is never edited once released: a change is a new one. The
statements are SQLite's (see sqlite.py for what another backend writes differently).
"""

from __future__ import annotations

from jobwarden.errors import StartupError
from jobwarden.store import sqlite

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
]


def migrate(conn: sqlite.Connection) -> int:
    """Bring the database to the newest schema version; returns that version."""
    version = sqlite.schema_version(conn)
    if version > len(MIGRATIONS):
        raise StartupError(
            f"database schema version {version} is newer than this jobwarden knows "
            f"({len(MIGRATIONS)}); upgrade jobwarden"
        )
    for number in range(version, len(MIGRATIONS)):
        sqlite.migrate_to(conn, number + 1, MIGRATIONS[number])
    return len(MIGRATIONS)
