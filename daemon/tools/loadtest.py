"""`jobwarden loadtest`: the storybook load test, run on the real daemon in this process.

The supervisor and its six actors run as in production, on a fresh database under `--out`;
only the providers are simulated (the demo storybook's options). Simulated users submit
books through admission the way the admin socket does, each under their own user name.
Time is trio's clock: `--fast` runs it virtually (MockClock with autojump, as the tests do),
`--speed 100` runs it 100 times faster than the wall clock, and without either it keeps
real time.
The store therefore runs inline on the trio thread: on MockClock, a write in flight on another
thread would let autojump move time under it.

Every figure in the report is read from the store and the ledger after the run
(jobwarden.tools.report). The driver keeps only what no table holds: the submissions that were
refused, by the code their reply carried, and which jobs it made hang.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import itertools
import json
import math
import os
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import msgspec
import structlog
import trio
import trio.testing
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn

from jobwarden.actors.messages import BudgetQuery, Pause, Submit
from jobwarden.config import Config, load_config
from jobwarden.errors import RequestError
from jobwarden.logs import configure_logging
from jobwarden.mailbox import ReplySlot, ask
from jobwarden.process.admin import Stop
from jobwarden.process.supervisor import DaemonHandle, Supervisor
from jobwarden.store import sqlite
from jobwarden.tools import report
from jobwarden.wire.views import JobView

HOUR = 3600.0
# How often the progress bar and the intermediate file catch up with the store.
TICK = 60.0
# After the last arrival, how long jobs still queued or running get to finish.
SETTLE_LIMIT = HOUR
# The crash comes this long after the first book submitted past half time, so that at
# least that book is in flight when it comes.
CRASH_AFTER_SUBMIT = 10.0
# Seconds between two books a user submits in one sitting: a client sending a batch.
SITTING_GAP = (0.5, 3.0)
# A sitting that runs past its hour has its last books arrive this long before the hour
# ends, so each hour gets exactly its share: the boundary itself is the next hour's.
LAST_MOMENT = 0.001
# Where in each hour its rush falls, in seconds: the 10 minutes mid-hour.
RUSH = (25 * 60.0, 35 * 60.0)
PAGES = 8


class Scenario(msgspec.Struct, frozen=True, kw_only=True):
    """A traffic shape from seed 000 §1, and the capacity the daemon is given for it."""

    name: str
    users: int
    # What `--scenario` selects it by; None for the default run.
    option: str | None = None
    jobs_per_hour: int
    # Books a user submits in one sitting, on average; 1 is steady traffic.
    burst: float = 1.0
    # How unevenly users submit, as a Zipf exponent; 0 is everyone alike.
    skew: float = 0.0
    # The share of each hour's books that arrive in its rush (RUSH).
    rush: float = 0.0
    hours: float = 3.0
    max_concurrent_jobs: int = 10
    # The image provider's limits: seed 000's IMAGE_MAX_CONCURRENT, and a rate that covers
    # the scenario's image calls an hour.
    image_concurrency: int = 5
    image_calls_per_minute: int = 100


# Without --scenario: 50 books an hour from 10 users for 3 hours.
DEFAULT_RUN = Scenario(name="the default run", users=10, jobs_per_hour=50)
SCENARIOS = {
    "A": Scenario(name="scenario A", option="A", users=10, jobs_per_hour=30),
    "B": Scenario(
        name="scenario B",
        option="B",
        users=100,
        jobs_per_hour=200,
        burst=3,
        skew=0.5,
        rush=0.2,
        max_concurrent_jobs=50,
    ),
    # The long run: 8 hours, so that its volume meets the daily budget and the
    # emergency stop shows, after the rate, daily and queue limits.
    "C": Scenario(
        name="scenario C",
        option="C",
        users=1000,
        jobs_per_hour=1000,
        burst=6,
        skew=0.4,
        rush=0.4,
        hours=8,
        max_concurrent_jobs=50,
        image_concurrency=10,
        image_calls_per_minute=150,
    ),
}


class Plan(msgspec.Struct, frozen=True):
    scenario: Scenario
    hours: float
    jobs_per_hour: int
    users: int
    # Simulated seconds per real second; None runs virtual time as fast as the machine can.
    speed: float | None
    image_failure_rate: float
    inject_stuck: int
    inject_crash: bool
    seed: int
    out: str
    # The volume the monthly projection is made for.
    daily_volume: int = 1000
    terminal_failure_rate: float = 0.05
    show_progress: bool = True

    @property
    def arrival_window(self) -> float:
        return self.hours * HOUR

    @property
    def stuck_at(self) -> float:
        """The end of hour 1, as in seed 001; a shorter run gets them at its end."""
        return min(HOUR, self.arrival_window)


CONFIG_TEMPLATE = """\
# Written by `jobwarden loadtest` for {test_id}. To look at the run with the usual commands:
#   jobwarden serve --config {config_name}   (then jobwarden ledger/jobs/status --config ...)
# The loadtest left every kind paused, so jobs it did not finish stay as they were.

[daemon]
max_concurrent_jobs = {max_concurrent_jobs}
shutdown_grace = "30s"

[store]
path = "{db_name}"

[admin]
socket = "{socket_name}"

[http]
listen = ""

[websocket]
listen = ""

[log]
format = "json"
level = "info"

[retry]                        # 4 attempts, 0s / 30s / 120s between them
max_attempts = 4
backoff = ["0s", "30s", "120s"]
jitter = 0.1

[limits]                       # the request guards, per user
credits = 100
rate = "10/min"
burst = 10
daily_jobs = 20
max_queued = 100
# The simulated users' load runs on an imagined machine; this one's (the load test itself
# keeps a core busy) must not pause dispatch.
max_memory_percent = 100
max_cpu_percent = 100

[budget]                       # hard limits; spend never crosses them
daily_usd = 500
monthly_usd = 10000
alert_at = [0.5, 0.8, 1.0]
timezone = "UTC"

[services.llm]                 # seed 001 prices
price_usd = 0.000338
max_concurrent = 10
rate = "600/min"
timeout = "30s"
retries = ["1s", "3s"]

[services.image]
price_usd = 0.024
max_concurrent = {image_concurrency}
rate = "{image_calls_per_minute}/min"
timeout = "20s"
retries = ["2s", "5s", "12s"]

[services.image.breaker]
failures = 5
error_rate = 0.10
window = "60s"
min_calls = 20
recovery = "60s"
half_open_calls = 1

[services.storage]
price_usd = 0.0004
timeout = "10s"
retries = ["1s", "3s"]

[kinds.storybook]
handler = "jobwarden.tools.demo:storybook"
timeout = "15m"
services = ["llm", "storage"]

[kinds.storybook.options]
seed = {seed}
terminal_failure_rate = {terminal_failure_rate}

[kinds.storybook.options.llm]
latency = "1500ms"
failure_rate = 0.01

[kinds.storybook.options.image]
latency = "3s"
failure_rate = {image_failure_rate}

[kinds.storybook.options.storage]
latency = "300ms"
failure_rate = 0.0
"""


class Arrival(NamedTuple):
    at: float
    user: str
    hang_once: bool = False


def sitting_size(mean: float, rng: random.Random) -> int:
    """Books in one sitting: geometric with the given mean, at least one."""
    if mean <= 1:
        return 1
    return 1 + int(math.log(1.0 - rng.random()) / math.log(1.0 - 1.0 / mean))


def plan_arrivals(plan: Plan, rng: random.Random) -> list[Arrival]:
    """Exactly `jobs_per_hour` books each hour, in sittings of `burst` books on average,
    with a share of them in the hour's rush; users take turns, or with a skew are drawn with
    Zipf weights. Plus the injected stuck jobs at the end of hour 1."""
    scenario = plan.scenario
    names = [f"user{n:04d}" for n in range(1, plan.users + 1)]
    weights = list(
        itertools.accumulate(1.0 / rank**scenario.skew for rank in range(1, len(names) + 1))
    )
    turns = itertools.cycle(names)
    arrivals: list[Arrival] = []
    for hour in range(math.ceil(plan.hours)):
        start = hour * HOUR
        end = min(start + HOUR, plan.arrival_window)
        remaining = round(plan.jobs_per_hour * (end - start) / HOUR)
        rush_start, rush_end = start + RUSH[0], min(start + RUSH[1], end)
        while remaining > 0:
            size = min(remaining, sitting_size(scenario.burst, rng))
            user = rng.choices(names, cum_weights=weights)[0] if scenario.skew else next(turns)
            in_rush = rush_start < rush_end and rng.random() < scenario.rush
            at = rng.uniform(rush_start, rush_end) if in_rush else rng.uniform(start, end)
            for _ in range(size):
                arrivals.append(Arrival(min(at, end - LAST_MOMENT), user))
                at += rng.uniform(*SITTING_GAP)
            remaining -= size
    # Stuck jobs come from users picked evenly, so a heavy user's limits do not refuse them.
    for _ in range(plan.inject_stuck):
        arrivals.append(Arrival(plan.stuck_at, rng.choice(names), hang_once=True))
    arrivals.sort(key=lambda arrival: arrival.at)
    return arrivals


def crash_moment(plan: Plan, arrivals: list[Arrival]) -> float:
    half_time = plan.arrival_window / 2
    after = [arrival.at for arrival in arrivals if arrival.at >= half_time]
    return after[0] + CRASH_AFTER_SUBMIT if after else half_time


class InProcessDaemon:
    """The real supervisor in this process, with its store inline on the trio thread.

    `stop` drains it as an operator would; `crash` leaves what `kill -9` would. `lost` is set
    when it stops without being asked (a signal or an admin `drain` from outside).
    """

    def __init__(self, config: Config, nursery: trio.Nursery) -> None:
        self.config = config
        self.lost = trio.Event()
        self._nursery = nursery
        self._stopped = trio.Event()
        self._scope = trio.CancelScope()
        self._stop_requested = False
        self.handle: DaemonHandle

    @property
    def db_path(self) -> Path:
        return self.config.path(self.config.store.path)

    async def start(self, clock_epoch: float) -> None:
        self._stopped = trio.Event()
        self._scope = trio.CancelScope()
        self._stop_requested = False
        self.handle = await self._nursery.start(self._run, clock_epoch)

    async def _run(self, clock_epoch: float, task_status: trio.TaskStatus[DaemonHandle]) -> None:
        supervisor = Supervisor(self.config, threaded_store=False, clock_epoch=clock_epoch)
        try:
            with self._scope:
                await supervisor.run(task_status=task_status)
        finally:
            self._stopped.set()
            if not self._stop_requested:
                self.lost.set()

    async def submit(self, user: str, payload: dict[str, Any]) -> JobView:
        """Raises RequestError with the code a client would get when admission refuses."""
        reply: ReplySlot[tuple[JobView, bool]] = ReplySlot()
        await self.handle.admission.send(
            Submit(kind="storybook", payload=payload, user=user, reply=reply)
        )
        job, _ = await reply.wait()
        return job

    async def stop(self, grace: float) -> None:
        self._stop_requested = True
        await self.handle.control.send(Stop(grace=grace))
        await self._stopped.wait()

    async def crash(self) -> None:
        """Stop it the way `kill -9` would: only what was committed survives.

        Cancelling the supervisor alone lets the pool's shielded final writes land (running
        jobs back in the queue as INTERRUPTED), a courtesy a killed process never gets. So
        the database is copied at the instant of the crash, and that copy is what the next
        supervisor opens: it finds the jobs still `running` and must recover them.
        """
        db = self.db_path
        at_crash = db.with_name(f"{db.name}.at-crash")
        sqlite.copy_database(db, at_crash)
        self._stop_requested = True
        self._scope.cancel()
        await self._stopped.wait()
        # The old WAL belongs to the file being replaced; replayed onto the copy it would
        # bring back the writes the crash lost.
        for leftover in (f"{db}-wal", f"{db}-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(leftover)
        os.replace(at_crash, db)


class RunRecord(msgspec.Struct):
    """What the driver knows that no table holds, and where everything went."""

    test_id: str
    plan: Plan
    config_path: str
    database: str
    # The simulated wall clock: runs start at midnight UTC of the real day, so that a run of
    # up to a day falls in one budget day and `jobwarden ledger --day` shows all of it.
    started_at: float
    ended_at: float
    runtime_seconds: float
    submitted: int
    rejections: dict[str, int]
    refused_by_hour: list[int]
    stuck_injected: list[int]
    stuck_refused: int
    crash_at: float | None
    # The ledger's own view as the run ended (spent, limits, whether spending was stopped).
    budget: dict[str, Any]
    # Stopped from outside before the end (Ctrl-C): the figures cover what ran.
    interrupted: bool


class Outcome(msgspec.Struct):
    record: RunRecord
    figures: dict[str, Any]
    files: list[str]
    charts_note: str | None


class LoadTest:
    def __init__(self, plan: Plan, test_id: str) -> None:
        self.plan = plan
        self.test_id = test_id
        self.out = Path(plan.out)
        self.prefix = self.out / test_id
        self.config_path = self.out / f"{test_id}_config.toml"
        self.rejections: Counter[str] = Counter()
        self.refused_by_hour = [0] * max(math.ceil(plan.hours), 1)
        self.submitted = 0
        self.stuck_injected: list[int] = []
        self.stuck_refused = 0
        self.hourly: list[dict[str, Any]] = []
        self.latest: dict[str, Any] = {}
        # Trio time at the start of the run, and the next progress tick after it.
        self.origin = 0.0
        self.next_tick = TICK
        self.show: Callable[[dict[str, Any]], None] = _show_nothing

    def write_config(self) -> Config:
        """Raises FileExistsError when the run's database is there already."""
        scenario = self.plan.scenario
        text = CONFIG_TEMPLATE.format(
            test_id=self.test_id,
            config_name=self.config_path.name,
            db_name=f"{self.test_id}.db",
            socket_name=f"{self.test_id}.sock",
            max_concurrent_jobs=scenario.max_concurrent_jobs,
            image_concurrency=scenario.image_concurrency,
            image_calls_per_minute=scenario.image_calls_per_minute,
            seed=self.plan.seed,
            terminal_failure_rate=self.plan.terminal_failure_rate,
            image_failure_rate=self.plan.image_failure_rate,
        )
        self.out.mkdir(parents=True, exist_ok=True)
        database = self.out / f"{self.test_id}.db"
        if database.exists():
            raise FileExistsError(f"{database} exists; a load test needs a fresh database")
        self.config_path.write_text(text, encoding="utf-8")
        return load_config(self.config_path)

    async def run(self) -> Outcome:
        config = self.write_config()
        arrivals = plan_arrivals(self.plan, random.Random(self.plan.seed))
        crash_at = crash_moment(self.plan, arrivals) if self.plan.inject_crash else None
        started_at = midnight_utc()
        began = time.perf_counter()
        self.origin = trio.current_time()
        budget: dict[str, Any] = {}
        with daemon_logs_to(Path(f"{self.prefix}.log")), progress_display(self.plan) as show:
            self.show = show
            async with trio.open_nursery() as nursery:
                daemon = InProcessDaemon(config, nursery)
                await daemon.start(started_at)
                with trio.CancelScope() as driving:
                    nursery.start_soon(_cancel_when_set, daemon.lost, driving)
                    await self._drive(daemon, arrivals, started_at, crash_at)
                interrupted = daemon.lost.is_set()
                if not interrupted:
                    # Paused, a later `jobwarden serve` on this database shows it as it was.
                    await ask(daemon.handle.scheduler, Pause, kind=None)
                    budget = await ask(daemon.handle.ledger, BudgetQuery)
                    await daemon.stop(grace=0.0)
                nursery.cancel_scope.cancel()
        record = RunRecord(
            test_id=self.test_id,
            plan=self.plan,
            config_path=str(self.config_path),
            database=str(config.path(config.store.path)),
            started_at=started_at,
            ended_at=started_at + self.elapsed(),
            runtime_seconds=round(time.perf_counter() - began, 3),
            submitted=self.submitted,
            rejections=dict(self.rejections),
            refused_by_hour=self.refused_by_hour,
            stuck_injected=self.stuck_injected,
            stuck_refused=self.stuck_refused,
            crash_at=None if crash_at is None else started_at + crash_at,
            budget=budget,
            interrupted=interrupted,
        )
        return self.write_report(config, record)

    def elapsed(self) -> float:
        return trio.current_time() - self.origin

    async def _drive(
        self,
        daemon: InProcessDaemon,
        arrivals: list[Arrival],
        started_at: float,
        crash_at: float | None,
    ) -> None:
        for number, arrival in enumerate(arrivals, 1):
            if crash_at is not None and crash_at <= arrival.at:
                await self._wait_until(daemon, crash_at)
                await daemon.crash()
                await daemon.start(started_at + self.elapsed())
                crash_at = None
            await self._wait_until(daemon, arrival.at)
            await self._submit(daemon, number, arrival)
        give_up_at = self.plan.arrival_window + SETTLE_LIMIT
        await self._wait_until(daemon, self.plan.arrival_window)
        while self.elapsed() < give_up_at:
            await self._wait_until(daemon, self.next_tick)
            if not (self.latest["queued"] or self.latest["running"]):
                break

    async def _wait_until(self, daemon: InProcessDaemon, offset: float) -> None:
        """Sleep until `offset` seconds into the run, catching up with the store each tick."""
        while self.next_tick <= offset:
            await trio.sleep_until(self.origin + self.next_tick)
            await self._tick(daemon)
            self.next_tick += TICK
        await trio.sleep_until(self.origin + offset)

    async def _tick(self, daemon: InProcessDaemon) -> None:
        snapshot = await daemon.handle.store.read(report.progress_snapshot)
        snapshot["elapsed_hours"] = round(self.elapsed() / HOUR, 4)
        self.latest = snapshot
        if self.next_tick % HOUR == 0:
            self.hourly.append(snapshot)
        self.show(snapshot)
        self.write_intermediate(finished=False)

    async def _submit(self, daemon: InProcessDaemon, number: int, arrival: Arrival) -> None:
        payload: dict[str, Any] = {"title": f"Book {number}", "pages": PAGES}
        if arrival.hang_once:
            payload["hang_once"] = True
        self.submitted += 1
        try:
            job = await daemon.submit(arrival.user, payload)
        except RequestError as refused:
            self.rejections[refused.body.code] += 1
            self.refused_by_hour[min(int(arrival.at // HOUR), len(self.refused_by_hour) - 1)] += 1
            self.stuck_refused += arrival.hang_once
            return
        if arrival.hang_once:
            self.stuck_injected.append(job.id)

    def write_intermediate(self, *, finished: bool) -> None:
        """Rewritten as the run goes, whole or not at all, so a killed run leaves its last
        state readable."""
        state = {
            "test_id": self.test_id,
            "finished": finished,
            "plan": msgspec.to_builtins(self.plan),
            "submitted": self.submitted,
            "rejections": dict(self.rejections),
            "stuck_injected": self.stuck_injected,
            "latest": self.latest,
            "hourly": self.hourly,
        }
        write_atomically(Path(f"{self.prefix}_intermediate.json"), _json(state))

    def write_report(self, config: Config, record: RunRecord) -> Outcome:
        self.write_intermediate(finished=True)
        record_data = msgspec.to_builtins(record)
        with sqlite.opened(record.database) as conn:
            figures = report.collect(conn, config, record_data)
        charts_note = None
        try:
            charts = [str(path) for path in report.draw_charts(figures, self.prefix)]
        except ModuleNotFoundError:
            charts, charts_note = [], report.charts_missing_note()
        files = {
            f"{self.prefix}_full.json": _json({"run": record_data, "figures": figures}),
            f"{self.prefix}_summary.txt": report.render_summary(record_data, figures),
            f"{self.prefix}_report.md": report.render_markdown(
                record_data, figures, charts, charts_note
            ),
        }
        for path, text in files.items():
            write_atomically(Path(path), text)
        written = [*files, f"{self.prefix}_intermediate.json", *charts]
        return Outcome(record=record, figures=figures, files=written, charts_note=charts_note)


def _json(data: Any) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def write_atomically(path: Path, text: str) -> None:
    partial_file = path.with_name(f".{path.name}.tmp")
    partial_file.write_text(text, encoding="utf-8")
    os.replace(partial_file, path)


def midnight_utc() -> float:
    today = datetime.datetime.now(datetime.UTC).date()
    return datetime.datetime.combine(today, datetime.time(), tzinfo=datetime.UTC).timestamp()


async def _cancel_when_set(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


@contextlib.contextmanager
def daemon_logs_to(path: Path) -> Iterator[None]:
    """The daemon's log lines go to a file for the run; the terminal keeps the progress bar."""
    previous = structlog.get_config()
    with path.open("w", encoding="utf-8") as stream:
        configure_logging("json", "info", stream=stream)
        try:
            yield
        finally:
            structlog.configure(**previous)


def _show_nothing(snapshot: dict[str, Any]) -> None:
    pass


@contextlib.contextmanager
def progress_display(plan: Plan) -> Iterator[Callable[[dict[str, Any]], None]]:
    """A bar over the arrival window: simulated hour, jobs finished, spend so far."""
    if not plan.show_progress:
        yield _show_nothing
        return
    columns = (
        TextColumn("hour {task.fields[hour]}"),
        BarColumn(),
        TextColumn("{task.fields[jobs]}"),
        TextColumn("[bold]{task.fields[spend]}"),
    )
    with Progress(*columns, console=Console(stderr=True)) as progress:
        task = progress.add_task(
            "", total=plan.arrival_window, hour=f"0.0/{plan.hours:g}", jobs="", spend="$0.00"
        )

        def show(snapshot: dict[str, Any]) -> None:
            waiting = snapshot["queued"] + snapshot["running"]
            progress.update(
                task,
                completed=min(snapshot["elapsed_hours"] * HOUR, plan.arrival_window),
                hour=f"{snapshot['elapsed_hours']:.1f}/{plan.hours:g}"
                + (" finishing" if snapshot["elapsed_hours"] > plan.hours else ""),
                jobs=f"{snapshot['done']:,} done, {snapshot['failed']:,} failed, "
                f"{waiting:,} waiting",
                spend=f"${snapshot['usd']:,.2f}",
            )

        yield show


async def run_loadtest(plan: Plan, *, test_id: str) -> Outcome:
    """The whole load test inside the current trio run: under MockClock in tests and --fast,
    MockClock(rate=speed) otherwise."""
    return await LoadTest(plan, test_id).run()


def plan_from_args(args: argparse.Namespace) -> Plan:
    scenario = SCENARIOS[args.scenario] if args.scenario else DEFAULT_RUN
    return Plan(
        scenario=scenario,
        hours=args.hours or scenario.hours,
        jobs_per_hour=args.jobs_per_hour or scenario.jobs_per_hour,
        users=args.users or scenario.users,
        speed=None if args.fast else (args.speed or 1.0),
        image_failure_rate=args.image_failure_rate,
        inject_stuck=args.inject_stuck,
        inject_crash=args.inject_crash,
        seed=args.seed,
        out=args.out,
        daily_volume=args.daily_volume,
    )


def loadtest_main(args: argparse.Namespace) -> int:
    plan = plan_from_args(args)
    clock = (
        trio.testing.MockClock(autojump_threshold=0)
        if plan.speed is None
        else trio.testing.MockClock(rate=plan.speed)
    )
    test_id = datetime.datetime.now().strftime("longrun_%Y%m%d_%H%M%S")
    outcome = trio.run(lambda: run_loadtest(plan, test_id=test_id), clock=clock)
    if args.json:
        print(_json({"run": msgspec.to_builtins(outcome.record), "figures": outcome.figures}))
    else:
        print(report.render_summary(msgspec.to_builtins(outcome.record), outcome.figures), end="")
        if outcome.charts_note:
            print(outcome.charts_note)
        print("files:")
        for path in outcome.files:
            print(f"  {path}")
    return 1 if outcome.record.interrupted else 0
