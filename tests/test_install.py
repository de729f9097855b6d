"""The production install: `init --system` writes the config systemd/jobwarden.service expects,
the unit and that config agree, a refused config exits with the status the unit does not
restart on, and `backup` copies a running daemon's database into one a daemon can serve."""

from __future__ import annotations

import stat
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from jobwarden.cli.server import default_config_text, system_config_text
from jobwarden.config import SYSTEM_CONFIG, load_config, load_config_text
from jobwarden.process.supervisor import STOP_AFTER_GRACE
from tests.process import REPO_ROOT, DaemonFactory, daemon_factory, run_jobwarden

UNIT = REPO_ROOT / "systemd" / "jobwarden.service"


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[DaemonFactory]:
    yield from daemon_factory(tmp_path)


def unit_settings() -> dict[str, list[str]]:
    """Every `Key=value` of the unit, a key's values in order (a key may repeat)."""
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def test_init_system_writes_the_production_config(tmp_path):
    result = run_jobwarden("init", "--system", "etc/jobwarden", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    written = tmp_path / "etc" / "jobwarden" / "config.toml"
    assert f"wrote {written}" in result.stdout
    assert "useradd --system" in result.stdout

    config = load_config(written)
    assert config.path(config.store.path) == Path("/var/lib/jobwarden/jobwarden.db")
    assert config.path(config.admin.socket) == Path("/run/jobwarden/admin.sock")
    assert config.admin.group == "jobwarden"
    # The rest is the embedded default's, comments included: one text, three settings changed.
    default = load_config_text(default_config_text(), base_dir=written.parent)
    assert msgspec.structs.replace(config, store=default.store, admin=default.admin) == default
    changed = [
        (ours, theirs)
        for ours, theirs in zip(
            written.read_text().splitlines(), default_config_text().splitlines(), strict=True
        )
        if ours != theirs
    ]
    assert [ours.split(" = ")[0] for ours, _ in changed[1:]] == ["path", "socket", "group"]
    assert changed[3][0].endswith("# a group name makes the socket 0660 for that group")


def test_the_unit_and_the_production_config_agree():
    settings = unit_settings()
    config = load_config_text(system_config_text(), base_dir=SYSTEM_CONFIG.parent)
    state = Path("/var/lib") / settings["StateDirectory"][0]
    runtime = Path("/run") / settings["RuntimeDirectory"][0]

    assert settings["ExecStart"] == [
        f"/opt/jobwarden/.venv/bin/jobwarden serve --config {SYSTEM_CONFIG}"
    ]
    assert config.path(config.store.path).parent == state
    assert settings["WorkingDirectory"] == [str(state)]
    assert config.path(config.admin.socket).parent == runtime
    assert settings["Group"] == [config.admin.group]
    # systemd's stop timeout covers the default drain without asking for more.
    [timeout_stop] = settings["TimeoutStopSec"]
    assert int(timeout_stop) >= config.daemon.shutdown_grace + STOP_AFTER_GRACE


def test_a_refused_config_exits_with_the_status_systemd_does_not_restart(tmp_path):
    bad = tmp_path / "config.toml"
    bad.write_text("[daemon]\nmax_concurrent_jobs = 'many'\n")

    result = run_jobwarden("serve", "--config", str(bad), cwd=tmp_path)

    assert "daemon.max_concurrent_jobs" in result.stderr
    assert unit_settings()["RestartPreventExitStatus"] == [str(result.returncode)]
    assert result.returncode == 2


def test_backup_copies_a_running_daemons_database(daemons, tmp_path):
    daemon = daemons()
    with daemon.client() as client:
        ids = [client.call("submit", kind="quick", payload={})["job"]["id"] for _ in range(3)]
    copy = tmp_path / "backup.db"

    result = run_jobwarden("backup", str(copy), "--config", str(daemon.config_path), cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    assert f"to {copy}" in result.stdout
    assert stat.S_IMODE(copy.stat().st_mode) == 0o600
    # Restoring is serving the copy: a daemon started on it has every job.
    restored = daemons(name="restored", start=False)
    restored.db_path.parent.mkdir(parents=True)
    copy.rename(restored.db_path)
    restored.start()
    with restored.client() as client:
        listed = client.call("jobs")["jobs"]
    assert sorted(job["id"] for job in listed) == ids


def test_backup_refuses_a_taken_name_and_a_missing_database(daemons, tmp_path):
    daemon = daemons(start=False)
    taken = tmp_path / "taken.db"
    taken.write_text("keep me")

    result = run_jobwarden("backup", str(taken), "--config", str(daemon.config_path), cwd=tmp_path)
    assert result.returncode == 2
    assert "exists already" in result.stderr
    assert taken.read_text() == "keep me"

    # The daemon never ran: its directory is there, its database is not. That is said, and
    # neither an empty database at its path nor a copy is left behind.
    daemon.db_path.parent.mkdir(parents=True)
    copy = tmp_path / "copy.db"
    result = run_jobwarden("backup", str(copy), "--config", str(daemon.config_path), cwd=tmp_path)
    assert result.returncode == 2
    assert f"cannot copy {daemon.db_path}" in result.stderr
    assert not daemon.db_path.exists()
    assert not copy.exists()
