"""What plugs into Prometheus and Grafana: a real scrape passes `promtool check metrics`, the
alert rules fire as documented (`promtool test rules`), and every query of the shipped
dashboard and alert rules names a metric the daemon exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from jobwarden.config import load_config_text
from jobwarden.errors import AdminError
from jobwarden.metrics import Metrics
from tests.process import REPO_ROOT, DaemonFactory, daemon_factory

pytestmark = pytest.mark.both_stores

DASHBOARD = REPO_ROOT / "docs" / "grafana" / "jobwarden.json"
ALERTS = REPO_ROOT / "docs" / "prometheus" / "alerts.yml"
ALERT_TESTS = REPO_ROOT / "tests" / "alerts_test.yml"
# Names Prometheus makes itself: `up` is 0 when a scrape fails.
PROMETHEUS_OWN = {"up"}
METRIC = re.compile(r"\b(?:jobwarden|process)_[a-z_]+\b|\bup\b")
# The sample names a family of each type exposes.
SUFFIXES = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum"),
    "summary": ("", "_count", "_sum"),
}

needs_promtool = pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="promtool is not installed (Debian's prometheus package has it; .ci/run installs it)",
)


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[DaemonFactory]:
    yield from daemon_factory(tmp_path)


def exported_names() -> set[str]:
    """Every sample name the daemon's registry can expose, series present or not yet."""
    metrics = Metrics()
    metrics.declare(load_config_text(""))
    return {
        family.name + suffix
        for family in metrics.registry.collect()
        for suffix in SUFFIXES[family.type]
    }


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [
        target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])
    ]
    queries += [
        variable["definition"]
        for variable in dashboard["templating"]["list"]
        if variable["type"] == "query"
    ]
    return queries


def alert_expressions() -> list[str]:
    """The `expr` of every rule: one line after `expr:`, or the indented block after `|`."""
    expressions: list[str] = []
    lines = ALERTS.read_text().splitlines()
    for number, line in enumerate(lines):
        key, _, value = line.strip().partition(":")
        if key != "expr":
            continue
        if value.strip() != "|":
            expressions.append(value.strip())
            continue
        indent = len(line) - len(line.lstrip())
        block = []
        for following in lines[number + 1 :]:
            if following.strip() and len(following) - len(following.lstrip()) <= indent:
                break
            block.append(following.strip())
        expressions.append(" ".join(block).strip())
    return expressions


def test_every_dashboard_query_names_a_metric_the_daemon_exports():
    exported = exported_names() | PROMETHEUS_OWN
    panels = [p for p in json.loads(DASHBOARD.read_text())["panels"] if p["type"] != "row"]
    assert all(panel["targets"] for panel in panels)
    queries = dashboard_queries()
    assert len(queries) > len(panels)

    unknown = {name for query in queries for name in METRIC.findall(query)} - exported
    assert unknown == set()
    assert [query for query in queries if not METRIC.search(query)] == []


def test_every_alert_names_a_metric_the_daemon_exports():
    expressions = alert_expressions()
    assert len(expressions) == 6

    exported = exported_names() | PROMETHEUS_OWN
    unknown = {name for expr in expressions for name in METRIC.findall(expr)} - exported
    assert unknown == set()
    assert [expr for expr in expressions if not METRIC.search(expr)] == []


@needs_promtool
def test_the_alert_rules_fire_as_documented():
    result = subprocess.run(
        ["promtool", "test", "rules", str(ALERT_TESTS)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_a_real_scrape_passes_promtool_check_metrics(daemons):
    daemon = daemons(
        {
            "services": {"paid": {"price_usd": 0.5}},
            "kinds": {"caller": {"handler": "tests.handlers:call_service"}},
        }
    )
    with daemon.client() as client:
        # Series of every type with samples in them: done and failed jobs (counters, the
        # duration histogram, a failure code), spend, a refused submission.
        jobs = [
            client.call("submit", kind="quick", payload={}),
            client.call("submit", kind="quick", payload={"fail": True}),
            client.call("submit", kind="caller", payload={"service": "paid", "seconds": 0}),
        ]
        with pytest.raises(AdminError, match="unknown kind"):
            client.call("submit", kind="nope", payload={})
    submitted = {job["job"]["id"] for job in jobs}
    for job_id in submitted:
        daemon.wait_for_log(
            lambda line, job_id=job_id: (
                line.get("job") == job_id and line.get("event") == "job finished"
            )
        )
    port = daemon.logs("jobwarden ready")[-1]["http_port"]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        scrape = response.read()
    assert b'jobwarden_jobs_failed_total{code="TEST_FAILURE",kind="quick"} 1.0' in scrape
    assert b"process_resident_memory_bytes" in scrape

    result = subprocess.run(
        ["promtool", "check", "metrics"], input=scrape, capture_output=True, check=False
    )

    assert (result.returncode, result.stdout + result.stderr) == (0, b"")
