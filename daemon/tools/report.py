"""The load test's report: every figure read from the store and the ledger after the run.

`collect` is a plain function of a connection to the run's database (it runs the queries of
jobwarden.store.reports), the config the run used and the driver's record, which holds only
what no table can: the submissions admission refused, and which jobs were made to hang. The
renderers turn the figures into the load test's report (markdown), a short summary, and PNG charts
when matplotlib is installed (`pip install 'jobwarden[report]'`). The report ends with what the
run says to do: recommendations, each derived from a figure and the config's own threshold for
it, and a conclusion from five checks.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from jobwarden.config import Config, format_duration
from jobwarden.store import jobs, reports
from jobwarden.store.sqlite import Connection
from jobwarden.wire.views import STATUSES

HOUR = 3600.0
MINUTE = 60.0
DAY = 86400.0
# A load test run at 100x is the usual fast mode: its durations are the real ones / 100.
FAST_MODE = 100
# The demo storybook's calls per book of 8 pages: 4 LLM steps, a cover and 8 pages, 1 upload.
CALLS_PER_BOOK = {"llm": 4, "image": 9, "storage": 1}
MONTH_DAYS = 30
CHARTS_EXTRA = "pip install 'jobwarden[report]'"


def progress_snapshot(conn: Connection) -> dict[str, Any]:
    """Jobs by status and the spend so far: what the progress bar and the intermediate file
    show while the run goes on."""
    by_status = jobs.counts_by_status(conn)
    calls, usd = reports.spend_so_far(conn)
    return {
        "jobs": sum(by_status.values()),
        **{status: by_status.get(status, 0) for status in STATUSES},
        "calls": calls,
        "usd": round(usd, 6),
    }


def collect(conn: Connection, config: Config, record: dict[str, Any]) -> dict[str, Any]:
    start, end = record["started_at"], record["ended_at"]
    rows = reports.job_rows(conn)
    cost_by_job = reports.cost_by_job(conn)
    services = _services(conn, config)
    total_usd = sum(service["usd"] for service in services)
    jobs_with_cost = len(cost_by_job)
    figures = {
        "jobs": _job_counts(rows),
        "hours": _per_hour(rows, cost_by_job, start, record["refused_by_hour"]),
        "failures": _failure_causes(rows),
        "durations": _durations(rows),
        "retries": _retries(conn, rows),
        "stuck": {
            **_stuck(conn, rows, record["stuck_injected"], start),
            "refused": record["stuck_refused"],
        },
        "crash": _crash(conn, rows, record) if record["crash_at"] is not None else None,
        "services": services,
        "ledger_days": _ledger_days(conn),
        "cost": {
            "total_usd": round(total_usd, 6),
            "jobs_with_cost": jobs_with_cost,
            "per_job_usd": round(total_usd / jobs_with_cost, 6) if jobs_with_cost else None,
            "nominal_per_book": _nominal_per_book(config),
            "measured_per_job": {
                service["service"]: round(service["usd"] / jobs_with_cost, 6)
                for service in services
                if jobs_with_cost
            },
        },
        "breakers": _breakers(conn, end),
        "series": _series(conn, start, end, config.budget.daily_usd),
    }
    figures["projection"] = _projection(
        figures["cost"]["per_job_usd"], record["plan"]["daily_volume"], config.budget.daily_usd
    )
    figures["guardrails"] = _guardrails(conn, record, figures, config)
    figures["recommendations"] = _recommendations(figures, config)
    figures["conclusion"] = _conclusion(figures, config)
    return figures


# -- the sections --------------------------------------------------------------------------


def _job_counts(rows: list[dict[str, Any]]) -> dict[str, Any]:
    statuses = Counter(row["status"] for row in rows)
    done = statuses["done"]
    degraded = [row for row in rows if row["status"] == "done" and row["degraded"]]
    finished = done + statuses["failed"] + statuses["canceled"]
    unfinished = [row for row in rows if row["status"] in ("queued", "running")]
    return {
        "total": len(rows),
        "done": done,
        "degraded": len(degraded),
        "placeholders": sum(row["placeholders"] or 0 for row in degraded),
        "failed": statuses["failed"],
        "canceled": statuses["canceled"],
        "finished": finished,
        "unfinished": len(unfinished),
        "unfinished_by_reason": dict(
            Counter(f"{row['status']} ({row['reason'] or 'not started'})" for row in unfinished)
        ),
        "success_rate": done / finished if finished else None,
    }


def _per_hour(
    rows: list[dict[str, Any]],
    cost_by_job: dict[int, float],
    start: float,
    refused_by_hour: list[int],
) -> list[dict[str, Any]]:
    """One row per hour of arrivals, for the jobs submitted in it (one submitted as the last
    hour ends counts in it)."""
    last = len(refused_by_hour) - 1
    table = [
        {
            "hour": hour + 1,
            "refused": refused,
            "submitted": 0,
            "done": 0,
            "failed": 0,
            "unfinished": 0,
            "usd": 0.0,
        }
        for hour, refused in enumerate(refused_by_hour)
    ]
    for row in rows:
        entry = table[min(int((row["created_at"] - start) // HOUR), last)]
        entry["submitted"] += 1
        if row["status"] in ("done", "failed"):
            entry[row["status"]] += 1
        elif row["status"] in ("queued", "running"):
            entry["unfinished"] += 1
        entry["usd"] += cost_by_job.get(row["id"], 0.0)
    for entry in table:
        finished = entry["done"] + entry["failed"]
        entry["success_rate"] = entry["done"] / finished if finished else None
        entry["usd"] = round(entry["usd"], 6)
    return table


def _failure_causes(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    causes = Counter(row["code"] or "UNKNOWN" for row in rows if row["status"] == "failed")
    return [
        {"code": code, "jobs": count, "share": count / len(rows)}
        for code, count in causes.most_common()
    ]


def percentile(values: list[float], fraction: float) -> float:
    """Nearest rank: the smallest value with at least `fraction` of the values at or below."""
    ordered = sorted(values)
    return ordered[max(math.ceil(fraction * len(ordered)) - 1, 0)]


def _stats(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {
        "avg": sum(values) / len(values),
        "min": min(values),
        "max": max(values),
        "p50": percentile(values, 0.50),
        "p95": percentile(values, 0.95),
        "p99": percentile(values, 0.99),
    }


def _durations(rows: list[dict[str, Any]]) -> dict[str, Any]:
    done = [row for row in rows if row["status"] == "done"]
    return {
        "jobs": len(done),
        # Submit to done: waiting in the queue, every attempt and every backoff.
        "turnaround": _stats([row["finished_at"] - row["created_at"] for row in done]),
        # The attempt that finished, from its start.
        "last_attempt": _stats([row["finished_at"] - row["started_at"] for row in done]),
    }


def _retries(conn: Connection, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Job retries (another attempt of the whole job, after its backoff) beside provider
    call retries (`ctx.call` trying one call again after the service's `retries` wait)."""
    retried = reports.status_events(conn, reason="RETRY")
    per_job = Counter(event.job_id for event in retried)
    causes = Counter(event.error_code or "UNKNOWN" for event in retried)
    calls = _call_retries(reports.call_tries(conn), reports.status_events(conn))
    return {
        "job_retries": len(retried),
        "per_job": len(retried) / len(rows) if rows else 0.0,
        "max_per_job": max(per_job.values(), default=0),
        "jobs_retried": len(per_job),
        "causes": dict(causes.most_common()),
        **calls,
        "call_retries_total": sum(calls["call_retries"].values()),
        "calls_given_up_total": sum(calls["calls_given_up"].values()),
        "failed_calls_total": sum(calls["failed_calls"].values()),
    }


def _call_retries(
    tries: list[reports.CallTry], events: list[reports.StatusEvent]
) -> dict[str, dict[str, int]]:
    """Which failed tries were tried again. A handler makes its calls one after another (the
    demo storybook does), so a failed try was retried when its job's next try, in the same
    attempt, is of the same service; one that ended its attempt was given up (the attempt
    then failed or was retried as a whole)."""
    attempt_starts: dict[int, list[float]] = defaultdict(list)
    for event in events:
        if event.status == "running":
            attempt_starts[event.job_id].append(event.at)
    by_job: dict[int | None, list[reports.CallTry]] = defaultdict(list)
    for call in tries:
        by_job[call.job_id].append(call)
    failed: Counter[str] = Counter()
    retried: Counter[str] = Counter()
    for job_id, calls in by_job.items():
        starts = attempt_starts.get(job_id, []) if job_id is not None else []
        for call, following in zip(calls, [*calls[1:], None], strict=True):
            if call.ok:
                continue
            failed[call.service] += 1
            same_attempt = following is not None and not any(
                call.at < start <= following.at for start in starts
            )
            if same_attempt and following.service == call.service:
                retried[call.service] += 1
    return {
        "failed_calls": dict(sorted(failed.items())),
        "call_retries": dict(sorted(retried.items())),
        "calls_given_up": {
            service: failed[service] - retried[service]
            for service in sorted(failed)
            if failed[service] > retried[service]
        },
    }


def _stuck(
    conn: Connection, rows: list[dict[str, Any]], injected: list[int], start: float
) -> dict[str, Any]:
    status = {row["id"]: row["status"] for row in rows}
    first_detection: dict[int, tuple[float, str]] = {}
    for event in reports.status_events(conn, error_code="STUCK_TIMEOUT"):
        # The monitor words its verdict "<rule>: <detail>"; the rule is stored nowhere else.
        rule = (event.error_message or "").partition(":")[0] or "unknown"
        first_detection.setdefault(event.job_id, (event.at - start, rule))
    injected_set = set(injected)
    detected = [job for job in injected if job in first_detection]
    # Recovered: the monitor got it out of its hung attempt, and it ended (done after a
    # resume, or failed STUCK_TIMEOUT once its attempts were spent), not left hanging.
    recovered = [job for job in detected if status.get(job) in ("done", "failed")]
    return {
        "injected": len(injected),
        "detected": len(detected),
        "recovered": len(recovered),
        "recovery_rate": len(recovered) / len(injected) if injected else None,
        "by_rule": dict(Counter(first_detection[job][1] for job in detected)),
        "outcomes": dict(Counter(status.get(job, "missing") for job in injected)),
        "detected_at": sorted(round(first_detection[job][0], 1) for job in detected),
        "others_detected": dict(
            Counter(rule for job, (_, rule) in first_detection.items() if job not in injected_set)
        ),
    }


def _crash(conn: Connection, rows: list[dict[str, Any]], record: dict[str, Any]) -> dict[str, Any]:
    status = {row["id"]: row["status"] for row in rows}
    recovered = sorted({event.job_id for event in reports.status_events(conn, reason="RECOVERED")})
    accepted = record["submitted"] - sum(record["rejections"].values())
    return {
        "at": record["crash_at"] - record["started_at"],
        # The jobs the restarted supervisor found `running` in the store and put back.
        "running_at_crash": len(recovered),
        "outcomes": dict(Counter(status[job] for job in recovered)),
        "crash_loop": sum(1 for row in rows if row["code"] == "CRASH_LOOP"),
        "accepted": accepted,
        "in_store": len(rows),
    }


def _services(conn: Connection, config: Config) -> list[dict[str, Any]]:
    services = []
    for service, calls, failed, units, usd in reports.service_totals(conn):
        spec = config.services.get(service)
        services.append(
            {
                "service": service,
                "calls": calls,
                "failed": failed,
                "units": units,
                "unit": spec.unit if spec else "call",
                "unit_price_usd": spec.price_usd if spec else None,
                "usd": round(usd, 6),
            }
        )
    return services


def _ledger_days(conn: Connection) -> list[dict[str, Any]]:
    return [
        {key: day[key] for key in ("period", "calls", "failed_calls", "usd", "jobs")}
        for day in reports.ledger_days(conn)
    ]


def _nominal_per_book(config: Config) -> dict[str, float]:
    prices = {
        service: CALLS_PER_BOOK[service] * config.services[service].price_usd
        for service in CALLS_PER_BOOK
        if service in config.services
    }
    return {**prices, "total": sum(prices.values())}


def _projection(per_job: float | None, volume: int, daily_budget: float) -> dict[str, Any]:
    if per_job is None:
        return {"books_per_day": volume, "daily_usd": None, "monthly_usd": None}
    daily = volume * per_job
    return {
        "books_per_day": volume,
        "books_per_month": volume * MONTH_DAYS,
        "daily_usd": round(daily, 2),
        "monthly_usd": round(daily * MONTH_DAYS, 2),
        "daily_budget_usd": daily_budget,
        "books_within_budget": math.floor(daily_budget / per_job) if daily_budget else None,
    }


def _breakers(conn: Connection, end: float) -> dict[str, Any]:
    services: dict[str, dict[str, Any]] = defaultdict(
        lambda: {"opened": 0, "half_open": 0, "closed": 0, "open_seconds": 0.0}
    )
    opened_at: dict[str, float] = {}
    for at, service, state in reports.breaker_changes(conn):
        entry = services[service]
        if state == "open":
            entry["opened"] += 1
            opened_at.setdefault(service, at)
        else:
            entry[state] += 1
            if service in opened_at:
                entry["open_seconds"] += at - opened_at.pop(service)
    for service, since in opened_at.items():
        services[service]["open_seconds"] += end - since
    return {
        service: {**entry, "open_seconds": round(entry["open_seconds"], 1)}
        for service, entry in sorted(services.items())
    }


def _series(conn: Connection, start: float, end: float, daily_budget: float) -> dict[str, Any]:
    """Per simulated minute: jobs finished, queue depth and running jobs at its end, and
    the budget day's spend so far (the run starts at a budget day's midnight)."""
    minutes = max(math.ceil((end - start) / MINUTE), 1)
    done, failed = [0] * minutes, [0] * minutes
    queued, running = [0] * minutes, [0] * minutes
    current: dict[int, str] = {}
    counts: Counter[str] = Counter()
    minute = 0

    def close_minutes_before(at: float) -> None:
        nonlocal minute
        while minute < minutes and at >= start + (minute + 1) * MINUTE:
            queued[minute], running[minute] = counts["queued"], counts["running"]
            minute += 1

    for job_id, at, status, *_ in reports.status_events(conn):
        close_minutes_before(at)
        if job_id in current:
            counts[current[job_id]] -= 1
        current[job_id] = status
        counts[status] += 1
        index = min(int((at - start) // MINUTE), minutes - 1)
        if status == "done":
            done[index] += 1
        elif status == "failed":
            failed[index] += 1
    close_minutes_before(math.inf)
    spend = [0.0] * minutes
    for at, usd in reports.spend_by_call(conn):
        spend[min(int((at - start) // MINUTE), minutes - 1)] += usd
    spend_today, total = [], 0.0
    for index, usd in enumerate(spend):
        if index and index % int(DAY // MINUTE) == 0:
            total = 0.0
        total += usd
        spend_today.append(round(total, 6))
    return {
        "minutes": minutes,
        "done": done,
        "failed": failed,
        "queued": queued,
        "running": running,
        "spend_today_usd": spend_today,
        "daily_budget_usd": daily_budget,
    }


def _guardrails(
    conn: Connection, record: dict[str, Any], figures: dict[str, Any], config: Config
) -> dict[str, Any]:
    budget_waits = len(reports.status_events(conn, reason="BUDGET_WAIT"))
    peak_day = max(figures["ledger_days"], key=lambda day: day["usd"], default=None)
    daily = config.budget.daily_usd
    return {
        "submitted": record["submitted"],
        "rejections": dict(sorted(record["rejections"].items(), key=lambda item: -item[1])),
        "budget": {
            "daily_usd": daily,
            "peak_day": peak_day["period"] if peak_day else None,
            "peak_day_usd": peak_day["usd"] if peak_day else 0.0,
            "peak_day_share": peak_day["usd"] / daily if peak_day and daily else None,
            "stopped_at_end": record["budget"].get("stopped"),
            "stop_reason": record["budget"].get("stop_reason"),
            "jobs_held_for_budget": budget_waits,
        },
        "max_queue_depth": max(figures["series"]["queued"], default=0),
        "max_running": max(figures["series"]["running"], default=0),
    }


# -- what the run says to do -----------------------------------------------------------------

# Headroom over the projected daily spend when the budget needs raising.
BUDGET_HEADROOM = 1.2


def _advice(topic: str, finding: str, advice: str | None = None) -> dict[str, Any]:
    """One recommendation: what the run showed and, when it calls for action, what to do."""
    return {"topic": topic, "act": advice is not None, "finding": finding, "advice": advice}


def _recommendations(figures: dict[str, Any], config: Config) -> list[dict[str, Any]]:
    found = [_failure_rate_advice(figures, config)]
    found += _breaker_advice(figures, config)
    found += _budget_advice(figures, config)
    found += _stuck_advice(figures["stuck"])
    job = figures["jobs"]
    if job["unfinished"] and not _budget_stopped(figures):
        found.append(
            _advice(
                "Capacity",
                f"{job['unfinished']:,} jobs were still queued or running an hour after the "
                f"last arrival ({counts(job['unfinished_by_reason'])}).",
                f"The {config.daemon.max_concurrent_jobs} slots (`daemon.max_concurrent_jobs`) "
                "or the providers' limits fall short of this load: raise them, or expect a "
                "queue that grows through the day.",
            )
        )
    rejections = figures["guardrails"]["rejections"]
    if rejections:
        refused = sum(rejections.values())
        found.append(
            _advice(
                "Request guards",
                f"{refused:,} of {figures['guardrails']['submitted']:,} submissions were refused "
                f"({counts(rejections)}): the guards held the flood back. Raise `[limits]` only "
                "if users this busy are ones to serve.",
            )
        )
    return found


def _failure_rate_advice(figures: dict[str, Any], config: Config) -> dict[str, Any]:
    job, threshold = figures["jobs"], config.monitor.failure_rate_alert
    if not job["finished"]:
        return _advice("Failure rate", "No job finished.", "Run longer, or look at the log.")
    rate = job["failed"] / job["finished"]
    stated = (
        f"{percent(rate)} of the finished jobs failed ({job['failed']:,} of "
        f"{job['finished']:,}); the alert threshold is {percent(threshold)} "
        "(`monitor.failure_rate_alert`)"
    )
    if rate <= threshold:
        worst = [hour for hour in figures["hours"] if _hour_failure_rate(hour) > threshold]
        if not worst:
            return _advice("Failure rate", f"{stated}, and no hour passed it.")
        return _advice(
            "Failure rate",
            f"{stated}. Over the run it held, but {'hours' if len(worst) > 1 else 'hour'} "
            + _and([f"{h['hour']} ({percent(_hour_failure_rate(h))})" for h in worst])
            + " passed it.",
            f"The alert looks at {format_duration(config.monitor.failure_window)} at a time, "
            "so it would fire for such a stretch: expect it, or look at what failed then.",
        )
    top = figures["failures"][0]
    return _advice(
        "Failure rate",
        f"{stated}: in production this run would raise the failure-rate alert.",
        f"Start with the commonest cause, `{top['code']}` ({top['jobs']:,} jobs; "
        "`jobwarden jobs --status failed` lists them). Raise the threshold only once the "
        "causes are understood.",
    )


def _hour_failure_rate(hour: dict[str, Any]) -> float:
    finished = hour["done"] + hour["failed"]
    return hour["failed"] / finished if finished else 0.0


def _breaker_advice(figures: dict[str, Any], config: Config) -> list[dict[str, Any]]:
    opened = {service: entry for service, entry in figures["breakers"].items() if entry["opened"]}
    if not opened:
        return [_advice("Circuit breakers", "No circuit opened.")]
    calls = {service["service"]: service for service in figures["services"]}
    findings, bursts, outages = [], [], []
    for service, entry in opened.items():
        totals = calls.get(service, {"calls": 0, "failed": 0})
        rate = totals["failed"] / totals["calls"] if totals["calls"] else 0.0
        findings.append(
            f"the {service} circuit opened {entry['opened']:,} times (open "
            f"{format_duration(entry['open_seconds'])} in all, while {percent(rate)} of its "
            f"{totals['calls']:,} calls failed over the run)"
        )
        spec = config.services[service].breaker
        (bursts if rate < spec.error_rate else outages).append((service, spec))
    advice = []
    if bursts:
        advice.append(
            "Under their breakers' `error_rate`, "
            + ", ".join(
                f"{service}'s {percent(spec.error_rate)} over {format_duration(spec.window)} "
                f"from {spec.min_calls} calls"
                for service, spec in bursts
            )
            + ", short bursts trip them: to tell a burst from an outage, raise `min_calls` or "
            "lengthen `window` under "
            + ", ".join(f"`services.{service}.breaker`" for service, _ in bursts)
            + "."
        )
    if outages:
        advice.append(
            ", ".join(service for service, _ in outages)
            + " failed beyond the breaker's `error_rate`, which kept calls off the provider "
            "meanwhile: take it up with the provider, or add a fallback."
        )
    if "image" in opened and figures["jobs"]["degraded"]:
        advice.append(
            f"Meanwhile {figures['jobs']['degraded']:,} books finished with placeholder images."
        )
    finding = "; ".join(findings)
    return [_advice("Circuit breakers", f"{finding[0].upper()}{finding[1:]}.", " ".join(advice))]


def _budget_advice(figures: dict[str, Any], config: Config) -> list[dict[str, Any]]:
    projection, budget = figures["projection"], config.budget
    if projection["daily_usd"] is None:
        return [_advice("Budget", "No job was charged, so there is no spend to project.")]
    volume = f"{projection['books_per_day']:,} books a day"
    over = [
        (name, projected, limit, key)
        for name, projected, limit, key in (
            ("daily", projection["daily_usd"], budget.daily_usd, "daily_usd"),
            ("monthly", projection["monthly_usd"], budget.monthly_usd, "monthly_usd"),
        )
        if limit and projected > limit
    ]
    found = []
    if over:
        found.append(
            _advice(
                "Budget",
                f"At {volume} the projection is {money(projection['daily_usd'])} a day and "
                f"{money(projection['monthly_usd'])} a month, past the "
                + " and the ".join(f"{name} budget of {money(limit)}" for name, _, limit, _ in over)
                + ".",
                "Spending would stop every day after "
                f"{projection['books_within_budget']:,} books. Raise "
                + " and ".join(
                    f"`budget.{key}` to {money(math.ceil(projected * BUDGET_HEADROOM), 0)}"
                    for _, projected, _, key in over
                )
                + f" (the projection and {percent(BUDGET_HEADROOM - 1)} headroom), or plan for "
                "fewer books.",
            )
        )
    else:
        share = projection["daily_usd"] / budget.daily_usd if budget.daily_usd else None
        alerts = [fraction for fraction in budget.alert_at if share and fraction <= share]
        finding = (
            f"At {volume} the projection is {money(projection['daily_usd'])} a day "
            f"({percent(share)} of the daily budget) and {money(projection['monthly_usd'])} a "
            "month: within the limits."
        )
        advice = (
            f"The {percent(max(alerts))} budget alert would fire every day, so it would stop "
            "meaning anything: raise `budget.alert_at` or the budget."
            if alerts
            else None
        )
        found.append(_advice("Budget", finding, advice))
    if _budget_stopped(figures):
        held = figures["guardrails"]["budget"]["jobs_held_for_budget"]
        waiting = figures["jobs"]["unfinished"]
        found.append(
            _advice(
                "Budget stop",
                f"The budget stopped spending during the run: {held:,} times a job went back "
                f"to wait for budget (BUDGET_WAIT), and {waiting:,} jobs were left waiting for "
                "the next budget day.",
                "That is the hard limit at work; if this volume is the plan, the budget is "
                "too small for it.",
            )
        )
    return found


def _budget_stopped(figures: dict[str, Any]) -> bool:
    budget = figures["guardrails"]["budget"]
    return bool(budget["stopped_at_end"] or budget["jobs_held_for_budget"])


def _stuck_advice(stuck: dict[str, Any]) -> list[dict[str, Any]]:
    if not stuck["injected"]:
        return [
            _advice(
                "Stuck jobs",
                "No stuck jobs were injected, so recovery went untested.",
                "Run with `--inject-stuck 3` (the default) to see the monitor find them.",
            )
        ]
    finding = (
        f"{stuck['recovered']} of {stuck['injected']} injected stuck jobs were recovered "
        f"(found by rule: {counts(stuck['by_rule'])})."
    )
    if stuck["recovered"] == stuck["injected"]:
        return [_advice("Stuck jobs", finding)]
    return [
        _advice(
            "Stuck jobs",
            finding,
            "The monitor left some hanging: check `monitor.stuck_after` and `stall_after` "
            "against the kind's `timeout`, and the monitor's log lines.",
        )
    ]


# Each check of the verdict: what holds when it passes, and what went wrong when it fails.
CHECKS = {
    "failure_rate": (
        "failure rate within the alert threshold",
        "the failure rate passed the alert threshold",
    ),
    "stuck": ("stuck job recovery", "stuck jobs were left hanging"),
    "lost": ("no accepted job lost", "accepted jobs were lost"),
    "finished": ("every job finished", "jobs were left unfinished"),
    "budget": ("spend within the daily budget", "spend passed the daily budget"),
}


def _conclusion(figures: dict[str, Any], config: Config) -> dict[str, Any]:
    """The verdict: ready at this load when no check fails; the checks a run could not make
    (no stuck job injected, none finished) are named as untested."""
    job, stuck, cost = figures["jobs"], figures["stuck"], figures["cost"]
    budget = figures["guardrails"]["budget"]
    rate = job["failed"] / job["finished"] if job["finished"] else None
    accepted = figures["guardrails"]["submitted"] - sum(
        figures["guardrails"]["rejections"].values()
    )
    passed = {
        "failure_rate": None if rate is None else rate <= config.monitor.failure_rate_alert,
        "stuck": stuck["recovered"] == stuck["injected"] if stuck["injected"] else None,
        "lost": job["total"] == accepted,
        # Jobs the budget stop holds wait for the next budget day, as they should.
        "finished": job["unfinished"] == 0 or _budget_stopped(figures),
        "budget": budget["peak_day_share"] is None or budget["peak_day_share"] <= 1.0,
    }
    nominal = cost["nominal_per_book"]["total"]
    return {
        "ready": all(result is not False for result in passed.values()),
        "failed": [CHECKS[name][1] for name, result in passed.items() if result is False],
        "untested": [CHECKS[name][0] for name, result in passed.items() if result is None],
        "failure_rate": rate,
        "cost_vs_list_price": (
            cost["per_job_usd"] / nominal - 1 if cost["per_job_usd"] and nominal else None
        ),
    }


# -- rendering -----------------------------------------------------------------------------


def money(usd: float | None, places: int = 2) -> str:
    return "-" if usd is None else f"${usd:,.{places}f}"


def percent(fraction: float | None) -> str:
    return "-" if fraction is None else f"{fraction * 100:.1f}%"


def share(part: int, whole: int) -> str:
    return f"{percent(part / whole if whole else None)} ({part:,}/{whole:,})"


def seconds(value: float) -> str:
    return f"{value:,.1f}s" if value < 600 else f"{value:,.0f}s ({format_duration(value)})"


def into_run(offset: float) -> str:
    hours, rest = divmod(int(offset), 3600)
    return f"{hours}h{rest // 60:02d}m"


def counts(items: dict[str, int]) -> str:
    return ", ".join(f"{name} {n:,}" for name, n in items.items()) or "none"


def table(headers: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def traffic(plan: dict[str, Any]) -> str:
    scenario = plan["scenario"]
    shape = (
        f"in sittings of {scenario['burst']:g} books on average"
        if scenario["burst"] > 1
        else "steady"
    )
    if scenario["rush"]:
        shape += f", {percent(scenario['rush'])} of them in a rush mid-hour"
    return (
        f"{scenario['name']}: {plan['users']:,} users, {plan['jobs_per_hour']:,} books an hour "
        f"{shape}; {scenario['max_concurrent_jobs']} jobs at once"
    )


def render_markdown(
    record: dict[str, Any], figures: dict[str, Any], charts: list[str], charts_note: str | None
) -> str:
    plan, job = record["plan"], figures["jobs"]
    started = datetime.fromtimestamp(record["started_at"], UTC)
    finishing = record["ended_at"] - record["started_at"] - plan["hours"] * HOUR
    clock = "fast mode: virtual time" if plan["speed"] is None else f"{plan['speed']:g}x"
    faults = [
        f"image failure rate {percent(plan['image_failure_rate'])}",
        f"terminal failures {percent(plan['terminal_failure_rate'])}",
        f"{plan['inject_stuck']} stuck jobs injected",
    ]
    if figures["crash"]:
        faults.append(f"crash at {into_run(figures['crash']['at'])}")
    lines = [
        "# Load Test Report",
        "",
        f"**Test ID**: `{record['test_id']}`  ",
        f"**Date**: {started:%Y-%m-%d} (simulated time from {started:%H:%M} UTC)  ",
        f"**Scenario**: {traffic(plan)}  ",
        f"**Simulated Duration**: {plan['hours']:g} hours of arrivals "
        f"({record['submitted']:,} submitted, {job['total']:,} accepted), then "
        f"{format_duration(max(finishing, 0))} for the jobs still running  ",
        f"**Actual Runtime**: {record['runtime_seconds']:.1f} s ({clock})  ",
        f"**Faults**: {', '.join(faults)}",
        "",
        "Every figure comes from the daemon's store and ledger after the run; refused "
        "submissions, which never reach the store, from the replies the users got.",
    ]
    if record["interrupted"]:
        lines += ["", "**The run was stopped before its end; the figures cover what ran.**"]
    lines += ["", "## Executive Summary", "", *_summary_table(figures)]
    sections = [
        ("Job Statistics", _job_section(figures)),
        ("Duration Statistics", _duration_section(figures["durations"])),
        ("Retry Statistics", _retry_section(figures["retries"])),
        ("Stuck Job Recovery", _stuck_section(figures["stuck"])),
    ]
    if figures["crash"]:
        sections.append(("Crash Recovery", _crash_section(figures["crash"])))
    sections += [
        ("API Call Statistics", _api_section(figures)),
        ("Cost Analysis", _cost_section(figures)),
        ("Guardrails", _guardrail_section(figures)),
        ("Recommendations", _recommendation_section(figures["recommendations"])),
        ("Charts", [f"![{Path(c).stem}]({Path(c).name})" for c in charts] or [charts_note or ""]),
        ("Test Artifacts", _artifact_section(record, figures)),
    ]
    for number, (title, body) in enumerate(sections, 1):
        lines += ["", f"## {number}. {title}", "", *body]
    lines += ["", "## Conclusion", "", *_conclusion_section(figures)]
    return "\n".join(lines).rstrip() + "\n"


def _recommendation_section(found: list[dict[str, Any]]) -> list[str]:
    act = [item for item in found if item["act"]]
    holding = [item for item in found if not item["act"]]
    lines = ["Each derived from this run's figures and the config it ran with.", ""]
    lines += ["### To act on", ""]
    lines += [
        f"{number}. **{item['topic']}**: {item['finding']} {item['advice']}"
        for number, item in enumerate(act, 1)
    ] or ["Nothing: every figure is within its limit."]
    if holding:
        lines += ["", "### Holding", ""]
        lines += [f"- **{item['topic']}**: {item['finding']}" for item in holding]
    return lines


def _and(items: list[str]) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


def _conclusion_section(figures: dict[str, Any]) -> list[str]:
    verdict, job, stuck = figures["conclusion"], figures["jobs"], figures["stuck"]
    cost, projection = figures["cost"], figures["projection"]
    guard = figures["guardrails"]
    if verdict["ready"]:
        headline = "**Ready for production at this load**: every check held."
    else:
        headline = f"**Not ready at this load**: {_and(verdict['failed'])}."
    if verdict["untested"]:
        headline += f" Not tested by this run: {_and(verdict['untested'])}."
    recovery = (
        f"{stuck['recovered']} of {stuck['injected']} stuck jobs recovered"
        if stuck["injected"]
        else "no stuck jobs injected"
    )
    lost = figures["guardrails"]["submitted"] - sum(guard["rejections"].values()) - job["total"]
    difference = verdict["cost_vs_list_price"]
    priced = (
        ""
        if difference is None
        else f", {percent(abs(difference))} {'over' if difference > 0 else 'under'} the list "
        f"price of {money(cost['nominal_per_book']['total'], 4)}"
    )
    opened = {service: entry["opened"] for service, entry in figures["breakers"].items()}
    return [
        headline,
        "",
        f"- **Stability**: {share(job['done'], job['finished'])} of the finished jobs done; "
        f"{recovery}; {lost:,} accepted jobs lost.",
        f"- **Cost**: {money(cost['per_job_usd'], 4)} a job{priced}; "
        f"{money(projection['monthly_usd'])} a month at {projection['books_per_day']:,} "
        "books a day.",
        f"- **Guardrails**: {sum(guard['rejections'].values()):,} submissions refused; spend "
        f"peaked at {percent(guard['budget']['peak_day_share'])} of the daily budget; "
        f"circuits opened: {counts(opened)}.",
    ]


def _summary_table(figures: dict[str, Any]) -> list[str]:
    job, cost, stuck = figures["jobs"], figures["cost"], figures["stuck"]
    recovery = (
        share(stuck["recovered"], stuck["injected"]) if stuck["injected"] else "none injected"
    )
    return table(
        ["Metric", "Value"],
        [
            ["**Success rate**", share(job["done"], job["finished"])],
            ["**Average cost per job**", money(cost["per_job_usd"], 4)],
            ["**Total cost**", money(cost["total_usd"])],
            ["**Stuck job recovery rate**", recovery],
        ],
    )


def _job_section(figures: dict[str, Any]) -> list[str]:
    job = figures["jobs"]
    lines = [
        f"- **Total jobs**: {job['total']:,}",
        f"- **Done**: {job['done']:,}: {job['done'] - job['degraded']:,} in full, "
        f"{job['degraded']:,} degraded (placeholder images)",
        f"- **Failed**: {job['failed']:,}",
    ]
    if job["canceled"]:
        lines.append(f"- **Canceled**: {job['canceled']:,}")
    if job["unfinished"]:
        lines.append(
            f"- **Not finished at the end**: {job['unfinished']:,} "
            f"({counts(job['unfinished_by_reason'])})"
        )
    lines += ["", "### Per hour (jobs by the hour they were submitted)", ""]
    lines += table(
        ["Hour", "Refused", "Accepted", "Done", "Failed", "Unfinished", "Success rate", "Cost"],
        [
            [
                str(hour["hour"]),
                f"{hour['refused']:,}",
                f"{hour['submitted']:,}",
                f"{hour['done']:,}",
                f"{hour['failed']:,}",
                f"{hour['unfinished']:,}",
                percent(hour["success_rate"]),
                money(hour["usd"]),
            ]
            for hour in figures["hours"]
        ],
    )
    lines += ["", "### Failure causes", ""]
    if not figures["failures"]:
        return [*lines, "No job failed."]
    return lines + table(
        ["Code", "Jobs", "Share of jobs"],
        [
            [f"`{cause['code']}`", f"{cause['jobs']:,}", percent(cause["share"])]
            for cause in figures["failures"]
        ],
    )


DURATION_ROWS = {
    "avg": "Average",
    "min": "Minimum",
    "max": "Maximum",
    "p50": "P50",
    "p95": "P95",
    "p99": "P99",
}


def _duration_section(durations: dict[str, Any]) -> list[str]:
    turnaround, last = durations["turnaround"], durations["last_attempt"]
    if turnaround is None:
        return ["No job finished."]
    lines = table(
        [
            "Metric",
            "Submit to done (real-time equivalent)",
            f"At a {FAST_MODE}x fast mode",
            "Last attempt alone",
        ],
        [
            [
                label,
                seconds(turnaround[key]),
                f"{turnaround[key] / FAST_MODE:.2f}s",
                seconds(last[key]),
            ]
            for key, label in DURATION_ROWS.items()
        ],
    )
    return [
        *lines,
        "",
        f"> Over the {durations['jobs']:,} done jobs. The daemon times jobs on trio's clock, "
        "whose seconds are the simulated providers' real seconds, so these are the real-time "
        f"figures; a test timed at {FAST_MODE}x would multiply its own by {FAST_MODE}.",
    ]


def _retry_section(retries: dict[str, Any]) -> list[str]:
    return [
        "Two kinds of retry: a **job retry** runs the whole job again after its kind's backoff "
        "(another attempt); a **provider call retry** is `ctx.call` trying one failed call "
        "again after the service's `retries` wait, inside the same attempt.",
        "",
        *table(
            ["Metric", "Value"],
            [
                ["Job retries (attempts after the first)", f"{retries['job_retries']:,}"],
                ["Avg job retries per job", f"{retries['per_job']:.2f}"],
                ["Max job retries of one job", f"{retries['max_per_job']:,}"],
                [
                    "Provider call retries (a failed call tried again)",
                    f"{retries['call_retries_total']:,}",
                ],
                [
                    "Provider calls given up (their last try failed)",
                    f"{retries['calls_given_up_total']:,}",
                ],
                ["Failed provider calls (tries that failed)", f"{retries['failed_calls_total']:,}"],
            ],
        ),
        "",
        f"Job retries by cause: {counts(retries['causes'])}. "
        f"Provider call retries by service: {counts(retries['call_retries'])}; "
        f"given up: {counts(retries['calls_given_up'])}.",
    ]


def _stuck_section(stuck: dict[str, Any]) -> list[str]:
    lines = []
    if not stuck["injected"]:
        lines.append("No stuck jobs were injected (`--inject-stuck 0`; the default is 3).")
    else:
        when = ", ".join(into_run(at) for at in stuck["detected_at"]) or "-"
        lines += table(
            ["Metric", "Value"],
            [
                [
                    "Stuck jobs injected",
                    f"{stuck['injected']}"
                    + (f" ({stuck['refused']} more refused)" if stuck["refused"] else ""),
                ],
                [
                    "Detected by the monitor",
                    f"{stuck['detected']} (by rule: {counts(stuck['by_rule'])})",
                ],
                ["Recovered", f"{stuck['recovered']}"],
                ["Recovery rate", f"**{percent(stuck['recovery_rate'])}**"],
            ],
        )
        lines += [
            "",
            "Each injected job wedged its first attempt once its story was written: no "
            f"progress, no heartbeat. Detected at {when} into the run. Where they ended: "
            f"{counts(stuck['outcomes'])}; a recovered book resumes from its checkpoint, "
            "so its LLM steps are not paid for twice.",
        ]
    if stuck["others_detected"]:
        lines += ["", f"Other jobs the monitor found stuck: {counts(stuck['others_detected'])}."]
    return lines


def _crash_section(crash: dict[str, Any]) -> list[str]:
    return [
        f"At {into_run(crash['at'])} the supervisor was stopped without a drain, leaving only "
        "what was committed (as `kill -9` would), and a new one started on the same database.",
        "",
        *table(
            ["Metric", "Value"],
            [
                [
                    "Jobs running at the crash, put back from the store",
                    f"{crash['running_at_crash']}",
                ],
                ["Where they ended", counts(crash["outcomes"])],
                ["Failed CRASH_LOOP", f"{crash['crash_loop']}"],
                ["Accepted jobs in the store", f"{crash['in_store']:,} of {crash['accepted']:,}"],
            ],
        ),
    ]


def _api_section(figures: dict[str, Any]) -> list[str]:
    services = figures["services"]
    rows = [
        [
            service["service"],
            f"{service['calls']:,}",
            f"{service['failed']:,}",
            "-"
            if service["unit_price_usd"] is None
            else f"${service['unit_price_usd']:g}/{service['unit']}",
            money(service["usd"]),
        ]
        for service in services
    ]
    rows.append(
        [
            "**Total**",
            f"{sum(service['calls'] for service in services):,}",
            f"{sum(service['failed'] for service in services):,}",
            "-",
            f"**{money(figures['cost']['total_usd'])}**",
        ]
    )
    return [
        *table(["Service", "Calls", "Failed", "Unit price", "Cost"], rows),
        "",
        "A failed call is not billed. A book of 8 pages calls the LLM 4 times (moderation, "
        "story, character, prompts), the image provider 9 times (cover and pages) and "
        "storage once; retries add calls, placeholders save them.",
    ]


def _cost_section(figures: dict[str, Any]) -> list[str]:
    cost, projection = figures["cost"], figures["projection"]
    nominal, measured = cost["nominal_per_book"], cost["measured_per_job"]
    labels = {"llm": "LLM (4 calls)", "image": "Images (9)", "storage": "Storage (1)"}
    rows = [
        [labels[service], money(nominal.get(service), 5), money(measured.get(service), 5)]
        for service in CALLS_PER_BOOK
    ]
    rows.append(
        [
            "**Total/Book**",
            f"**{money(nominal['total'], 4)}**",
            f"**{money(cost['per_job_usd'], 4)}**",
        ]
    )
    lines = [
        "### Per-book cost breakdown",
        "",
        *table(["Item", "At list prices", "Measured per job"], rows),
        "",
        f"Measured over the {cost['jobs_with_cost']:,} jobs that made a paid call, as "
        "`jobwarden ledger` counts cost per job.",
        "",
        f"### Monthly projection ({projection['books_per_day']:,} books/day)",
        "",
    ]
    if projection["daily_usd"] is None:
        return [*lines, "No job was charged, so there is nothing to project."]
    lines += table(
        ["Item", "Daily", "Monthly"],
        [
            ["Books", f"{projection['books_per_day']:,}", f"{projection['books_per_month']:,}"],
            ["Cost", money(projection["daily_usd"]), money(projection["monthly_usd"])],
        ],
    )
    if projection["books_within_budget"] is not None:
        lines += [
            "",
            f"The daily budget of {money(projection['daily_budget_usd'])} pays for "
            f"{projection['books_within_budget']:,} books a day at this cost.",
        ]
    return lines


def _guardrail_section(figures: dict[str, Any]) -> list[str]:
    guard, job = figures["guardrails"], figures["jobs"]
    budget, submitted = guard["budget"], guard["submitted"]
    lines = ["### Submissions refused, by code", ""]
    if guard["rejections"]:
        lines += table(
            ["Code", "Refused", "Share of submissions"],
            [
                [f"`{code}`", f"{n:,}", percent(n / submitted if submitted else None)]
                for code, n in guard["rejections"].items()
            ],
        )
    else:
        lines.append(f"None: all {submitted:,} submissions were accepted.")
    stopped = budget["stopped_at_end"]
    if stopped is None:
        state = "not asked (the run was stopped early)"
    else:
        state = f"stopped: {budget['stop_reason']}" if stopped else "spending"
    lines += [
        "",
        "### Budget",
        "",
        f"- Daily limit {money(budget['daily_usd'])}. The busiest day "
        f"({budget['peak_day'] or '-'}) spent {money(budget['peak_day_usd'])} "
        f"({percent(budget['peak_day_share'])}).",
        f"- The ledger at the end of the run: {state}.",
        f"- Jobs sent back to wait for budget (BUDGET_WAIT): {budget['jobs_held_for_budget']:,}.",
        "",
        "### Circuit breakers",
        "",
    ]
    if figures["breakers"]:
        lines += table(
            ["Service", "Opened", "Half-open", "Closed again", "Time open"],
            [
                [
                    service,
                    f"{entry['opened']:,}",
                    f"{entry['half_open']:,}",
                    f"{entry['closed']:,}",
                    seconds(entry["open_seconds"]),
                ]
                for service, entry in figures["breakers"].items()
            ],
        )
    else:
        lines.append("No circuit opened.")
    return [
        *lines,
        "",
        "### Degraded jobs and the queue",
        "",
        f"- Books finished with placeholder images while the image circuit was open: "
        f"{job['degraded']:,} ({job['placeholders']:,} placeholders).",
        f"- Deepest queue: {guard['max_queue_depth']:,} jobs waiting; most running at once: "
        f"{guard['max_running']:,}.",
    ]


def _artifact_section(record: dict[str, Any], figures: dict[str, Any]) -> list[str]:
    test_id = record["test_id"]
    config_name = Path(record["config_path"]).name
    files = {
        f"{test_id}_full.json": "every figure, and the run's parameters",
        f"{test_id}_summary.txt": "the summary",
        f"{test_id}_intermediate.json": "rewritten every simulated minute during the run",
        f"{test_id}_report.md": "this report",
        f"{test_id}.db": "the daemon's database",
        config_name: "the config the daemon ran with",
        f"{test_id}.log": "the daemon's log, JSON lines",
    }
    width = max(len(name) for name in files)
    lines = ["```", *(f"{name.ljust(width)}  # {what}" for name, what in files.items()), "```"]
    days = figures["ledger_days"]
    lines += [
        "",
        "The daemon gives the same totals (the loadtest left every kind paused, so nothing "
        "left in the queue runs):",
        "",
        "```bash",
        f"jobwarden serve --config {config_name} &",
        *(f"jobwarden ledger --config {config_name} --day {day['period']}" for day in days),
        "```",
        "",
        *(
            f"- {day['period']}: {money(day['usd'], 4)} for {day['calls']:,} calls "
            f"({day['failed_calls']:,} failed) over {day['jobs']:,} jobs"
            for day in days
        ),
    ]
    return [*lines, "", "Run again with:", "", "```bash", reproduce_command(record["plan"]), "```"]


def reproduce_command(plan: dict[str, Any]) -> str:
    options = []
    if plan["scenario"]["option"]:
        options.append(f"--scenario {plan['scenario']['option']}")
    options += [
        f"--hours {plan['hours']:g}",
        f"--jobs-per-hour {plan['jobs_per_hour']}",
        f"--users {plan['users']}",
        "--fast" if plan["speed"] is None else f"--speed {plan['speed']:g}",
        f"--image-failure-rate {plan['image_failure_rate']:g}",
    ]
    options.append(f"--inject-stuck {plan['inject_stuck']}")
    if plan["inject_crash"]:
        options.append("--inject-crash")
    options.append(f"--seed {plan['seed']}")
    return f"jobwarden loadtest {' '.join(options)}"


def render_summary(record: dict[str, Any], figures: dict[str, Any]) -> str:
    job, cost, stuck = figures["jobs"], figures["cost"], figures["stuck"]
    retries, verdict = figures["retries"], figures["conclusion"]
    durations = figures["durations"]["turnaround"]
    lines = [
        f"{record['test_id']}: {record['plan']['hours']:g} simulated hours of "
        f"{record['plan']['scenario']['name']} in {record['runtime_seconds']:.1f} s",
        f"jobs          {job['total']:,} accepted of {record['submitted']:,} submitted; "
        f"{job['done'] - job['degraded']:,} done in full, {job['degraded']:,} degraded, "
        f"{job['failed']:,} failed, "
        f"{job['unfinished']:,} unfinished",
        f"success rate  {share(job['done'], job['finished'])}",
        f"cost          {money(cost['total_usd'])} total, {money(cost['per_job_usd'], 4)} per job",
        "duration      "
        + (
            f"p50 {seconds(durations['p50'])}, p95 {seconds(durations['p95'])}, "
            f"p99 {seconds(durations['p99'])} from submit to done"
            if durations
            else "-"
        ),
        f"failures      {counts({f['code']: f['jobs'] for f in figures['failures']})}",
        f"retries       {retries['job_retries']:,} job retries; "
        f"{retries['call_retries_total']:,} provider call retries, "
        f"{retries['calls_given_up_total']:,} calls given up",
        "stuck         "
        + (
            f"{stuck['recovered']}/{stuck['injected']} recovered"
            if stuck["injected"]
            else "none injected"
        ),
        f"refused       {counts(figures['guardrails']['rejections'])}",
        "breakers      opened: "
        + counts({service: entry["opened"] for service, entry in figures["breakers"].items()}),
    ]
    lines.append(
        "verdict       "
        + (
            "ready at this load"
            if verdict["ready"]
            else f"not ready: {', '.join(verdict['failed'])}"
        )
        + (f" (untested: {', '.join(verdict['untested'])})" if verdict["untested"] else "")
    )
    if record["interrupted"]:
        lines.insert(1, "stopped early from outside: the figures cover what ran")
    if figures["crash"]:
        crash = figures["crash"]
        lines.append(
            f"crash         {crash['running_at_crash']} running jobs put back from the store; "
            f"{crash['in_store']:,} of {crash['accepted']:,} accepted jobs in it"
        )
    return "\n".join(lines) + "\n"


# Throughput is drawn in bins of this many minutes: per minute, a run of hours is noise.
BIN_MINUTES = 5
# The budget is drawn beside the spend only once the spend comes this near it; further off,
# the line would squash the spend flat against the axis.
NEAR_BUDGET = 0.5


def throughput_bins(series: dict[str, Any], minutes: int = BIN_MINUTES) -> dict[str, list]:
    """The per-minute series in bins of `minutes`: jobs done and failed in each, the deepest
    queue and the most jobs running within it, and when it ends, in simulated hours."""

    def binned(values: list[int], combine: Any) -> list[int]:
        return [
            combine(values[start : start + minutes]) for start in range(0, len(values), minutes)
        ]

    return {
        "ends_at_hours": [
            min(start + minutes, series["minutes"]) / 60
            for start in range(0, series["minutes"], minutes)
        ],
        "done": binned(series["done"], sum),
        "failed": binned(series["failed"], sum),
        "queued": binned(series["queued"], max),
        "running": binned(series["running"], max),
    }


def budget_line(series: dict[str, Any]) -> float | None:
    """The daily budget, when the day's spend came near enough to it to draw both at once."""
    budget = series["daily_budget_usd"]
    peak = max(series["spend_today_usd"], default=0.0)
    return budget if budget and peak >= NEAR_BUDGET * budget else None


def draw_charts(figures: dict[str, Any], prefix: Path) -> list[Path]:
    """Two PNGs; raises ModuleNotFoundError when matplotlib (the `report` extra) is absent."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = figures["series"]
    bins = throughput_bins(series)
    width = BIN_MINUTES / 60
    starts = [end - width for end in bins["ends_at_hours"]]
    throughput = Path(f"{prefix}_throughput.png")
    figure, finished = plt.subplots(figsize=(10, 4.5))
    # A gap between bars, so that each bin reads as one.
    bar = {"width": width * 0.85, "align": "edge"}
    finished.bar(starts, bins["done"], color="tab:green", label="done", **bar)
    finished.bar(
        starts, bins["failed"], bottom=bins["done"], color="tab:red", label="failed", **bar
    )
    finished.set_xlabel("simulated hours")
    finished.set_ylabel(f"jobs finished per {BIN_MINUTES} minutes")
    depth = finished.twinx()
    depth.step(
        bins["ends_at_hours"], bins["queued"], where="pre", color="tab:blue", label="deepest queue"
    )
    depth.step(
        bins["ends_at_hours"], bins["running"], where="pre", color="black", label="most running"
    )
    depth.set_ylabel("jobs queued or running")
    depth.set_ylim(bottom=0)
    bars, lines = finished.get_legend_handles_labels(), depth.get_legend_handles_labels()
    # Below the plot, where it hides no bar.
    finished.legend(
        bars[0] + lines[0],
        bars[1] + lines[1],
        loc="upper center",
        bbox_to_anchor=(0.5, -0.15),
        ncol=4,
        frameon=False,
    )
    finished.set_title(f"Jobs finished, and the queue, per {BIN_MINUTES} simulated minutes")
    figure.tight_layout()
    figure.savefig(throughput, dpi=100)
    plt.close(figure)

    spend = Path(f"{prefix}_spend.png")
    hours = [(minute + 1) / 60 for minute in range(series["minutes"])]
    figure, axes = plt.subplots(figsize=(10, 4.5))
    axes.plot(hours, series["spend_today_usd"], color="tab:purple", label="spent today")
    limit = budget_line(series)
    if limit is not None:
        axes.axhline(limit, color="tab:red", linestyle="--", label="daily budget")
        axes.set_title("Spend over the budget day, against the daily budget")
    else:
        peak = max(series["spend_today_usd"], default=0.0)
        far = (
            f" ({percent(peak / series['daily_budget_usd'])} of the daily budget)"
            if (series["daily_budget_usd"])
            else ""
        )
        axes.set_title(f"Spend over the budget day: peak {money(peak)}{far}")
    axes.set_xlabel("simulated hours")
    axes.set_ylabel("USD spent today")
    axes.set_ylim(bottom=0)
    axes.legend(loc="upper left")
    figure.tight_layout()
    figure.savefig(spend, dpi=100)
    plt.close(figure)
    return [throughput, spend]


def charts_missing_note() -> str:
    return f"Charts skipped: matplotlib is not installed (`{CHARTS_EXTRA}`)."
