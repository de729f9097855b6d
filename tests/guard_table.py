"""Seed 000 §7.1's request guards, reproduced against a real daemon.

`python -m tests.guard_table` starts `jobwarden serve` in a scratch directory with the guard
defaults of config.toml (the seed's thresholds), crosses each guard through the admin socket,
and prints each row's threshold, the reply code with its HTTP status, and retry_after.
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from jobwarden.client import AdminError
from jobwarden.config import load_config
from jobwarden.errors import HTTP_STATUS
from tests.process import REPO_ROOT, DaemonProcess


class Row(msgspec.Struct):
    guard: str
    threshold: str
    crossed_by: str
    code: str
    http: int | None
    retry_after: float | None


def seed_limits() -> dict[str, Any]:
    """The [limits] of the embedded config.toml, which carry the seed's thresholds."""
    limits = load_config(REPO_ROOT / "config.toml").limits
    return {
        "credits": limits.credits,
        "rate": "10/min",
        "burst": limits.burst,
        "daily_jobs": limits.daily_jobs,
        "max_queued": limits.max_queued,
        # The box running this is not under test: only the request guards are.
        "max_memory_percent": 100,
        "max_cpu_percent": 100,
    }


def first_refusal(submit: Callable[[], Any], most: int) -> tuple[int, AdminError]:
    """Submit until refused; returns how many were accepted and the refusal."""
    for accepted in range(most):
        try:
            submit()
        except AdminError as exc:
            return accepted, exc
    raise AssertionError(f"no refusal after {most} submissions")


def row(guard: str, threshold: str, crossed_by: str, error: AdminError) -> Row:
    body = error.error
    return Row(
        guard, threshold, crossed_by, body.code, HTTP_STATUS.get(body.code), body.retry_after
    )


def reproduce(directory: Path) -> list[Row]:
    daemon = DaemonProcess(
        directory,
        {
            "limits": seed_limits(),
            "daemon": {"max_concurrent_jobs": 1, "shutdown_grace": "60s"},
            "kinds": {"quick": {"handler": "tests.handlers:sleepy"}},
        },
    )
    daemon.start()
    rows = []
    try:
        with daemon.client() as client:
            # A job that keeps running, so that the drain at the end has something to wait for.
            client.call("submit", kind="quick", payload={"seconds": 60}, user="holder")
            client.call("pause")

            def submit(user: str, payload: Any = None) -> Callable[[], Any]:
                return lambda: client.call("submit", kind="quick", payload=payload or {}, user=user)

            accepted, error = first_refusal(submit("rate"), 20)
            rows.append(
                row("rate limit", "10/min/user", f"submission {accepted + 1} in a minute", error)
            )

            client.call("users", action="add", name="daily", rate="off")
            accepted, error = first_refusal(submit("daily"), 30)
            rows.append(
                row("daily job limit", "20/user/day", f"submission {accepted + 1} today", error)
            )

            client.call("users", action="add", name="broke", credits=0)
            accepted, error = first_refusal(submit("broke"), 1)
            rows.append(row("credit check", ">= 1 credit", "a user with 0 credits", error))

            client.call(
                "users", action="add", name="bulk", rate="off", daily_limit=0, credits="unlimited"
            )
            first_refusal(submit("bulk"), 200)
            queued = client.call("jobs", status=["queued"], limit=10_000)["jobs"]
            _, error = first_refusal(submit("someone"), 1)
            rows.append(
                row(
                    "queue depth", "< 100 pending", f"a submission with {len(queued)} queued", error
                )
            )

            _, error = first_refusal(submit("big", {"text": "x" * 70_000}), 1)
            rows.append(row("payload size", "64 KiB", "a 70 KB payload", error))

            client.call("drain")
            _, error = first_refusal(submit("late"), 1)
            rows.append(row("draining", "-", "a submission during drain", error))
            client.call("shutdown")
        daemon.wait()
    finally:
        daemon.close()
    return rows


def markdown(rows: list[Row]) -> str:
    lines = [
        "| guard | threshold | crossed by | reply | HTTP | retry_after |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        retry = "-" if r.retry_after is None else f"{r.retry_after:g} s"
        lines.append(
            f"| {r.guard} | {r.threshold} | {r.crossed_by} | {r.code} | {r.http} | {retry} |"
        )
    return "\n".join(lines)


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="jobwarden-guards-") as scratch:
        print(markdown(reproduce(Path(scratch))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
