"""A new user's first minutes, as real processes: what `--version` says, and what a command
says when it finds no config."""

from __future__ import annotations

import importlib.metadata

import pytest

import jobwarden
from jobwarden.config import SYSTEM_CONFIG
from tests.process import run_jobwarden


@pytest.mark.skipif(SYSTEM_CONFIG.exists(), reason=f"this machine has {SYSTEM_CONFIG}")
def test_without_a_config_a_command_says_where_it_looked_and_names_init(tmp_path):
    finished = run_jobwarden("status", cwd=tmp_path)

    assert finished.returncode == 2
    places = ["--config PATH", "$JOBWARDEN_CONFIG", "./config.toml", str(SYSTEM_CONFIG)]
    positions = [finished.stderr.find(place) for place in places]
    assert -1 not in positions, finished.stderr
    assert positions == sorted(positions), "the places are listed in the order they are tried"
    assert "jobwarden init" in finished.stderr


def test_version_prints_the_installed_version(tmp_path):
    finished = run_jobwarden("--version", cwd=tmp_path)

    assert (finished.returncode, finished.stdout) == (0, f"jobwarden {jobwarden.__version__}\n")
    assert importlib.metadata.version("jobwarden") == jobwarden.__version__
