"""How a command reaches the daemon: its admin socket (--socket, or the one the config names),
or, for submit and watch, its WebSocket (--url ws://...) or its HTTP API (--url http://...)
with a user's token."""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from jobwarden.client import AdminClient, Client, WebSocketClient, connect
from jobwarden.config import find_config, load_config

# Where --url looks for the token when --token is not given (a flag shows in `ps`).
ENV_TOKEN = "JOBWARDEN_TOKEN"


def client(args: argparse.Namespace) -> AdminClient:
    if args.socket:
        return AdminClient(args.socket)
    config = load_config(find_config(args.config))
    return AdminClient(config.path(config.admin.socket))


def call(args: argparse.Namespace, cmd: str, **cmd_args: Any) -> Any:
    """One request on the admin socket, and the data of its reply."""
    with client(args) as admin:
        return admin.call(cmd, **cmd_args)


def websocket_options(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--url",
        metavar="URL",
        help="the daemon's WebSocket (ws://127.0.0.1:8765) or HTTP API (http://127.0.0.1:8766),"
        " instead of the admin socket",
    )
    command.add_argument(
        "--token", metavar="TOKEN", help=f"your user token, for --url (default: ${ENV_TOKEN})"
    )

    def check(args: argparse.Namespace) -> None:
        if args.url is None:
            if args.token is not None:
                command.error("--token goes with --url")
            return
        if not re.match(r"(wss?|https?)://[^/]", args.url):
            command.error(
                f"--url: expected ws://HOST:PORT, wss://HOST, http://HOST:PORT or https://HOST,"
                f" got {args.url!r}"
            )
        if getattr(args, "all", False) and over_http(args):
            command.error("--all follows every job over the WebSocket: --url ws://HOST:PORT")
        if getattr(args, "user", None) is not None:
            command.error("--user is for the admin socket; over --url the token says who you are")
        args.token = args.token or os.environ.get(ENV_TOKEN)
        if not args.token:
            command.error(f"--url needs your token: --token TOKEN, or ${ENV_TOKEN}")

    command.set_defaults(check=check)


def over_http(args: argparse.Namespace) -> bool:
    """--url names the HTTP API (rather than the WebSocket)."""
    return args.url is not None and args.url.startswith(("http://", "https://"))


def http_client(args: argparse.Namespace) -> Client:
    return Client(args.url, args.token)


def over_websocket(
    args: argparse.Namespace,
    run: Callable[[WebSocketClient, argparse.Namespace], Awaitable[int]],
) -> int:
    async def session() -> int:
        async with connect(args.url, args.token) as websocket:
            return await run(websocket, args)

    return trio.run(session)
