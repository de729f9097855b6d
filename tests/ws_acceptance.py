"""Acceptance of the WebSocket protocol (issue 6), by a client that shares nothing with the
daemon: the `websockets` library on asyncio, speaking the documented frames.

    python tests/ws_acceptance.py --url ws://127.0.0.1:8765 --token TOKEN \\
        [--kind shell --payload '{"seconds": 0.2}' --drop-after 3]

It checks that a wrong token is refused in the handshake with HTTP 401; submits a job and
watches it; after `--drop-after` events drops the connection without a closing handshake, as a
network failure would; watches again on a new connection (token in the query this time, as a
browser sends it) with `since` = the last seq it saw, until the job's final status; and checks
that what it saw, in order and once each, is the job's whole history as a third connection
replays it from the start. Prints "ok: ..." and exits 0, or says what went wrong and exits 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any
from urllib.parse import quote

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus, WebSocketException

FINAL = {"done", "failed", "canceled"}


class Failed(Exception):
    """The daemon did not behave as the protocol says."""


class Session:
    """One connection: ops answered by id, and the events of one job as they come."""

    def __init__(self, ws: ClientConnection, job: int | None = None) -> None:
        self.ws = ws
        self.job = job
        self.events: list[dict[str, Any]] = []
        self._ids = 0

    async def ask(self, op: str, **fields: Any) -> dict[str, Any]:
        self._ids += 1
        await self.ws.send(json.dumps({"op": op, "id": self._ids, **fields}))
        while True:
            frame = await self._frame()
            if frame.get("id") == self._ids:
                if frame["type"] == "error":
                    raise Failed(f"{op} refused: {frame['error']}")
                return frame

    async def next_event(self) -> dict[str, Any]:
        while not self.events:
            await self._frame()
        return self.events.pop(0)

    async def until_final(self) -> list[dict[str, Any]]:
        seen = []
        while not seen or not is_final(seen[-1]):
            seen.append(await self.next_event())
        return seen

    async def _frame(self) -> dict[str, Any]:
        frame = json.loads(await self.ws.recv())
        if frame["type"] == "resync":
            raise Failed(f"told to resync while reading as fast as possible: {frame}")
        if "seq" in frame and frame["watch"] == self.job:
            self.events.append(frame)
        return frame


def is_final(event: dict[str, Any]) -> bool:
    return event["type"] == "status" and event["data"]["status"] in FINAL


def opened(url: str, token: str | None = None) -> connect:
    headers = {"Authorization": f"Bearer {token}"} if token else None
    # proxy=None: a proxy from the environment has no business with a local daemon.
    return connect(url, additional_headers=headers, proxy=None, compression=None)


async def wrong_token_is_refused(url: str) -> None:
    try:
        async with opened(url, "jw_certainly-not-a-token"):
            raise Failed("a wrong token was let in")
    except InvalidStatus as refused:
        response = refused.response
        body = json.loads(response.body or b"{}")
        if response.status_code != 401 or body.get("code") != "UNAUTHENTICATED":
            raise Failed(f"wrong token: HTTP {response.status_code} {body}, not 401") from None


async def accept(args: argparse.Namespace) -> str:
    await wrong_token_is_refused(args.url)

    async with opened(args.url, args.token) as ws:
        first = Session(ws)
        job = (await first.ask("submit", kind=args.kind, payload=args.payload))["job"]
        first.job = job["id"]
        await first.ask("watch", job=job["id"])
        seen = [await first.next_event() for _ in range(args.drop_after)]
        if any(is_final(event) for event in seen):
            raise Failed(f"job {job['id']} ended within {args.drop_after} events: too short")
        ws.transport.abort()

    separator = "&" if "?" in args.url else "?"
    async with opened(f"{args.url}{separator}token={quote(args.token)}") as ws:
        second = Session(ws, job["id"])
        since = seen[-1]["seq"]
        await second.ask("watch", job=job["id"], since=since)
        seen += await second.until_final()

    async with opened(args.url, args.token) as ws:
        third = Session(ws, job["id"])
        await third.ask("watch", job=job["id"], since=0)
        history = await third.until_final()

    seqs = [event["seq"] for event in seen]
    if seqs != sorted(set(seqs)):
        raise Failed(f"events out of order or repeated: {seqs}")
    if seqs != [event["seq"] for event in history]:
        raise Failed(f"saw {seqs}, but the job's history is {[e['seq'] for e in history]}")
    return (
        f"ok: job {job['id']} {seen[-1]['data']['status']}, {len(seqs)} events in order once each,"
        f" connection dropped after {args.drop_after} and resumed since {since};"
        " a wrong token was refused with 401"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="the daemon's WebSocket, ws://HOST:PORT/")
    parser.add_argument("--token", required=True, help="a user's token")
    parser.add_argument("--kind", default="shell", help="a kind that reports progress (shell)")
    parser.add_argument(
        "--payload", type=json.loads, default={"seconds": 0.2}, help="its payload as JSON"
    )
    parser.add_argument(
        "--drop-after", type=int, default=3, help="events before the connection is dropped"
    )
    args = parser.parse_args(argv)
    try:
        print(asyncio.run(asyncio.wait_for(accept(args), timeout=120)))
    except (Failed, OSError, WebSocketException, TimeoutError) as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
