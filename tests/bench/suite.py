"""The benchmark suite: runs each section, sets the figures against their goals, prints the
table and writes results/<date>.json (results/<date>-quick.json for --quick)."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.bench import admin_load, fanout, inprocess, scale
from tests.bench.harness import MAX_CONCURRENT_JOBS

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent.parent
RESULTS_DIR = BENCH_DIR / "results"
PEERS_VENV = BENCH_DIR / ".venv-peers"
HUEY_PEER = BENCH_DIR / "huey_peer.py"

SECTIONS = ("throughput", "huey", "latency", "scale", "fanout")
LEVELS = ("NORMAL", "FULL")
FULL_JOBS = 100_000
QUICK_JOBS = 10_000
FULL_SIZES = (1_000, 100_000, 1_000_000)
QUICK_SIZES = (1_000, 100_000)
LATENCY_RATE = 2_000
FULL_LATENCY_SUBMISSIONS = 20_000
QUICK_LATENCY_SUBMISSIONS = 4_000
FULL_FAN_OUT_EVENTS = 3_000
QUICK_FAN_OUT_EVENTS = 1_000


def progress(message: str) -> None:
    print(f"… {message}", file=sys.stderr, flush=True)


# -- sections --------------------------------------------------------------------------------


def run_throughput(jobs: int) -> dict[str, Any]:
    figures: dict[str, Any] = {"in_process": {}}
    for level in LEVELS:
        progress(f"throughput: {jobs:,} jobs in process, synchronous={level}")
        figures["in_process"][level] = inprocess.measure_throughput(jobs, level)
    progress(f"throughput: {jobs:,} jobs over the admin socket, synchronous=NORMAL")
    figures["admin_socket"] = admin_load.measure_throughput(jobs)
    return figures


def peer_python() -> Path:
    """The peers' venv Python, with huey installed into it from PyPI if missing."""
    python = PEERS_VENV / "bin" / "python"
    has_huey = python.exists() and (
        subprocess.run([python, "-c", "import huey"], capture_output=True).returncode == 0
    )
    if not has_huey:
        progress(f"installing huey into {PEERS_VENV}")
        subprocess.run([sys.executable, "-m", "venv", PEERS_VENV], check=True)
        subprocess.run([python, "-m", "pip", "install", "-q", "huey"], check=True)
    return python


def run_huey(jobs: int) -> dict[str, Any]:
    python = peer_python()
    figures = {}
    for level in LEVELS:
        progress(f"huey: {jobs:,} tasks, synchronous={level}, 1 and 2 workers")
        finished = subprocess.run(
            [python, HUEY_PEER, "--jobs", str(jobs), "--synchronous", level],
            capture_output=True,
            text=True,
            check=True,
        )
        figures[level] = json.loads(finished.stdout)
    return figures


def run_latency(submissions: int) -> dict[str, Any]:
    progress(f"latency: {submissions:,} submissions at {LATENCY_RATE:,}/s over the admin socket")
    return admin_load.measure_latency(LATENCY_RATE, submissions)


def run_fan_out(events: int) -> dict[str, Any]:
    progress(
        f"fan-out: {events:,} progress events at {fanout.RATE}/s to {fanout.WATCHERS} watchers"
        " over the WebSocket"
    )
    return fanout.measure_fan_out(events)


def run_scale(sizes: tuple[int, ...]) -> dict[str, Any]:
    figures: dict[str, Any] = {"sizes": []}
    for size in sizes:
        progress(f"scale: {size:,} queued jobs")
        figures["sizes"].append(scale.measure_size(size))
    progress(f"scale: recovery of {scale.RECOVERY_RUNNING:,} running jobs")
    figures["recovery"] = scale.measure_recovery()
    return figures


# -- goals -----------------------------------------------------------------------------------


def at_least(target: float) -> Callable[[float], bool]:
    return lambda value: value >= target


def below(target: float) -> Callable[[float], bool]:
    return lambda value: value < target


def verdict(check: Callable[[float], bool], value: float) -> str:
    return "PASS" if check(value) else "MISS"


def count(value: float) -> str:
    return f"{value:,.0f}"


def table_rows(results: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(figure, value, goal, PASS/MISS) for every figure measured, grouped under headings
    (rows with an empty value)."""
    rows: list[tuple[str, str, str, str]] = []
    jobs = results["jobs"]
    throughput = results.get("throughput")
    if throughput:
        rows.append((f"Throughput: {jobs:,} no-op jobs accepted → done, jobs/s", "", "", ""))
        for level, figures in throughput["in_process"].items():
            value = figures["jobs_per_s"]
            goal = "≥ 10,000" if level == "NORMAL" else ""
            rows.append(
                (
                    f"  in process, {level} (admission {count(figures['accepted_per_s'])}/s,"
                    f" {figures['writes_per_commit']:.1f} writes/commit)",
                    count(value),
                    goal,
                    verdict(at_least(10_000), value) if goal else "",
                )
            )
        socket = throughput["admin_socket"]
        rows.append(
            (
                f"  admin socket, {admin_load.CONNECTIONS} connections, NORMAL"
                f" (admission {count(socket['accepted_per_s'])}/s)",
                count(socket["jobs_per_s"]),
                "",
                "",
            )
        )
    huey = results.get("huey")
    if huey:
        version = next(iter(huey.values()))["huey"]
        rows.append((f"Huey {version}, SqliteHuey + thread consumer, per s", "", "", ""))
        for level, figures in huey.items():
            workers, best = max(figures["completed_per_s"].items(), key=lambda item: item[1])
            rows.append((f"  {level}: enqueue", count(figures["enqueue_per_s"]), "", ""))
            for each, rate in figures["completed_per_s"].items():
                rows.append((f"  {level}: completed, {each} worker(s)", count(rate), "", ""))
            if throughput:
                ratio = throughput["in_process"][level]["jobs_per_s"] / best
                rows.append(
                    (
                        f"  {level}: jobwarden in process / Huey best ({workers} worker(s))",
                        f"{ratio:.2f}×",
                        "≥ 4×",
                        verdict(at_least(4), ratio),
                    )
                )
    latency = results.get("latency")
    if latency:
        rows.append(
            (f"Latency at {latency['rate']:,} submissions/s (admin socket), ms", "", "", "")
        )
        p99 = latency["accepted_p99_ms"]
        rows.append(("  submit → accepted p50", f"{latency['accepted_p50_ms']:.2f}", "", ""))
        rows.append(("  submit → accepted p99", f"{p99:.2f}", "< 5", verdict(below(5), p99)))
        rows.append(("  accepted → started p50", f"{latency['started_p50_ms']:.2f}", "", ""))
        rows.append(("  accepted → started p99", f"{latency['started_p99_ms']:.2f}", "", ""))
    scaled = results.get("scale")
    if scaled:
        rows.extend(scale_rows(scaled))
    fanned = results.get("fanout")
    if fanned:
        rows.extend(fan_out_rows(fanned))
    return rows


def scale_rows(figures: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """The goals are set at 1M queued jobs; a --quick run checks them at its largest size."""
    sizes = figures["sizes"]
    baseline = sizes[0]["dispatch_per_s"]
    largest = sizes[-1]["queued"]
    rows = [(f"Scale: {MAX_CONCURRENT_JOBS} slots, goals at {largest:,} queued", "", "", "")]
    for size in sizes:
        queued = size["queued"]
        # Each figure is judged against its goal only at the largest size.
        judged = queued == largest
        ratio = size["dispatch_per_s"] / baseline
        rows += [
            goal_row(
                f"  {queued:,} queued: dispatch jobs/s (× the {sizes[0]['queued']:,} figure)",
                f"{count(size['dispatch_per_s'])} ({ratio:.2f}×)",
                ("≥ 0.8×", at_least(0.8), ratio) if judged else None,
            ),
            goal_row(
                f"  {queued:,} queued: peak RSS, MB",
                f"{size['peak_rss_mb']:.0f}",
                ("< 300", below(300), size["peak_rss_mb"]) if judged else None,
            ),
            goal_row(
                f"  {queued:,} rows: restart → ready, s",
                f"{size['ready_s']:.2f}",
                ("< 5", below(5), size["ready_s"]) if judged else None,
            ),
        ]
    recovery = figures["recovery"]
    rows.append(
        goal_row(
            f"  {recovery['running']:,} running at the kill: restart → ready, s",
            f"{recovery['ready_s']:.2f}",
            ("< 2", below(2), recovery["ready_s"]),
        )
    )
    return rows


def fan_out_rows(figures: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    return [
        (
            f"Fan-out: {figures['events']:,} progress events at {figures['offered_per_s']}/s,"
            f" each to {figures['watchers']} WebSocket watchers",
            "",
            "",
            "",
        ),
        ("  events delivered/s, all watchers", count(figures["delivered_per_s"]), "", ""),
        ("  commit → watcher p50, ms", f"{figures['latency_p50_ms']:.1f}", "", ""),
        ("  commit → watcher p99, ms", f"{figures['latency_p99_ms']:.1f}", "", ""),
        (
            "  daemon CPU per delivery, µs",
            f"{figures['daemon_cpu_us_per_delivery']:.1f}",
            "",
            "",
        ),
        ("  watchers told to resync", count(figures["resyncs"]), "", ""),
    ]


def goal_row(
    label: str, shown: str, goal: tuple[str, Any, float] | None
) -> tuple[str, str, str, str]:
    """A table row: the figure, and when it is judged, its goal and PASS or MISS."""
    if goal is None:
        return (label, shown, "", "")
    text, check, value = goal
    return (label, shown, text, verdict(check, value))


def print_table(results: dict[str, Any], rows: list[tuple[str, str, str, str]]) -> None:
    dirty = " (+ uncommitted changes)" if results["dirty"] else ""
    mode = "--quick" if results["quick"] else "full"
    machine = results["machine"]
    print(
        f"\njobwarden benchmarks, {mode} run, commit {results['commit']}{dirty}, "
        f"{results['date']}, {machine['cpus']} CPUs, load average at start "
        f"{machine['load_average_at_start']:.2f}"
    )
    width = max(len(row[0]) for row in rows)
    for figure, value, goal, outcome in rows:
        if not value:
            print(f"\n{figure}")
        elif outcome:
            print(f"{figure:<{width}}  {value:>16}  {goal:>9}  {outcome}")
        else:
            print(f"{figure:<{width}}  {value:>16}".rstrip())


# -- the run ---------------------------------------------------------------------------------


def git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()


def describe_commit() -> tuple[str, bool]:
    """HEAD, and whether the code measured differs from it (the benchmarks themselves aside)."""
    changed = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!tests/bench")
    return git("rev-parse", "--short", "HEAD"), bool(changed)


def write_results(results: dict[str, Any]) -> Path:
    suffix = "-quick" if results["quick"] else ""
    path = RESULTS_DIR / f"{results['date']}{suffix}.json"
    RESULTS_DIR.mkdir(exist_ok=True)
    partial = path.with_suffix(".json.tmp")
    partial.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    partial.replace(path)
    return path


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="tests/bench/run.py",
        description="jobwarden benchmarks: throughput, latency, scale and fan-out, beside Huey",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"{QUICK_JOBS:,} jobs instead of {FULL_JOBS:,}, and no 1M-job database",
    )
    parser.add_argument(
        "--only", choices=SECTIONS, nargs="+", default=SECTIONS, help="run these sections only"
    )
    args = parser.parse_args(argv)
    commit, dirty = describe_commit()
    jobs = QUICK_JOBS if args.quick else FULL_JOBS
    results: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "commit": commit,
        "dirty": dirty,
        "quick": args.quick,
        "jobs": jobs,
        "machine": {
            "cpus": os.cpu_count(),
            # Anything else busy on the machine skews every figure: look here first.
            "load_average_at_start": os.getloadavg()[0],
            "python": platform.python_version(),
            "sqlite": sqlite3.sqlite_version,
        },
    }
    if "throughput" in args.only:
        results["throughput"] = run_throughput(jobs)
    if "huey" in args.only:
        results["huey"] = run_huey(jobs)
    if "latency" in args.only:
        submissions = QUICK_LATENCY_SUBMISSIONS if args.quick else FULL_LATENCY_SUBMISSIONS
        results["latency"] = run_latency(submissions)
    if "scale" in args.only:
        results["scale"] = run_scale(QUICK_SIZES if args.quick else FULL_SIZES)
    if "fanout" in args.only:
        events = QUICK_FAN_OUT_EVENTS if args.quick else FULL_FAN_OUT_EVENTS
        results["fanout"] = run_fan_out(events)
    rows = table_rows(results)
    results["goals"] = [
        {"figure": figure.strip(), "value": value, "goal": goal, "verdict": outcome}
        for figure, value, goal, outcome in rows
        if outcome
    ]
    print_table(results, rows)
    print(f"\nwritten to {write_results(results).relative_to(REPO_ROOT)}")
    return 0
