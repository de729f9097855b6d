"""The store: every row jobwarden keeps, and every SQL statement of the project.

What it owns, by module:

- `engine`: the `Engine` interface the rest of jobwarden uses (`open`, `write`, `hand_over`,
  `write_or_keep`, `read`, `checkpoint_wal`, and `health` with the `probe_while_faulted` that
  ends a fault), and `Store`, the engine: one writer thread with group commit, and a reader
  that never waits for it;
- `schema`: the tables and indexes, as numbered migrations;
- `backend`: which database a path or URL takes, and what each must provide; `sqlite` and
  `postgres`: those two (connections, transactions, faults, the schema version), and what
  each makes of the shared statements' text;
- `copying`: `store copy`, an SQLite history into PostgreSQL;
- `rows`: what the query modules share (job rows to views, JSON columns, event rows, writes
  that fail one item at a time);
- the statements, grouped by what they serve: `jobs` (transitions, the queue, events,
  settings), `users`, `ledger` (booked calls, totals, reports), `breakers` (circuit states),
  `monitor` (the rows the monitor's rules look at), `reports` (the load test's report),
  `schedules` (recurring schedules: their pauses, and one row per slot each has fired).

Callers hand the engine functions of these modules, `store.write(partial(jobs.finish, ...))`
and `store.read(jobs.counts_by_status)`; none above the store holds SQL of its own. A write is
a function of a connection and the event rows it adds; a query, a function of a connection.

The engine runs on SQLite (a file path) or PostgreSQL (a postgresql:// URL), reaching the
database only through its backend module; the statements are shared. What callers rely on
holds on both: a write is committed before `write` returns, its events get increasing `seq`
and are published after the commit, a database that takes no writes (or cannot be reached)
raises StoreError and is a fault in `health` until a probe commits, and the query functions
keep their signatures, so actors and listeners do not change.
"""

from jobwarden.store.engine import Engine, Store
from jobwarden.store.rows import each

__all__ = ["Engine", "Store", "each"]
