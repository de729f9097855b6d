"""The load test: simulated storybook traffic against a daemon run in this process."""

from __future__ import annotations

import argparse

from jobwarden.cli.arguments import (
    Subcommands,
    UsageError,
    fraction,
    positive_int,
    positive_number,
    subcommand,
    whole_number,
)

# As the load test this one replaces did: 3 jobs wedged at the end of hour 1.
INJECTED_STUCK = 3


def add_commands(commands: Subcommands) -> None:
    loadtest = subcommand(
        commands, "loadtest", _loadtest, "the storybook load test on a daemon run in this process"
    )
    loadtest.add_argument(
        "--hours",
        type=positive_number,
        metavar="H",
        help="simulated hours of arrivals (3, or 8 for scenario C)",
    )
    loadtest.add_argument(
        "--jobs-per-hour",
        type=positive_int,
        metavar="N",
        help="books an hour (50, or the scenario's)",
    )
    loadtest.add_argument(
        "--users", type=positive_int, metavar="N", help="simulated users (10, or the scenario's)"
    )
    loadtest.add_argument(
        "--scenario",
        choices=("A", "B", "C"),
        help="a traffic shape: A 10 users, B 100, C 1,000, each with its rate and bursts",
    )
    clock = loadtest.add_mutually_exclusive_group()
    clock.add_argument(
        "--fast", action="store_true", help="virtual time, as fast as this machine allows"
    )
    clock.add_argument(
        "--speed",
        type=positive_number,
        metavar="X",
        help="X simulated seconds per real second, e.g. 100 (default: real time)",
    )
    loadtest.add_argument(
        "--image-failure-rate",
        type=fraction,
        default=0.03,
        metavar="F",
        help="share of image calls that fail (0.03; 0.5 tests a provider mostly down)",
    )
    loadtest.add_argument(
        "--inject-stuck",
        type=whole_number,
        default=INJECTED_STUCK,
        metavar="N",
        help=f"N jobs hang at the end of hour 1, for the monitor to find ({INJECTED_STUCK}; "
        "0: none)",
    )
    loadtest.add_argument(
        "--inject-crash",
        action="store_true",
        help="halfway, stop the daemon without a drain and start it again on the same database",
    )
    loadtest.add_argument("--seed", type=int, default=1, metavar="N", help="for repeatable runs")
    loadtest.add_argument(
        "--daily-volume",
        type=positive_int,
        default=1000,
        metavar="N",
        help="books a day for the monthly projection (1000)",
    )
    loadtest.add_argument(
        "--out", default="var/results", metavar="DIR", help="where the results go (var/results)"
    )


def _loadtest(args: argparse.Namespace) -> int:
    # Imported here: only this command runs a daemon in this process, and loading one is slow.
    from jobwarden.tools.loadtest import loadtest_main

    try:
        return loadtest_main(args)
    except FileExistsError as exc:
        raise UsageError(str(exc)) from None
