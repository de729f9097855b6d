"""Recurring schedules: each one's state, and the slots each has decided.

A slot fires once. Its row in `schedule_runs` is unique per (schedule, slot) and is inserted
in the same transaction as the job it makes, so a restart, or a second daemon on the same
database, that reaches the same slot inserts nothing and makes no job: whoever inserts the row
first fires the slot. Pauses live here too, and every fire reads them in its transaction, so a
daemon whose memory has not heard of a pause fires nothing either.
"""

from __future__ import annotations

import msgspec

from jobwarden.store.jobs import Admitted, NewJob, Quota, Refused, insert_many
from jobwarden.store.rows import Events, placeholders
from jobwarden.store.sqlite import Connection


class ScheduleState(msgspec.Struct):
    """A schedule as the store keeps it."""

    name: str
    paused: bool
    # No slot at or before this runs: when the schedule was first seen, changed or resumed.
    since: float
    # The latest slot decided (run or skipped), if any.
    last_slot: float | None


class Run(msgspec.Struct, omit_defaults=True):
    """A schedule's latest run: its slot (None: a trigger), when it was decided, and the job
    it made with that job's status now, or why it made none."""

    slot: float | None
    at: float
    job: int | None = None
    status: str | None = None
    skipped: str | None = None


def sync(
    conn: Connection, events: Events, *, specs: dict[str, str], now: float
) -> dict[str, ScheduleState]:
    """Register the configured schedules (name -> its cron and time zone as one text) and
    return their states. A new schedule, or one whose spec changed, starts from `now`: the
    slots before it are not missed, they were never its."""
    for name, spec in specs.items():
        conn.execute(
            "INSERT INTO schedules (name, spec, paused, since, changed_at) VALUES (?, ?, 0, ?, ?) "
            "ON CONFLICT (name) DO NOTHING",
            (name, spec, now, now),
        )
        conn.execute(
            "UPDATE schedules SET spec = ?, since = ?, changed_at = ? WHERE name = ? AND spec <> ?",
            (spec, now, now, name, spec),
        )
    return states(conn, list(specs))


def states(conn: Connection, names: list[str]) -> dict[str, ScheduleState]:
    rows = conn.execute(
        f"SELECT name, paused, since FROM schedules WHERE name IN ({placeholders(names)})", names
    ).fetchall()
    return {
        name: ScheduleState(name, bool(paused), since, _last_slot(conn, name))
        for name, paused, since in rows
    }


def _last_slot(conn: Connection, name: str) -> float | None:
    slot: float | None = conn.execute(
        "SELECT MAX(slot) FROM schedule_runs WHERE schedule = ?", (name,)
    ).fetchone()[0]
    return slot


def set_paused(
    conn: Connection, events: Events, *, name: str, paused: bool, now: float
) -> ScheduleState | None:
    """Pause or resume a schedule (None: the store has no such schedule). Resuming starts it
    afresh from `now`: the slots it was paused for are not caught up."""
    if paused:
        conn.execute("UPDATE schedules SET paused = 1, changed_at = ? WHERE name = ?", (now, name))
    else:
        conn.execute(
            "UPDATE schedules SET paused = 0, since = ?, changed_at = ? "
            "WHERE name = ? AND paused = 1",
            (now, now, name),
        )
    return states(conn, [name]).get(name)


def fire(
    conn: Connection,
    events: Events,
    *,
    schedule: str,
    slot: float | None,
    new: NewJob | Refused,
    skip_if_active: bool,
    quota: Quota,
    now: float,
) -> Admitted | Refused | None:
    """Fire one slot of `schedule` (None: a trigger, outside the slots): insert the job `new`
    and the slot's row, in this one transaction. `new` may be a refusal already (a guard
    said no before the store): the slot is then recorded as skipped for that reason.

    None: the slot is not this call's to fire: it was decided before (by a daemon before a
    restart, or by another daemon), or the schedule is paused or started after it. Refused:
    the slot made no job, and its row says why (its previous run is still active with
    `skip_if_active`, or a guard refused it); a refused trigger leaves no row. Admitted: the
    job it made."""
    if slot is not None:
        row = conn.execute(
            "SELECT paused, since FROM schedules WHERE name = ?", (schedule,)
        ).fetchone()
        if row is None or row[0] or slot <= row[1]:
            return None
        taken = conn.execute(
            "INSERT INTO schedule_runs (schedule, slot, at) VALUES (?, ?, ?) "
            "ON CONFLICT (schedule, slot) DO NOTHING RETURNING id",
            (schedule, slot, now),
        ).fetchall()
        if not taken:
            return None
        run_id: int | None = taken[0][0]
    else:
        run_id = None
    result = (
        new
        if isinstance(new, Refused)
        else _run(conn, events, schedule, new, quota, now, skip_if_active=skip_if_active)
    )
    if isinstance(result, Exception):
        # Rolls back this write, the slot's row with it: the slot is still to be decided.
        raise result
    if isinstance(result, Admitted):
        if run_id is None:
            conn.execute(
                "INSERT INTO schedule_runs (schedule, slot, at, job_id) VALUES (?, NULL, ?, ?)",
                (schedule, now, result.job.id),
            )
        else:
            conn.execute(
                "UPDATE schedule_runs SET job_id = ? WHERE id = ?", (result.job.id, run_id)
            )
    elif run_id is not None:
        conn.execute(
            "UPDATE schedule_runs SET skipped = ? WHERE id = ?",
            (f"{result.code}: {result.message}", run_id),
        )
    return result


def _run(
    conn: Connection,
    events: Events,
    schedule: str,
    new: NewJob,
    quota: Quota,
    now: float,
    *,
    skip_if_active: bool,
) -> Admitted | Refused | Exception:
    if skip_if_active:
        active = conn.execute(
            "SELECT id, status FROM jobs WHERE schedule = ? AND status IN ('queued', 'running') "
            "LIMIT 1",
            (schedule,),
        ).fetchone()
        if active is not None:
            return Refused("CONFLICT", f"its previous run, job {active[0]}, is still {active[1]}")
    result: Admitted | Refused | Exception = insert_many(
        conn, events, batch=[new], now=now, quota=quota
    )[0]
    return result


def overview(
    conn: Connection, *, names: list[str]
) -> tuple[dict[str, ScheduleState], dict[str, Run]]:
    """The states and latest runs of the schedules named, from one snapshot."""
    return states(conn, names), latest_runs(conn, names)


def latest_runs(conn: Connection, names: list[str]) -> dict[str, Run]:
    """Each schedule's latest run, with the status its job has now."""
    runs = {}
    for name in names:
        row = conn.execute(
            "SELECT r.slot, r.at, r.job_id, j.status, r.skipped FROM schedule_runs r "
            "LEFT JOIN jobs j ON j.id = r.job_id WHERE r.schedule = ? ORDER BY r.id DESC LIMIT 1",
            (name,),
        ).fetchone()
        if row is not None:
            slot, at, job, status, skipped = row
            runs[name] = Run(slot=slot, at=at, job=job, status=status, skipped=skipped)
    return runs


def prune_runs(conn: Connection, events: Events, *, before: float) -> int:
    """Forget runs decided before `before`, but each schedule's latest slot: it is where a
    daemon that starts takes the schedule up."""
    cursor = conn.execute(
        "DELETE FROM schedule_runs WHERE at < ? AND (slot IS NULL OR slot < "
        "(SELECT MAX(latest.slot) FROM schedule_runs latest "
        "WHERE latest.schedule = schedule_runs.schedule))",
        (before,),
    )
    deleted: int = cursor.rowcount
    return deleted
