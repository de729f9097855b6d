"""What the built wheel ships: one top-level import name, `jobwarden`, and nothing that other
distributions own (`pip install python-daemon` once overwrote our daemon/__init__.py), every
package of the source tree, the embedded default config.toml and py.typed.

The wheel is built offline, from a copy of the source tree, so the build leaves nothing
behind in the repository."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.process import REPO_ROOT

# The folders the import name is mapped onto (pyproject.toml's package-dir).
PACKAGE_FOLDERS = {"daemon": "jobwarden", "actors": "jobwarden/actors"}
NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".venv*", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", "var"
)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[zipfile.ZipFile]:
    scratch = tmp_path_factory.mktemp("wheel")
    source = scratch / "source"
    # symlinks=True: the wheel must be built from the tree as it is, links and all.
    shutil.copytree(REPO_ROOT, source, ignore=NOT_SOURCE, symlinks=True)
    # Offline and with the venv's own setuptools: no index, no isolated build environment.
    offline = ["--no-deps", "--no-build-isolation", "--no-index", "--quiet"]
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", *offline, "-w", str(scratch / "out"), str(source)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    (built,) = (scratch / "out").glob("jobwarden-*.whl")
    with zipfile.ZipFile(built) as archive:
        yield archive


def test_the_wheel_installs_one_import_name_jobwarden(wheel):
    top_level = {name.split("/")[0] for name in wheel.namelist()}

    assert {name for name in top_level if not name.endswith(".dist-info")} == {"jobwarden"}


def test_the_wheel_has_every_package_of_the_source_tree(wheel):
    packages = {
        str(Path(PACKAGE_FOLDERS[folder], init.parent.relative_to(REPO_ROOT / folder)))
        for folder in PACKAGE_FOLDERS
        for init in (REPO_ROOT / folder).rglob("__init__.py")
    }

    shipped = {str(Path(name).parent) for name in wheel.namelist() if name.endswith("/__init__.py")}
    assert packages - shipped == set()


def test_the_wheel_ships_the_default_config_and_py_typed(wheel):
    assert wheel.read("jobwarden/config.toml") == (REPO_ROOT / "config.toml").read_bytes()
    assert "jobwarden/py.typed" in wheel.namelist()


def test_the_wheel_names_the_jobwarden_command(wheel):
    (entry_points,) = [name for name in wheel.namelist() if name.endswith("/entry_points.txt")]

    assert "jobwarden = jobwarden.cli:main" in wheel.read(entry_points).decode()


def test_the_wheel_ships_every_file_of_the_dashboard(wheel):
    ui = REPO_ROOT / "daemon" / "process" / "http" / "ui"
    files = {str(path.relative_to(ui)) for path in ui.rglob("*") if path.is_file()}
    assert {"index.html", "app.js", "app.css", "pages/job.js"} <= files

    for name in files:
        shipped = wheel.read(f"jobwarden/process/http/ui/{name}")
        assert shipped == (ui / name).read_bytes(), name
