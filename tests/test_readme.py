"""The README's quickstart stays true: every `jobwarden` command it shows is one the CLI takes,
the output shown for `jobwarden init` is what it prints, and the page stays within 300 lines
(the rest belongs in docs/)."""

from __future__ import annotations

import re
import shlex

import pytest

from jobwarden.cli import build_parser
from tests.process import REPO_ROOT, run_jobwarden

README = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
# Where the README's quickstart runs: the directory its outputs name.
QUICKSTART_DIR = "/home/you/jw"


def console_blocks() -> list[list[str]]:
    return [block.splitlines() for block in re.findall(r"```console\n(.*?)```", README, re.S)]


def shown_commands() -> list[str]:
    """Each `$ jobwarden ...` line of the README, and each one inside `$(...)`."""
    commands = []
    for block in console_blocks():
        for line in block:
            if not line.startswith("$ "):
                continue
            command = line[2:].split("  #")[0].strip()
            commands += re.findall(r"\$\((jobwarden [^)]*)\)", command)
            if command.startswith("jobwarden "):
                commands.append(command)
    return commands


def test_the_readme_stays_short():
    assert len(README.splitlines()) <= 300


@pytest.mark.parametrize("command", shown_commands())
def test_every_command_the_readme_shows_parses(command):
    build_parser().parse_args(shlex.split(command)[1:])


def test_the_readme_shows_what_init_prints(tmp_path):
    (block,) = [
        block for block in console_blocks() if "$ mkdir ~/jw && cd ~/jw && jobwarden init" in block
    ]
    start = block.index("$ mkdir ~/jw && cd ~/jw && jobwarden init") + 1
    shown = block[start : block.index("$ jobwarden serve")]

    printed = run_jobwarden("init", cwd=tmp_path)

    assert printed.returncode == 0, printed
    assert printed.stdout.replace(str(tmp_path.resolve()), QUICKSTART_DIR).splitlines() == shown
