"""Many jobs at once: `submit KIND --file jobs.jsonl` (or `--file -`, from stdin), and where a
single submit's payload comes from (`@file`, `-`).

A file holds one JSON object a line (blank lines are skipped). Each line is a payload; with
`--items`, each line is an item instead: `{"payload": {...}, "priority": 5,
"idempotency_key": "...", "kind": "other"}`, every field but `payload` optional, `kind`
defaulting to KIND. Lines go to the daemon `CHUNK` at a time, each chunk one request and one
commit; `--atomic` sends the whole file as one request, all accepted or none.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

import msgspec

from jobwarden.cli.arguments import UsageError, json_object
from jobwarden.cli.connection import client, over_websocket
from jobwarden.cli.output import EXIT_FAILED, EXIT_OK, count, error_text, print_json
from jobwarden.client import DaemonError, WebSocketClient
from jobwarden.wire.views import BatchResult, ItemResult, Submission

# Lines sent in one request: the daemon's default `max_batch_items`.
CHUNK = 1000
# How the daemon names the item that refused an atomic batch.
ITEM_REFUSED = re.compile(r"item (\d+): ")
ITEM_FIELDS = frozenset({"kind", "payload", "priority", "idempotency_key"})


def read_text(source: str) -> str:
    """The text of a file, or of stdin for `-`."""
    if source == "-":
        return sys.stdin.read()
    try:
        return Path(source).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read {source}: {exc}") from None


def payload_argument(text: str) -> dict[str, Any]:
    """A single submit's payload (an argument type): JSON text, `@PATH` (a file holding it)
    or `-` (stdin)."""
    where = ""
    try:
        if text == "-":
            text, where = read_text("-"), "from stdin: "
        elif text.startswith("@"):
            text, where = read_text(text[1:]), f"in {text[1:]}: "
        return json_object(text)
    except (UsageError, argparse.ArgumentTypeError) as exc:
        raise argparse.ArgumentTypeError(f"{where}{exc}") from None


def read_items(source: str, kind: str, *, as_items: bool) -> list[tuple[int, Submission]]:
    """Each non-blank line of `source` as an item, with its line number."""
    items = []
    for number, line in enumerate(read_text(source).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json_object(line)
        except argparse.ArgumentTypeError as exc:
            raise UsageError(f"{source}, line {number}: {exc}") from None
        items.append((number, _item(value, kind, as_items, f"{source}, line {number}")))
    if not items:
        raise UsageError(f"{source}: no jobs in it (one JSON object a line)")
    return items


def _item(value: dict[str, Any], kind: str, as_items: bool, where: str) -> Submission:
    if not as_items:
        return Submission(kind=kind, payload=value)
    unknown = sorted(set(value) - ITEM_FIELDS)
    if unknown or "payload" not in value:
        raise UsageError(
            f'{where}: an item is {{"payload": {{...}}}} with optional priority, '
            f"idempotency_key and kind" + (f"; unknown: {', '.join(unknown)}" if unknown else "")
        )
    try:
        return msgspec.convert({"kind": kind, **value}, Submission)
    except msgspec.ValidationError as exc:
        raise UsageError(f"{where}: {exc}") from None


def submit_file(args: argparse.Namespace) -> int:
    lines = read_items(args.file, args.kind, as_items=args.items)
    try:
        return _submit_lines(args, lines)
    except DaemonError as exc:
        raise _naming_line(exc, lines) from None


def _naming_line(exc: DaemonError, lines: list[tuple[int, Submission]]) -> DaemonError:
    """An atomic batch's refusal names its item by index; a person knows the line."""
    match = ITEM_REFUSED.match(exc.error.message)
    if match is None or int(match[1]) >= len(lines):
        return exc
    line = lines[int(match[1])][0]
    message = f"line {line}: {exc.error.message[match.end() :]}"
    return DaemonError(msgspec.structs.replace(exc.error, message=message))


def _submit_lines(args: argparse.Namespace, lines: list[tuple[int, Submission]]) -> int:
    size = len(lines) if args.atomic else CHUNK
    chunks = [lines[start : start + size] for start in range(0, len(lines), size)]
    if args.url:

        async def over(websocket: WebSocketClient, args: argparse.Namespace) -> int:
            results = []
            for chunk in chunks:
                batch = await websocket.submit_many([item for _, item in chunk], atomic=args.atomic)
                results += batch.results
            return _report(args, lines, results)

        return over_websocket(args, over)
    results = []
    with client(args) as admin:
        for chunk in chunks:
            data = admin.call(
                "submit_many",
                items=[msgspec.to_builtins(item) for _, item in chunk],
                atomic=args.atomic,
                user=args.user,
            )
            results += msgspec.convert(data, BatchResult).results
    return _report(args, lines, results)


def _report(
    args: argparse.Namespace, lines: list[tuple[int, Submission]], results: list[ItemResult]
) -> int:
    """A summary and each refused line (--json: the results, each with its line); exit 1
    when a line was refused."""
    batch = BatchResult.of(results)
    if args.json:
        print_json(
            {
                **msgspec.to_builtins(batch),
                "results": [
                    {"line": number, **msgspec.to_builtins(result)}
                    for (number, _), result in zip(lines, results, strict=True)
                ],
            }
        )
    else:
        summary = f"submitted {count(batch.accepted, 'job')}"
        if batch.existing:
            summary += f", {batch.existing} existing"
        print(summary + f", {batch.refused} refused")
        for (number, _), result in zip(lines, results, strict=True):
            if result.error is not None:
                print(f"line {number}: {error_text(result.error)}")
    return EXIT_FAILED if batch.refused else EXIT_OK


def add_file_options(submit: argparse.ArgumentParser) -> None:
    submit.add_argument(
        "--file",
        metavar="PATH",
        help="submit one job per line of this JSON Lines file ('-': stdin); each line a payload",
    )
    submit.add_argument(
        "--items",
        action="store_true",
        help='with --file: each line is {"payload": ..., "priority"?, "idempotency_key"?, "kind"?}',
    )
    submit.add_argument(
        "--atomic",
        action="store_true",
        help="with --file: all lines are accepted, or none (the first refusal names its line)",
    )


def check_file_options(args: argparse.Namespace) -> None:
    if args.file is None:
        if args.items or args.atomic:
            raise UsageError("--items and --atomic go with --file")
        if args.payload is None:
            raise UsageError("submit needs a PAYLOAD_JSON (or @FILE, or - for stdin), or --file")
        return
    if args.payload is not None:
        raise UsageError("give a PAYLOAD_JSON or --file, not both")
    for option in ("watch", "idempotency_key", "priority"):
        if getattr(args, option):
            raise UsageError(
                f"--{option.replace('_', '-')} is for one job; with --file use --items"
            )
