"""Users: add them, show them, change their credits and limits, disable them, hold their jobs,
renew tokens."""

from __future__ import annotations

import argparse
from typing import Any

from jobwarden.cli.arguments import (
    Subcommands,
    change,
    credits,
    rate,
    subcommand,
    whole_number,
)
from jobwarden.cli.connection import call
from jobwarden.cli.output import print_fields, print_reply, print_table

# The options an action may carry, named as the admin socket's `users` command takes them.
ACTION_OPTIONS = ("credits", "daily_limit", "rate", "max_running", "change")


def add_commands(commands: Subcommands) -> None:
    users = subcommand(commands, "users", _users, "add users, show them, change their limits")
    actions = users.add_subparsers(dest="action", metavar="ACTION")

    def action(name: str, summary: str, *, named: bool = True) -> argparse.ArgumentParser:
        sub = subcommand(actions, name, _users, summary)
        if named:
            sub.add_argument("name", metavar="NAME")
        return sub

    def limit_options(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--credits", type=credits, metavar="N", help='balance, or "unlimited"')
        sub.add_argument(
            "--daily-limit", type=whole_number, metavar="N", help="jobs per day, 0 for no limit"
        )
        sub.add_argument(
            "--rate", type=rate, metavar="N/min", help='submissions per minute, or "off"'
        )
        sub.add_argument(
            "--max-running",
            type=whole_number,
            metavar="N",
            help="jobs running at once, 0 for no limit",
        )

    action("list", "list users (the default)", named=False)
    action("show", "show a user's credits, limits and today's count")
    limit_options(action("add", "add a user and print their token, once"))
    limit_options(action("set", "change a user's credits or limits"))
    action("credits", "add or take credits: +N or -N").add_argument(
        "change", type=change, metavar="+N|-N"
    )
    action("disable", "refuse the user's submissions and token")
    action("enable", "accept the user again")
    action("hold", "hold the user's queued jobs (new ones too): they wait until released")
    action("release", "release the user's held jobs")
    action("token", "make a new token for the user; the old one stops working")


def _users(args: argparse.Namespace) -> int:
    action = args.action or "list"
    options = {key: getattr(args, key, None) for key in ACTION_OPTIONS}
    data = call(
        args,
        "users",
        action=action,
        name=getattr(args, "name", None),
        **{key: value for key, value in options.items() if value is not None},
    )
    return print_reply(args, data, _print_users if action == "list" else _print_user)


def _print_users(data: dict[str, Any]) -> None:
    rows = [_user_row(user) for user in data["users"]]
    if not rows:
        print("no users")
        return
    headers = ["USER", "CREDITS", "SPENT", "TODAY", "DAILY", "RATE", "RUNNING", "STATE"]
    print_table(headers, rows)


def _print_user(data: dict[str, Any]) -> None:
    user = data["user"]
    print_fields(
        [
            ("user", user["name"]),
            ("credits", _credits_text(user)),
            ("spent", str(user["spent"])),
            ("jobs today", str(user.get("jobs_today", 0))),
            ("daily limit", _own_limit(user.get("daily_limit"))),
            ("rate", user.get("rate") or "default"),
            ("max running", _own_limit(user.get("max_running"))),
            ("state", _state(user)),
            ("token", data.get("token") or ("set" if user["has_token"] else "none")),
        ]
    )
    if data.get("token"):
        print("the token is shown only now; the daemon keeps only its hash")


def _credits_text(user: dict[str, Any]) -> str:
    text = "unlimited" if user["credits"] is None else str(user["credits"])
    if user.get("reserved"):
        text += f" ({user['reserved']} reserved by queued and running jobs)"
    return text


def _own_limit(value: int | None) -> str:
    return "default" if value is None else ("none" if value == 0 else str(value))


def _user_row(user: dict[str, Any]) -> list[str]:
    return [
        user["name"],
        "unlimited" if user["credits"] is None else str(user["credits"]),
        str(user["spent"]),
        str(user.get("jobs_today", 0)),
        _own_limit(user.get("daily_limit")),
        user.get("rate") or "default",
        _own_limit(user.get("max_running")),
        _state(user),
    ]


def _state(user: dict[str, Any]) -> str:
    state = "disabled" if user["disabled"] else "enabled"
    return state + (", on hold" if user.get("held") else "")
