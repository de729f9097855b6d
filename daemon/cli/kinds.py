"""Kinds: pause and resume starting jobs of a kind, or of every kind."""

from __future__ import annotations

import argparse
from typing import Any

from jobwarden.cli.arguments import Subcommands, subcommand
from jobwarden.cli.connection import call
from jobwarden.cli.output import print_reply


def add_commands(commands: Subcommands) -> None:
    for name, run, summary in (
        ("pause", _pause, "stop starting jobs of KIND, or of every kind"),
        ("resume", _resume, "start jobs of KIND, or of every kind, again"),
    ):
        subcommand(commands, name, run, summary).add_argument("kind", nargs="?", metavar="KIND")


def _pause(args: argparse.Namespace) -> int:
    return print_reply(args, call(args, "pause", kind=args.kind), _print_paused)


def _resume(args: argparse.Namespace) -> int:
    return print_reply(args, call(args, "resume", kind=args.kind), _print_paused)


def _print_paused(data: dict[str, Any]) -> None:
    print(f"paused: {paused_text(data['paused'], data['all'])}")


def paused_text(kinds: list[str], everything: bool) -> str:
    if everything:
        return "every kind"
    return ", ".join(kinds) or "nothing"
