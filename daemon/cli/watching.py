"""Following jobs as they run, over the admin socket or the WebSocket: the events shown as they
come (a progress bar for a person watching one job, a line each otherwise, JSON lines for
programs), and the exit code a finished job's outcome deserves."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple, NoReturn

import msgspec
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn
from rich.text import Text

from jobwarden.cli.output import (
    EXIT_FAILED,
    EXIT_OK,
    STATUS_STYLES,
    clock,
    error_text,
    json_text,
    money,
    paint,
    percent,
    print_json_line,
    span,
)
from jobwarden.client import AdminClient, Job, WebSocketClient
from jobwarden.wire.views import TERMINAL_STATUSES, ErrorBody, JobView

ShowEvent = Callable[[dict[str, Any]], None]


class Outcome(NamedTuple):
    status: str
    result: Any
    error: ErrorBody | None


def watch_job(client: AdminClient, job_id: int, *, as_json: bool) -> int:
    """Show a job's whole history, then follow it until it finishes, and return the exit
    code its outcome deserves."""
    shown = client.call("show", job=job_id)
    job = job_view(shown["job"])
    if shown.get("waiting") and not as_json:
        print(f"job {job_id} waiting {waiting_text(shown['waiting'])}")
    # The job as it was read ends with its newest event: a final status from then on is the
    # end (an earlier one was followed by a retry); a job already final ends there.
    newest = max((event["seq"] for event in shown.get("events", [])), default=None)
    final = Outcome(job.status, job.result, job.error) if job.status in TERMINAL_STATUSES else None
    if final is not None and newest is None:
        # A daemon that keeps no events for it: the job itself is all there is to tell.
        return _report_outcome(job_id, final, as_json=as_json)
    outcome = None
    with _event_printer(job, as_json=as_json) as show_event:
        # From seq 0: the daemon replays every stored event of the job, then the live ones.
        for event in client.watch(job=job_id, since=0):
            show_event(event)
            if event["seq"] >= (newest or 0):
                outcome = final or _outcome_of(event)
            if outcome is not None:
                break
    assert outcome is not None, "a watch of one job streams until the job finishes"
    return _report_outcome(job_id, outcome, as_json=as_json)


def watch_all(client: AdminClient, *, as_json: bool) -> NoReturn:
    events = client.watch()
    with _event_printer(None, as_json=as_json) as show_event:
        while True:
            show_event(next(events))


def follow_over_http(job: Job, *, as_json: bool) -> int:
    """Follow one job over the HTTP API's event stream, from its first event to its final
    status as it stands."""
    outcome = None
    with _event_printer(job.view, as_json=as_json) as show_event:
        for event in job.events(since=0):
            shown = msgspec.to_builtins(event)
            show_event(shown)
            outcome = _outcome_of(shown) or outcome
    assert outcome is not None, "a job's event stream ends with its final status"
    return _report_outcome(job.id, outcome, as_json=as_json)


async def follow_over_websocket(client: WebSocketClient, job_id: int, *, as_json: bool) -> int:
    """Follow one job from its first event; the watch ends with the job's final status as
    it stands, past any that a retry superseded."""
    outcome = None
    async with client.watch(job_id) as watch:
        with _event_printer(watch.job, as_json=as_json) as show_event:
            async for event in watch:
                shown = msgspec.to_builtins(event)
                show_event(shown)
                # The job's newest event may follow its final status (a call's cost).
                outcome = _outcome_of(shown) or outcome
    assert outcome is not None, "a watch of one job ends with its final status"
    return _report_outcome(job_id, outcome, as_json=as_json)


async def watch_all_over_websocket(client: WebSocketClient, *, as_json: bool) -> int:
    async with client.watch_all() as watch:
        with _event_printer(None, as_json=as_json) as show_event:
            async for event in watch:
                show_event(msgspec.to_builtins(event))
    return EXIT_OK


def _outcome_of(event: dict[str, Any]) -> Outcome | None:
    data = event["data"]
    if event["type"] != "status" or data["status"] not in TERMINAL_STATUSES:
        return None
    error = msgspec.convert(data["error"], ErrorBody) if data.get("error") else None
    return Outcome(data["status"], data.get("result"), error)


def _report_outcome(job_id: int, outcome: Outcome, *, as_json: bool) -> int:
    if outcome.status == "done":
        if not as_json and outcome.result is not None:
            print(json_text(outcome.result, indent=2))
        return EXIT_OK
    if not as_json:
        why = f": {error_text(outcome.error)}" if outcome.error else ""
        print(f"job {job_id} {outcome.status}{why}", file=sys.stderr)
    return EXIT_FAILED


@contextlib.contextmanager
def _event_printer(job: JobView | None, *, as_json: bool) -> Iterator[ShowEvent]:
    """JSON lines for programs, a live progress bar for a person watching one job, and one
    line per event for logs and for watching every job."""
    if as_json:
        yield print_json_line
    elif job is None or not sys.stdout.isatty():
        yield lambda event: print(_event_line(event), flush=True)
    else:
        with _progress_bar(job) as show_event:
            yield show_event


@contextlib.contextmanager
def _progress_bar(job: JobView) -> Iterator[ShowEvent]:
    columns = (
        TextColumn("job {task.fields[job]} {task.fields[status]}"),
        BarColumn(),
        TaskProgressColumn(),
        # Progress messages come from job code; brackets in them are not rich markup.
        TextColumn("{task.description}", markup=False),
    )
    with Progress(*columns) as progress:
        task = progress.add_task(
            job.message or "",
            total=1.0,
            completed=job.progress or 0.0,
            job=job.id,
            status=_bar_status(job.status),
        )

        def show_event(event: dict[str, Any]) -> None:
            data = event["data"]
            if event["type"] == "progress":
                progress.update(
                    task, completed=data["fraction"], description=data.get("message") or ""
                )
            elif event["type"] == "position":
                progress.update(task, description=waiting_text(data))
            elif event["type"] == "status":
                # A job may finish without reporting 100%; its bar should still end full.
                finished = data["status"] == "done"
                progress.update(
                    task, status=_bar_status(data["status"]), completed=1.0 if finished else None
                )
                progress.console.print(Text.from_ansi(_event_line(event)), highlight=False)

        yield show_event


def _bar_status(status: str) -> str:
    """A status as rich markup for the bar's column, in the colour `paint` gives it."""
    return f"[bold {STATUS_STYLES.get(status, '')}]{status}[/]"


def job_view(data: Any) -> JobView:
    return msgspec.convert(data, JobView)


def _event_line(event: dict[str, Any]) -> str:
    if event["type"] == "breaker":
        return describe_event(event)
    return f"job {event['job']} {describe_event(event)}"


def describe_event(event: dict[str, Any]) -> str:
    data = event["data"]
    if event["type"] == "breaker":
        until = f" until {clock(data['open_until'])}" if data.get("open_until") else ""
        return f"breaker {data['service']} {data['state'].replace('_', '-')}{until}"
    if event["type"] == "progress":
        return " ".join(filter(None, ["progress", percent(data["fraction"]), data.get("message")]))
    if event["type"] == "position":
        return f"waiting {waiting_text(data)}"
    if event["type"] == "cost":
        outcome = "" if data["ok"] else " (failed)"
        return (
            f"cost {data['service']} {money(data['usd'], 4)}{outcome}, "
            f"job total {money(data['job_usd'], 4)}"
        )
    if event["type"] != "status":
        return f"{event['type']} {json_text(data)}"
    words = ["status", paint(data["status"]), f"attempt {data['attempt']}"]
    if data.get("reason"):
        words.append(f"({data['reason']})")
    if data["status"] == "queued" and data.get("available_at", 0) > event["at"]:
        words.append(f"next try in {span(data['available_at'] - event['at'])}")
    return " ".join(words)


def waiting_text(info: dict[str, Any]) -> str:
    """One reason, and the place in the queue unless the reason already is that place."""
    place = f"{info['kind_position']} of {info['kind_queued']} in its kind"
    if info["reason"].startswith("position"):
        return f"{info['reason']} ({place})"
    return f"{info['reason']}; position {info['position']} of {info['queued']}"
