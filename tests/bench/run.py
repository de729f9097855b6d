"""Run the benchmarks: `python tests/bench/run.py [--quick] [--only SECTION ...]`.

Prints a table of figures next to their goals and writes tests/bench/results/<date>.json.
Started by a Python without jobwarden's dependencies, it re-runs itself with the repository's
.venv; the suite imports the repository as a package, so the repository root goes on the path.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
VENV_PYTHON = REPO_ROOT / ".venv" / "bin" / "python"


def main() -> int:
    if importlib.util.find_spec("trio") is None and VENV_PYTHON.exists():
        os.execv(VENV_PYTHON, [str(VENV_PYTHON), __file__, *sys.argv[1:]])
    sys.path.insert(0, str(REPO_ROOT))
    from tests.bench.suite import main as run_suite

    return run_suite(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
