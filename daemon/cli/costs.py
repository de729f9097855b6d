"""Costs: the ledger of what external calls cost, and the budget that limits spending."""

from __future__ import annotations

import argparse
from typing import Any

from jobwarden.cli.arguments import Subcommands, day, month, subcommand, usd
from jobwarden.cli.connection import call
from jobwarden.cli.output import (
    count,
    date_time,
    limit,
    money,
    percent,
    print_fields,
    print_reply,
    print_table,
    units,
)


def add_commands(commands: Subcommands) -> None:
    ledger = subcommand(
        commands, "ledger", _ledger, "show what external calls cost, today by default"
    )
    period = ledger.add_mutually_exclusive_group()
    period.add_argument("--day", type=day, metavar="YYYY-MM-DD", help="one day")
    period.add_argument("--month", type=month, metavar="YYYY-MM", help="one month")
    ledger.add_argument(
        "--by", choices=["service", "user", "kind"], default="service", help="group by (service)"
    )

    budget = subcommand(
        commands, "budget", _budget, "show the spending budget, or set or resume it"
    )
    actions = budget.add_subparsers(dest="action", metavar="ACTION")
    subcommand(actions, "show", _budget, "show the budget (the default)")
    budget_set = subcommand(
        actions,
        "set",
        _budget,
        "change the daily or monthly limit; kept across restarts, over the config",
    )
    budget_set.add_argument("--daily", type=usd, metavar="USD", help="daily limit, 0 for none")
    budget_set.add_argument("--monthly", type=usd, metavar="USD", help="monthly limit, 0 for none")

    def check_budget_set(args: argparse.Namespace) -> None:
        if args.daily is None and args.monthly is None:
            budget_set.error("give --daily USD, --monthly USD or both")

    budget_set.set_defaults(check=check_budget_set)
    subcommand(actions, "resume", _budget, "spend again after a budget stop, for the rest of today")


def _ledger(args: argparse.Namespace) -> int:
    data = call(args, "ledger", day=args.day, month=args.month, by=args.by)
    return print_reply(args, data, _print_ledger)


def _print_ledger(data: dict[str, Any]) -> None:
    if not data["groups"]:
        print(f"no calls in {data['period']}")
        return
    by = data["by"]
    rows = [
        [
            str(group[by]),
            f"{group['calls']:,}",
            f"{group['failed']:,}",
            units(group["units"]),
            money(group["usd"], 4),
        ]
        for group in data["groups"]
    ]
    print_table([by.upper(), "CALLS", "FAILED", "UNITS", "USD"], rows)
    print(
        f"total {money(data['usd'], 4)} for {count(data['calls'], 'call')} "
        f"({data['failed_calls']:,} failed) over {count(data['jobs'], 'job')} "
        f"in {data['period']}"
    )
    if data.get("usd_per_job") is not None:
        print(f"cost per job {money(data['usd_per_job'], 4)}")
    if data.get("overruns"):
        print(
            f"overruns: {count(data['overruns'], 'call')} past their reservations by "
            f"{money(data['overrun_usd'], 4)} (raise the services' max_units)"
        )
    if data.get("month_projection_usd") is not None:
        print(f"month projection {money(data['month_projection_usd'], 2)}")


def _budget(args: argparse.Namespace) -> int:
    if args.action == "set":
        data = call(args, "budget", action="set", daily_usd=args.daily, monthly_usd=args.monthly)
    else:
        data = call(args, "budget", action=args.action or "show")
    return print_reply(args, data, _print_budget)


def _print_budget(data: dict[str, Any]) -> None:
    daily = data["daily_usd"]
    today = _spent_of_limit(data["spent_today"], 4, daily, data["remaining_today"])
    this_month = _spent_of_limit(
        data["spent_month"], 2, data["monthly_usd"], data["remaining_month"]
    )
    this_month += f", projection {money(data['month_projection_usd'], 2)}"
    if data["stopped"]:
        state = f"STOPPED: {data['stop_reason']}" if data.get("stop_reason") else "STOPPED"
        if data.get("stopped_until") is not None:
            state += f", until {date_time(data['stopped_until'])}"
    else:
        state = "spending"
    if data.get("override_today"):
        state += " (override for today)"
    # Alerts fire on the share of the daily limit spent, so without one they never do.
    alerts = ", ".join(percent(at) for at in data.get("alert_at") or []) if daily else ""
    print_fields(
        [
            ("today", today),
            ("month", this_month),
            ("reserved", f"{money(data['reserved'], 4)} held for calls in flight"),
            ("alerts", f"at {alerts} of the daily limit" if alerts else None),
            ("state", state),
        ]
    )


def _spent_of_limit(spent: float, places: int, limit_usd: float, remaining: float) -> str:
    if not limit_usd:
        return f"{money(spent, places)}, no limit"
    share = percent(spent / limit_usd)
    return f"{money(spent, places)} of {limit(limit_usd)} ({share}), {money(remaining, 2)} left"


def budget_summary(budget: dict[str, Any]) -> str:
    """Today's spending on one line, for the daemon's status."""
    text = money(budget["spent_today"], 2)
    text += f" of {limit(budget['daily_usd'])} today" if budget["daily_usd"] else " today"
    return text + (" — STOPPED" if budget["stopped"] else "")
