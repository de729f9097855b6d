"""Shell completion: `jobwarden completion bash|zsh|fish` prints a script, made by shtab from
the parser itself, so it knows every command and option as this version has them. The script
is static: completing costs the shell nothing, and jobwarden loads nothing for it at start-up.
"""

from __future__ import annotations

import argparse

from jobwarden.cli.arguments import Subcommands, subcommand
from jobwarden.cli.output import EXIT_OK

# Where each shell looks for a completion script, for the command's --help.
INSTALL = {
    "bash": "~/.local/share/bash-completion/completions/jobwarden",
    "zsh": "a directory on $fpath, as _jobwarden (e.g. ~/.zfunc/_jobwarden)",
    "fish": "~/.config/fish/completions/jobwarden.fish",
}
# Options and arguments that name a file or a directory, by their dest.
FILES = ("config", "socket", "path")
DIRECTORIES = ("directory", "out")


def add_commands(commands: Subcommands) -> None:
    completion = subcommand(
        commands, "completion", _completion, "print the shell completion script for jobwarden"
    )
    completion.add_argument(
        "shell", choices=tuple(INSTALL), metavar="SHELL", help="bash, zsh or fish"
    )
    completion.epilog = "Save it where your shell looks: " + "; ".join(
        f"{shell}: {where}" for shell, where in INSTALL.items()
    )


def _completion(args: argparse.Namespace) -> int:
    # Imported here: only this command needs shtab, or the parser it describes.
    import shtab

    from jobwarden.cli import build_parser

    parser = build_parser()
    _complete_paths(parser, shtab.FILE, shtab.DIRECTORY)
    print(shtab.complete(parser, shell=args.shell), end="")
    return EXIT_OK


def _complete_paths(
    parser: argparse.ArgumentParser, files: dict[str, str], directories: dict[str, str]
) -> None:
    """Mark every argument that names a path, in every subcommand, for shtab."""
    for action in parser._actions:
        if action.dest in FILES:
            action.complete = files  # type: ignore[attr-defined]
        elif action.dest in DIRECTORIES:
            action.complete = directories  # type: ignore[attr-defined]
        if isinstance(action, argparse._SubParsersAction):
            for subparser in action.choices.values():
                _complete_paths(subparser, files, directories)
