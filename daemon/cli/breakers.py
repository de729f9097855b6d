"""Breakers: each external service's circuit breaker, shown, reset or tripped."""

from __future__ import annotations

import argparse
from typing import Any

from jobwarden.cli.arguments import Subcommands, subcommand
from jobwarden.cli.connection import call
from jobwarden.cli.output import clock, print_reply, print_table


def add_commands(commands: Subcommands) -> None:
    subcommand(commands, "breakers", _breakers, "show each external service's circuit breaker")
    breaker = subcommand(
        commands, "breaker", _breaker, "reset (close) or trip (open) a service's breaker"
    )
    breaker.add_argument("action", choices=["reset", "trip"], metavar="{reset,trip}")
    breaker.add_argument("service", metavar="SERVICE")


def _breakers(args: argparse.Namespace) -> int:
    return print_reply(args, call(args, "breakers"), _print_breakers)


def _print_breakers(breakers: dict[str, dict[str, Any]]) -> None:
    if not breakers:
        print("no services configured")
        return
    rows = [
        [
            service,
            _state(view["state"]),
            clock(view["open_until"]) if _is_open(view) else "-",
            f"{view['calls']:,}",
            f"{view['failures']:,}",
            f"{view['opened']:,}",
            f"{view['in_flight']:,}",
        ]
        for service, view in breakers.items()
    ]
    print_table(
        ["SERVICE", "STATE", "OPEN UNTIL", "CALLS", "FAILURES", "OPENED", "IN FLIGHT"], rows
    )


def _breaker(args: argparse.Namespace) -> int:
    data = call(args, "breaker", service=args.service, action=args.action)
    return print_reply(args, data, _print_changed)


def _print_changed(breakers: dict[str, dict[str, Any]]) -> None:
    for service, view in breakers.items():
        print(f"breaker {service}: {_breaker_text(view)}")


def breakers_text(breakers: dict[str, dict[str, Any]]) -> str:
    """Every breaker on one line, for the daemon's status."""
    return ", ".join(f"{name} {_breaker_text(view)}" for name, view in breakers.items()) or "none"


def _breaker_text(view: dict[str, Any]) -> str:
    if _is_open(view):
        return f"open until {clock(view['open_until'])}"
    return _state(view["state"])


def _is_open(view: dict[str, Any]) -> bool:
    return view["state"] == "open" and view.get("open_until") is not None


def _state(state: str) -> str:
    return state.replace("_", "-")
