"""Operator tokens for the HTTP API: add one (shown once), list them, revoke one."""

from __future__ import annotations

import argparse
from typing import Any

from jobwarden.cli.arguments import Subcommands, subcommand
from jobwarden.cli.connection import call
from jobwarden.cli.output import date_time, print_fields, print_reply, print_table


def add_commands(commands: Subcommands) -> None:
    tokens = subcommand(
        commands, "tokens", _tokens, "operator tokens for the HTTP API: add, list, revoke"
    )
    actions = tokens.add_subparsers(dest="action", metavar="ACTION")
    subcommand(actions, "list", _tokens, "list operator tokens by name (the default)")
    subcommand(actions, "add", _tokens, "make an operator token and print it, once").add_argument(
        "--operator",
        dest="name",
        metavar="NAME",
        required=True,
        help="the name the token is listed and revoked by",
    )
    subcommand(
        actions, "revoke", _tokens, "revoke an operator token: it works no more"
    ).add_argument("name", metavar="NAME")


def _tokens(args: argparse.Namespace) -> int:
    action = args.action or "list"
    data = call(args, "tokens", action=action, name=getattr(args, "name", None))
    show = {"list": _print_tokens, "add": _print_new_token, "revoke": _print_revoked}[action]
    return print_reply(args, data, show)


def _print_tokens(data: dict[str, Any]) -> None:
    if not data["tokens"]:
        print("no operator tokens")
        return
    rows = [[token["name"], date_time(token["created_at"])] for token in data["tokens"]]
    print_table(["NAME", "CREATED"], rows)


def _print_new_token(data: dict[str, Any]) -> None:
    print_fields([("operator", data["token"]["name"]), ("token", data["secret"])])
    print("the token is shown only now; the daemon keeps only its hash")


def _print_revoked(data: dict[str, Any]) -> None:
    print(f"revoked operator token '{data['revoked']}'")
