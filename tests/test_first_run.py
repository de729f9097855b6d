"""A new user's first minutes, as real processes: `jobwarden init` in an empty directory, then
`jobwarden serve` there and `jobwarden status` answering; init never overwriting a config by
accident; what `--version` says; and what a command says when it finds no config."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest

import jobwarden
from jobwarden.config import SYSTEM_CONFIG
from tests.process import REPO_ROOT, DaemonProcess, run_jobwarden

# The default config listens on fixed ports; tests running side by side each take a free one.
FIXED_LISTENERS = ('listen = "127.0.0.1:8766"', 'listen = "127.0.0.1:8765"')


def any_free_port(config: Path) -> None:
    text = config.read_text(encoding="utf-8")
    for listener in FIXED_LISTENERS:
        assert listener in text, f"the default config no longer has {listener}"
        text = text.replace(listener, 'listen = "127.0.0.1:0"')
    config.write_text(text, encoding="utf-8")


def test_init_then_serve_starts_and_status_answers(tmp_path):
    initialized = run_jobwarden("init", cwd=tmp_path)

    assert initialized.returncode == 0, initialized
    config = tmp_path / "config.toml"
    assert config.read_bytes() == (REPO_ROOT / "config.toml").read_bytes()
    for next_step in ("jobwarden check-config", "jobwarden serve", "jobwarden status"):
        assert next_step in initialized.stdout
    assert str(tmp_path.resolve() / "var" / "admin.sock") in initialized.stdout
    assert str(tmp_path.resolve() / "var" / "jobwarden.db") in initialized.stdout

    checked = run_jobwarden("check-config", cwd=tmp_path)
    assert (checked.returncode, checked.stdout) == (0, "ok: 2 kinds (storybook, shell)\n")

    any_free_port(config)
    daemon = DaemonProcess.in_place(tmp_path).start()
    try:
        status = run_jobwarden("status", cwd=tmp_path)

        assert status.returncode == 0, status
        assert f"jobwarden {jobwarden.__version__}, pid {daemon.pid}" in status.stdout
        assert "accepting jobs" in status.stdout
        assert daemon.db_path.exists()
        assert daemon.stop() == 0, daemon.output()
    finally:
        daemon.close()


def test_init_refuses_to_overwrite_a_config_unless_forced(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text("# mine\n", encoding="utf-8")

    refused = run_jobwarden("init", cwd=tmp_path)

    assert refused.returncode == 2
    assert f"{config.name} exists already" in refused.stderr
    assert "--force" in refused.stderr
    assert config.read_text(encoding="utf-8") == "# mine\n"

    forced = run_jobwarden("init", "--force", cwd=tmp_path)

    assert forced.returncode == 0, forced
    assert config.read_bytes() == (REPO_ROOT / "config.toml").read_bytes()


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
