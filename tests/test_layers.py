"""The layers import one way, and SQL lives in the store only.

Layers, bottom to top: the wire; the base modules (clock, config, errors, ...); the store; the
actors; the process (supervisor and listeners); then the client, the CLI and the tools. A module
may import its own layer and the layers below it, never one above. The client is a library for
applications, so it imports only the wire and the base. The package's public face
(`from jobwarden import JobContext, ...`) is for handlers and tools, not for the layers below it.

Each rule is checked twice: on the real tree, and on a small module written to break it, so a
checker that silently finds nothing fails too.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

import jobwarden

ROOT = Path(__file__).resolve().parents[1]
# Where each part of the import name lives on disk (pyproject's package-dir).
FOLDERS = {"jobwarden": ROOT / "daemon", "jobwarden.actors": ROOT / "actors"}

BASE = ("clock", "config", "errors", "hub", "logs", "mailbox", "metrics", "system")
LAYERS = {
    "wire": 0,
    **dict.fromkeys(BASE, 1),
    "store": 2,
    "actors": 3,
    "process": 4,
    "client": 5,
    "cli": 5,
    "tools": 5,
}
# The public face sits above every layer: only what the tools and handlers use may import it.
FACE = 5
CLIENT_MAY_IMPORT = {0, 1}
SQL = re.compile(
    r"\b(SELECT\s+\S|INSERT\s+INTO|UPDATE\s+\w+\s+SET|DELETE\s+FROM|CREATE\s+(TABLE|INDEX|UNIQUE)"
    r"|ALTER\s+TABLE|PRAGMA\s+\w)"
)
DRIVERS = {"sqlite3", "psycopg"}


def module_files() -> Iterator[tuple[str, Path]]:
    """(import name, path) of every module of the package."""
    for package, folder in FOLDERS.items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            name = ".".join((package, *parts)).removesuffix(".__init__")
            yield name, path


def layer_of(module: str) -> int | None:
    """The layer of a jobwarden module; None for the package itself (the public face)."""
    parts = module.split(".")
    if parts[0] != "jobwarden":
        raise ValueError(module)
    if len(parts) == 1:
        return None
    return LAYERS[parts[1]]


def imported_modules(source: str) -> Iterator[tuple[int, str, str]]:
    """(line, imported module, imported name or "") for every import, at any depth (imports
    inside functions count: they run too). A relative import comes back as "." plus its text."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, ""
        elif isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            for alias in node.names:
                yield node.lineno, base, alias.name


def wrong_imports(source: str, module: str) -> list[str]:
    """What in `source` (the text of `module`) imports against the layers."""
    own = layer_of(module)
    found = []
    for line, target, name in imported_modules(source):
        if target.startswith("."):
            # The layers are read from absolute names: a relative import would hide one.
            found.append(f"{module}:{line} imports relatively ({target}); name jobwarden")
            continue
        if target.split(".")[0] != "jobwarden":
            continue
        if target == "jobwarden":
            submodule = f"jobwarden.{name}"
            if name.split(".")[0] in LAYERS:
                target = submodule
            elif name == "__version__":
                continue  # a constant, not a layer
            elif own is not None and own < FACE:
                found.append(f"{module}:{line} imports the public face ({name}); import its module")
                continue
            else:
                continue
        theirs = layer_of(target)
        if own is None or theirs is None:
            continue
        if theirs > own:
            found.append(f"{module}:{line} imports {target}, a layer above it")
        elif (
            module.startswith("jobwarden.client")
            and not target.startswith("jobwarden.client")
            and theirs not in CLIENT_MAY_IMPORT
        ):
            found.append(f"{module}:{line} imports {target}: the client takes only wire and base")
    return found


def misplaced_sql(source: str, module: str) -> list[str]:
    """SQL text, or a database driver imported, outside the store."""
    if module.startswith("jobwarden.store"):
        return []
    found = []
    tree = ast.parse(source)
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            # An f-string is read whole, each placeholder standing for a word.
            text = "".join(
                part.value if isinstance(part, ast.Constant) else "x" for part in node.values
            )
            if SQL.search(text):
                found.append(f"{module}:{node.lineno} holds SQL: {text[:60]!r}")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            if id(node) not in docstrings and SQL.search(node.value):
                found.append(f"{module}:{node.lineno} holds SQL: {node.value[:60]!r}")
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            names += [alias.name for alias in getattr(node, "names", [])]
            if any(name.split(".")[0] in DRIVERS for name in names):
                found.append(f"{module}:{node.lineno} imports a database driver")
    return found


def test_every_module_sits_in_a_known_layer():
    names = [name for name, _ in module_files()]
    assert "jobwarden.actors.pool" in names and "jobwarden.store.jobs" in names
    for name in names:
        layer_of(name)  # raises for a top-level module no layer claims


def test_imports_run_one_way():
    found = [
        problem
        for name, path in module_files()
        for problem in wrong_imports(path.read_text(), name)
    ]
    assert found == []


def test_sql_lives_in_the_store_only():
    found = [
        problem
        for name, path in module_files()
        for problem in misplaced_sql(path.read_text(), name)
    ]
    assert found == []


@pytest.mark.parametrize(
    ("module", "source"),
    [
        pytest.param("jobwarden.actors.pool", "from jobwarden.cli import main\n", id="actor-cli"),
        pytest.param(
            "jobwarden.actors.ledger", "from jobwarden.process import admin\n", id="actor-listener"
        ),
        pytest.param(
            "jobwarden.actors.scheduler",
            "def f():\n    from jobwarden.tools import demo\n",
            id="actor-tools-inside-a-function",
        ),
        pytest.param("jobwarden.store.jobs", "import jobwarden.actors.pool\n", id="store-actor"),
        pytest.param("jobwarden.wire.views", "from jobwarden.config import Config\n", id="wire"),
        pytest.param("jobwarden.client", "from jobwarden.store import jobs\n", id="client-store"),
        pytest.param("jobwarden.actors.pool", "from jobwarden import JobContext\n", id="face"),
        pytest.param("jobwarden.store.jobs", "from ..actors import pool\n", id="relative"),
    ],
)
def test_a_wrong_import_is_found(module, source):
    assert wrong_imports(source, module)


@pytest.mark.parametrize(
    ("module", "source"),
    [
        pytest.param(
            "jobwarden.actors.monitor", "from jobwarden.store import monitor\n", id="down"
        ),
        pytest.param("jobwarden.cli", "from jobwarden.process import supervisor\n", id="top"),
        pytest.param("jobwarden.tools.demo", "from jobwarden import JobContext\n", id="face"),
        pytest.param("jobwarden.process.admin", "from jobwarden import __version__\n", id="ver"),
    ],
)
def test_a_right_import_passes(module, source):
    assert wrong_imports(source, module) == []


@pytest.mark.parametrize(
    "source",
    [
        'ROWS = "SELECT id FROM jobs"\n',
        'def f(c):\n    c.execute(f"UPDATE jobs SET status = {1}")\n',
        'def f(c, cols):\n    c.execute(f"SELECT {cols} FROM jobs")\n',
        "import sqlite3\n",
        'Q = """\n    delete from x;\n    DELETE FROM events WHERE seq < ?\n"""\n',
    ],
    ids=["select", "f-string-update", "f-string-select", "driver", "multiline-delete"],
)
def test_stray_sql_is_found(source):
    assert misplaced_sql(source, "jobwarden.actors.ledger")


def test_sql_words_in_docstrings_and_prose_pass():
    source = '"""Select the jobs to run; update their state."""\nMSG = "select a kind"\n'
    assert misplaced_sql(source, "jobwarden.actors.scheduler") == []


def test_the_package_is_the_folders_the_design_names():
    assert Path(jobwarden.__file__).parent == ROOT / "daemon"
