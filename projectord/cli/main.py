"""The `projectord` command line: assembles the subcommands each CLI module registers.

Exit statuses (`projectord.cli.exits`): 0 success; 1 the operation failed (or timed out); 2 invalid
configuration or usage, nothing started; 3 no daemon answers (operator subcommands).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from importlib.metadata import version

from projectord.cli import dead_letters, dispatch, drift, lifecycle, operator, rebuild, versions
from projectord.cli.configuration import configuration_flags
from projectord.cli.exits import ENVIRONMENT_HELP, EXIT_STATUS_HELP, finish
from projectord.cli.subcommands import Subcommands

# In the order `--help` lists them.
MODULES = (lifecycle, operator, rebuild, dispatch, drift, dead_letters, versions)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="projectord",
        description="Keeps event-sourced read models up to date on PostgreSQL.",
        epilog=f"{ENVIRONMENT_HELP}\n\n{EXIT_STATUS_HELP}\n\n"
        "`projectord COMMAND --help` lists a command's flags, one per configuration key.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--version", action="version", version=f"projectord {version('projectord')}"
    )
    action = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    subcommands = Subcommands(action, configuration_flags())
    for module in MODULES:
        module.register(subcommands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return finish(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
