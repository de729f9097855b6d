"""The daemon itself: init (write the default config), check-config, serve, status, drain,
shutdown."""

from __future__ import annotations

import argparse
import importlib.resources
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
from jobwarden.config import Overrides, check_handlers, find_config, load_config
from jobwarden.errors import ConfigError
from jobwarden.wire.views import STATUSES

DRAIN_POLL_SECONDS = 0.2


def add_commands(commands: Subcommands) -> None:
    init = subcommand(
        commands, "init", _init, "write the default config.toml, to serve from that directory"
    )
    init.add_argument(
        "directory", nargs="?", default=".", metavar="DIR", help="where (default: here)"
    )
    init.add_argument("--force", action="store_true", help="replace a config.toml already there")
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


def default_config_text() -> str:
    """The embedded default config: the repository's config.toml, shipped inside the package."""
    return importlib.resources.files("jobwarden").joinpath("config.toml").read_text("utf-8")


def _init(args: argparse.Namespace) -> int:
    directory = Path(args.directory)
    path = directory / "config.toml"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        # "x" refuses an existing file in the same step that creates a new one.
        with path.open("w" if args.force else "x", encoding="utf-8") as file:
            file.write(default_config_text())
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
        "websocket": config.websocket.listen or None,
        "http": config.http.listen or None,
    }
    return print_reply(args, written, _print_next_steps)


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


def _check_config(args: argparse.Namespace) -> int:
    path = Path(args.path) if args.path else find_config(args.config)
    config = load_config(path)
    try:
        check_handlers(config)
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
