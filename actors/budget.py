"""The budget's decisions, as plain code over explicit times: its days and months in one time
zone, which limit a spend would cross or has reached, and the month's projection (the ledger
actor keeps the totals and applies them).
"""

from __future__ import annotations

import calendar
import math
from datetime import datetime, timedelta
from typing import Literal
from zoneinfo import ZoneInfo

import msgspec

# Money is compared with this slack so float sums like 10 x 0.024 still fit 0.24.
EPSILON = 1e-9


def is_units(value: object) -> bool:
    """A count of units the ledger can price: a finite number, not below zero. Anything else
    (NaN, a negative count, a string) would make the spend a figure no limit can hold."""
    return isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value < math.inf


class Limits(msgspec.Struct):
    """The daily and monthly limits in USD; 0 is no limit."""

    daily_usd: float
    monthly_usd: float


class BudgetCalendar:
    """Budget days and months: midnight and the first of the month in one time zone."""

    def __init__(self, timezone: str) -> None:
        self.zone = ZoneInfo(timezone)

    def day(self, at: float) -> str:
        return datetime.fromtimestamp(at, self.zone).date().isoformat()

    def month(self, at: float) -> str:
        return self.day(at)[:7]

    def next_day(self, at: float) -> float:
        local = datetime.fromtimestamp(at, self.zone)
        midnight = datetime.combine(local.date() + timedelta(days=1), datetime.min.time())
        return midnight.replace(tzinfo=self.zone).timestamp()

    def next_month(self, at: float) -> float:
        local = datetime.fromtimestamp(at, self.zone)
        year, month = (local.year + 1, 1) if local.month == 12 else (local.year, local.month + 1)
        return datetime(year, month, 1, tzinfo=self.zone).timestamp()

    def month_progress(self, at: float) -> tuple[float, int]:
        """Days elapsed in the month (fractional) and the month's length in days."""
        local = datetime.fromtimestamp(at, self.zone)
        days = calendar.monthrange(local.year, local.month)[1]
        start = datetime(local.year, local.month, 1, tzinfo=self.zone).timestamp()
        return (at - start) / 86400, days


def over_limit(
    limits: Limits,
    days: BudgetCalendar,
    *,
    spent_day: float,
    spent_month: float,
    committed: float,
    now: float,
) -> tuple[Literal["daily", "monthly"], float] | None:
    """Which limit the spend so far plus `committed` would pass, and when that limit resets."""
    return _first_above(
        limits, days, spent_day + committed, spent_month + committed, now, slack=EPSILON
    )


def limit_reached(
    limits: Limits, days: BudgetCalendar, *, spent_day: float, spent_month: float, now: float
) -> tuple[Literal["daily", "monthly"], float] | None:
    """Which limit the spend so far has reached or passed (no priced call fits under it any
    more), and when that limit resets."""
    return _first_above(limits, days, spent_day, spent_month, now, slack=-EPSILON)


def _first_above(
    limits: Limits, days: BudgetCalendar, day: float, month: float, now: float, *, slack: float
) -> tuple[Literal["daily", "monthly"], float] | None:
    daily, monthly = limits.daily_usd, limits.monthly_usd
    if daily and day > daily + slack:
        return "daily", days.next_day(now)
    if monthly and month > monthly + slack:
        return "monthly", days.next_month(now)
    return None


def month_projection(days: BudgetCalendar, spent_month: float, now: float) -> float:
    """The month's spend if it goes on at its pace so far (counted from at least an hour)."""
    elapsed, length = days.month_progress(now)
    return round(spent_month / max(elapsed, 1 / 24) * length, 2)
