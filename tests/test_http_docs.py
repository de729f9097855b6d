"""docs/http-api.md's curl examples, run as written, in order, against a real daemon: each
must exit 0 and get the status its first line names (`# → 202`)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import tomllib
from pathlib import Path

from tests.process import REPO_ROOT, daemon_factory, run_jobwarden

DOC = REPO_ROOT / "docs" / "http-api.md"
BLOCK = re.compile(r"```sh\n# → (\d{3})\n(.*?)```", re.DOTALL)


def examples() -> list[tuple[int, str]]:
    return [(int(status), script) for status, script in BLOCK.findall(DOC.read_text())]


def test_the_docs_have_an_example_of_each_kind_of_answer():
    statuses = [status for status, _ in examples()]
    assert len(statuses) == len(re.findall(r"```sh\n", DOC.read_text())), "a block lacks # →"
    assert {200, 201, 202, 400, 401, 403, 405} <= set(statuses)


def shipped_storybook() -> dict:
    """The shipped config's demo storybook kind and its services, with the simulated
    providers made quick and reliable: a book of one page takes about a second."""
    shipped = tomllib.loads((REPO_ROOT / "config.toml").read_text())
    storybook = shipped["kinds"]["storybook"]
    for service in storybook["options"].values():
        service.update(latency="100ms", failure_rate=0.0)
    return {"services": shipped["services"], "kinds": {"storybook": storybook}}


def test_the_curl_examples_run_as_written(tmp_path: Path):
    for daemons in daemon_factory(tmp_path):
        daemon = daemons(shipped_storybook())
        config = ["--config", str(daemon.config_path)]
        user = run_jobwarden("users", "add", "alice", "--json", *config, cwd=daemon.directory)
        operator = run_jobwarden(
            "tokens", "add", "--operator", "ci", "--json", *config, cwd=daemon.directory
        )
        env = {
            **os.environ,
            "JW": f"http://127.0.0.1:{daemon.logs('jobwarden ready')[-1]['http_port']}",
            "TOKEN": _field(user.stdout, "token"),
            "OPERATOR_TOKEN": _field(operator.stdout, "secret"),
        }
        for status, script in examples():
            ran = subprocess.run(
                ["bash", "-euo", "pipefail", "-c", script],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert ran.returncode == 0, (script, ran.stderr)
            assert ran.stdout.startswith(f"HTTP/1.1 {status} "), (script, ran.stdout)


def _field(text: str, name: str) -> str:
    return json.loads(text)[name]
