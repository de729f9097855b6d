"""The daemon itself: init (write the default config, or the production one for systemd),
check-config, serve, status, drain, shutdown, backup."""

from __future__ import annotations

import argparse
import importlib.resources
import json
import os
import re
import time
from pathlib import Path
from typing import Any

from jobwarden.cli.arguments import Subcommands, listen_address, subcommand
from jobwarden.cli.breakers import breakers_text
from jobwarden.cli.connection import call, client
from jobwarden.cli.costs import budget_summary
from jobwarden.cli.kinds import paused_text
from jobwarden.cli.output import EXIT_OK, paint, print_fields, print_reply, span, when
from jobwarden.client import AdminClient, DaemonUnreachable
from jobwarden.config import SYSTEM_CONFIG, Overrides, check_handlers, find_config, load_config
from jobwarden.errors import ConfigError
from jobwarden.store.sqlite import DatabaseError, copy_database
from jobwarden.wire.views import STATUSES

DRAIN_POLL_SECONDS = 0.2

# What `init --system` changes in the default config, to match systemd/jobwarden.service: the
# database in its StateDirectory=, the admin socket in its RuntimeDirectory=, open to the
# unit's group, which operators join. Everything else, comments included, is the default.
SYSTEM_SETTINGS: dict[tuple[str, str], str] = {
    ("store", "path"): "/var/lib/jobwarden/jobwarden.db",
    ("admin", "socket"): "/run/jobwarden/admin.sock",
    ("admin", "group"): "jobwarden",
}
SYSTEM_TITLE = (
    "# jobwarden under systemd (systemd/jobwarden.service), written by `jobwarden init --system`."
)
_TABLE = re.compile(r"\[(?P<name>[\w.-]+)\]")
_ASSIGNMENT = re.compile(
    r'(?P<key>\w+)(?P<equals>\s*=\s*)(?P<value>"[^"]*")(?P<gap>\s*)(?P<rest>.*)'
)


def add_commands(commands: Subcommands) -> None:
    init = subcommand(
        commands, "init", _init, "write the default config.toml, to serve from that directory"
    )
    init.add_argument(
        "directory",
        nargs="?",
        metavar="DIR",
        help=f"where (default: here; with --system, {SYSTEM_CONFIG.parent})",
    )
    init.add_argument("--force", action="store_true", help="replace a config.toml already there")
    init.add_argument(
        "--system",
        action="store_true",
        help="the production config for systemd/jobwarden.service: database in "
        "/var/lib/jobwarden, admin socket in /run/jobwarden for the group jobwarden",
    )
    check = subcommand(
        commands, "check-config", _check_config, "validate a config file and import handlers"
    )
    check.add_argument(
        "path",
        nargs="?",
        metavar="PATH",
        help="the config file (default: --config, then $JOBWARDEN_CONFIG, then ./config.toml, "
        "then /etc/jobwarden/config.toml)",
    )
    serve = subcommand(
        commands,
        "serve",
        _serve,
        "run the daemon in the foreground",
        config="the config to serve (default: $JOBWARDEN_CONFIG, ./config.toml, "
        "/etc/jobwarden/config.toml)",
        socket="the admin socket to serve (overrides admin.socket)",
        json="log JSON lines, whatever log.format says",
    )
    for listener in ("http", "websocket"):
        serve.add_argument(
            f"--{listener}-listen",
            type=listen_address,
            metavar="HOST:PORT",
            help=f'overrides {listener}.listen (port 0: any free port; "": no listener)',
        )
    status = subcommand(commands, "status", _status, "show the daemon's state")
    status.add_argument(
        "--pid",
        action="store_true",
        help='print only the process id of the daemon that answers, e.g. for kill "$(...)"',
    )
    drain = subcommand(
        commands, "drain", _drain, "stop admitting jobs, let running ones finish, then exit"
    )
    drain.add_argument("--wait", action="store_true", help="return once the daemon has exited")
    subcommand(commands, "shutdown", _shutdown, "stop the daemon now; running jobs are interrupted")
    backup = subcommand(
        commands,
        "backup",
        _backup,
        "copy the database, consistent as of now, while the daemon runs (SQLite online backup)",
    )
    backup.add_argument("path", metavar="PATH", help="the copy to write; must not exist yet")


def default_config_text() -> str:
    """The embedded default config: the repository's config.toml, shipped inside the package."""
    return importlib.resources.files("jobwarden").joinpath("config.toml").read_text("utf-8")


def system_config_text() -> str:
    """The default config with the production settings of SYSTEM_SETTINGS, derived from it
    so that the two never drift apart."""
    # The default's first line tells a user to serve from its directory: ours says what it is.
    rest = default_config_text().partition("\n")[2]
    table = ""
    lines = [SYSTEM_TITLE]
    for line in rest.split("\n"):
        header = _TABLE.match(line)
        if header:
            table = header["name"]
        assignment = _ASSIGNMENT.match(line)
        if assignment and (table, assignment["key"]) in SYSTEM_SETTINGS:
            value = json.dumps(SYSTEM_SETTINGS[table, assignment["key"]])
            line = f"{assignment['key']}{assignment['equals']}{value}"
            if assignment["rest"]:
                # The comment keeps its column, as far as the longer value leaves room.
                width = len(assignment.group(0)) - len(assignment["rest"])
                line = f"{line:<{width - 1}} {assignment['rest']}"
        lines.append(line)
    return "\n".join(lines)


def _init(args: argparse.Namespace) -> int:
    default_directory = SYSTEM_CONFIG.parent if args.system else Path(".")
    directory = Path(args.directory) if args.directory else default_directory
    path = directory / "config.toml"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        # "x" refuses an existing file in the same step that creates a new one.
        with path.open("w" if args.force else "x", encoding="utf-8") as file:
            file.write(system_config_text() if args.system else default_config_text())
    except FileExistsError:
        raise ConfigError(
            f"{path} exists already and is left as it is; "
            "pass --force to replace it with the default"
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror}") from None
    config = load_config(path)
    written = {
        "config": str(path.resolve()),
        "directory": str(directory.resolve()),
        "kinds": list(config.kinds),
        "admin_socket": str(config.path(config.admin.socket)),
        "database": str(config.path(config.store.path)),
        "admin_group": config.admin.group or None,
        "websocket": config.websocket.listen or None,
        "http": config.http.listen or None,
    }
    return print_reply(args, written, _print_system_steps if args.system else _print_next_steps)


def _print_next_steps(written: dict[str, Any]) -> None:
    print(f"wrote {written['config']}, the default config (kinds: {', '.join(written['kinds'])})")
    print()
    elsewhere = Path(written["directory"]) != Path.cwd().resolve()
    print(f"next, in {written['directory']}:" if elsewhere else "next, in this directory:")
    for command, why in (
        ("jobwarden check-config", "validate it and import its handlers"),
        ("jobwarden serve", "run the daemon in the foreground; Ctrl-C drains and stops it"),
        ("jobwarden status", "from another terminal, in the same directory"),
    ):
        print(f"  {command:<24}{why}")
    print()
    print_fields(
        [
            ("admin socket", written["admin_socket"]),
            ("database", written["database"]),
            ("websocket", written["websocket"] or "off"),
            ("http", written["http"] or "off"),
        ]
    )


def _print_system_steps(written: dict[str, Any]) -> None:
    print(f"wrote {written['config']}, for systemd/jobwarden.service")
    print()
    print("next, as root (docs/operations.md has the whole install):")
    group = written["admin_group"]
    for command in (
        f"useradd --system --user-group --home-dir /var/lib/jobwarden --shell /usr/sbin/nologin"
        f" {group}",
        f"jobwarden check-config {written['config']}",
        "install -m 0644 systemd/jobwarden.service /etc/systemd/system/",
        "systemctl daemon-reload && systemctl enable --now jobwarden",
    ):
        print(f"  {command}")
    print()
    print_fields(
        [
            ("kinds", ", ".join(written["kinds"])),
            ("database", written["database"]),
            ("admin socket", f"{written['admin_socket']} (group {group})"),
            ("websocket", written["websocket"] or "off"),
            ("http", written["http"] or "off"),
        ]
    )


def _check_config(args: argparse.Namespace) -> int:
    path = Path(args.path) if args.path else find_config(args.config)
    # Imported here so that talking to a daemon never loads the actors.
    from jobwarden.actors.schedules import check_schedules

    config = load_config(path)
    try:
        check_handlers(config)
        check_schedules(config)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    kinds = list(config.kinds)
    names = f" ({', '.join(kinds)})" if kinds else ""
    print(f"ok: {len(kinds)} {'kind' if len(kinds) == 1 else 'kinds'}{names}")
    return EXIT_OK


def _serve(args: argparse.Namespace) -> int:
    # Imported here so that talking to a daemon never loads the daemon itself.
    from jobwarden.process.supervisor import serve_main

    overrides = Overrides(
        # A path typed on the command line is relative to where it was typed.
        admin_socket=str(Path(args.socket).resolve()) if args.socket else None,
        http_listen=args.http_listen,
        websocket_listen=args.websocket_listen,
        log_format="json" if args.json else None,
    )
    return serve_main(find_config(args.config), overrides)


def _status(args: argparse.Namespace) -> int:
    if args.pid:
        # The daemon's own word, not a pid file a crash may have left behind.
        pid = call(args, "ping")["pid"]
        return print_reply(args, {"pid": pid}, lambda data: print(data["pid"]))
    return print_reply(args, call(args, "status"), _print_status)


def _print_status(data: dict[str, Any]) -> None:
    counts = data["jobs"]
    queued = ", ".join(f"{kind} {count}" for kind, count in data["queue_depth"].items())
    if data.get("oldest_queued_seconds") is not None:
        queued += f" (oldest waiting {span(data['oldest_queued_seconds'])})"
    system = data.get("system", {})
    recovered = data.get("stuck", {}).get("recovered", {})
    print_fields(
        [
            (
                "daemon",
                f"jobwarden {data['version']}, pid {data['pid']}, up {span(data['uptime'])}",
            ),
            ("state", _state_text(data)),
            # Older daemons do not report nodes; their line is left out.
            ("nodes", _nodes_text(data) if "nodes" in data else None),
            # Older daemons do not report the store's health; their line is left out.
            ("store", _store_text(data["store"]) if "store" in data else None),
            ("running", f"{data['running']} of {data['max_concurrent_jobs']} slots"),
            (
                "jobs",
                ", ".join(f"{paint(status)} {counts.get(status, 0)}" for status in STATUSES),
            ),
            ("queued", queued.strip() or "none"),
            ("paused", paused_text(data["paused"], data["paused_all"])),
            (
                "recovered",
                ", ".join(f"{rule} {n}" for rule, n in recovered.items()) or "none",
            ),
            # Older daemons report neither breakers nor budget; their lines are left out.
            ("breakers", breakers_text(data["breakers"]) if "breakers" in data else None),
            ("budget", budget_summary(data["budget"]) if data.get("budget") else None),
            (
                "system",
                f"memory {system.get('memory_percent', 0):.0f}% "
                f"({system.get('memory_available_gb', 0):.1f} GB free), "
                f"cpu {_cpu_text(system.get('cpu_percent'))}",
            ),
        ]
    )


def _state_text(data: dict[str, Any]) -> str:
    if data["draining"]:
        return "draining"
    if not data.get("store", {"writable": True})["writable"]:
        return "refusing new jobs until the store takes writes again"
    return "accepting jobs"


def _nodes_text(data: dict[str, Any]) -> str:
    """The live daemons sharing the database: id, host and pid, which one answered, and
    which holds the maintenance role."""
    listed = []
    for node in data["nodes"]:
        notes = [
            note
            for note, applies in (
                ("this", node["id"] == data["node"]),
                ("maintenance", node["leader"]),
            )
            if applies
        ]
        text = f"{node['id']} {node['host']} pid {node['pid']}"
        listed.append(f"{text} ({', '.join(notes)})" if notes else text)
    return ", ".join(listed) or "none live"


def _store_text(store: dict[str, Any]) -> str:
    if store["writable"]:
        return "takes writes"
    since = when(store["since"], time.time())
    return f"TAKES NO WRITES since {since} ({store['code']}): {store['message']}"


def _cpu_text(value: float | None) -> str:
    return "n/a (first sample pending)" if value is None else f"{value:.0f}%"


def _drain(args: argparse.Namespace) -> int:
    with client(args) as admin:
        data = admin.call("drain")
    print_reply(args, data, _print_draining)
    if args.wait:
        _wait_until_stopped(admin.path)
        if not args.json:
            print("daemon stopped")
    return EXIT_OK


def _print_draining(data: dict[str, Any]) -> None:
    running = data["running"]
    print(
        f"draining: admitting no jobs; {running} running {'job' if running == 1 else 'jobs'}"
        " may finish, then the daemon exits"
    )


def _wait_until_stopped(socket_path: str) -> None:
    while True:
        try:
            with AdminClient(socket_path) as admin:
                admin.call("ping")
        except DaemonUnreachable as exc:
            if exc.not_running:
                return
            # Otherwise the daemon cut the connection on its way out; it is not gone yet.
        time.sleep(DRAIN_POLL_SECONDS)


def _shutdown(args: argparse.Namespace) -> int:
    return print_reply(args, call(args, "shutdown"), lambda _: print("daemon stopping"))


def _backup(args: argparse.Namespace) -> int:
    config = load_config(find_config(args.config))
    if config.store.url:
        raise ConfigError("backup copies an SQLite database; back a PostgreSQL one up with pg_dump")
    database = config.path(config.store.path)
    target = Path(args.path)
    # A file of our own first, so the copy is never readable by more than its owner, and a
    # name that is taken is refused rather than overwritten.
    try:
        os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        raise ConfigError(f"{target} exists already; name a new file for the copy") from None
    except OSError as exc:
        raise ConfigError(f"cannot write {target}: {exc.strerror}") from None
    try:
        copy_database(database, target)
    except DatabaseError as exc:
        target.unlink()
        raise ConfigError(f"cannot copy {database}: {exc}") from None
    copied = {
        "database": str(database),
        "copy": str(target.resolve()),
        "bytes": target.stat().st_size,
    }
    return print_reply(
        args, copied, lambda _: print(f"copied {database} to {target} ({copied['bytes']:,} bytes)")
    )
