"""The store: `store copy` moves an SQLite database's history into PostgreSQL."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from jobwarden.cli.arguments import Subcommands, subcommand
from jobwarden.cli.output import print_reply
from jobwarden.config import find_config, is_database_url, load_config, redacted_url
from jobwarden.errors import ConfigError


def add_commands(commands: Subcommands) -> None:
    store = subcommand(
        commands,
        "store",
        _store,
        "copy an SQLite database (jobs with their events, users, ledger, breakers, settings) "
        "into an empty PostgreSQL schema",
        config="the config whose [store] path is copied (default: $JOBWARDEN_CONFIG, "
        "./config.toml, /etc/jobwarden/config.toml)",
    )
    store.add_argument("action", choices=["copy"], metavar="copy")
    store.add_argument(
        "--to", required=True, metavar="URL", help="the PostgreSQL database: postgresql://..."
    )
    store.add_argument(
        "--from",
        dest="source",
        metavar="PATH",
        help="the SQLite database to copy (default: the config's [store] path)",
    )


def _store(args: argparse.Namespace) -> int:
    # Imported here: the driver is needed by this command alone.
    from jobwarden.store.copying import copy_to_postgres

    if not is_database_url(args.to):
        raise ConfigError(
            f"--to: expected a postgresql:// or postgres:// URL, got '{redacted_url(args.to)}'"
        )
    source = Path(args.source) if args.source else _configured_file(args)
    copied = copy_to_postgres(source, args.to)
    done = {"from": str(source), "to": redacted_url(args.to), "rows": copied}
    return print_reply(args, done, _print_copied)


def _configured_file(args: argparse.Namespace) -> Path:
    config = load_config(find_config(args.config))
    if config.store.url:
        raise ConfigError("the config's store is PostgreSQL already; name the SQLite file: --from")
    return config.path(config.store.path)


def _print_copied(done: dict[str, Any]) -> None:
    rows = ", ".join(f"{count:,} {table}" for table, count in done["rows"].items())
    print(f"copied {done['from']} to {done['to']}: {rows}")
    print("point [store] url at it and start jobwarden serve")
