"""The registry each CLI module adds its subcommands to.

`main` creates one `Subcommands` and hands it to every module's `register`; a module adds its own
subcommands (and nested groups such as `drift check`) and never reaches into another module's
parsers, so the order in which modules register does not matter.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from projectord.cli.exits import ENVIRONMENT_HELP, EXIT_STATUS_HELP

Handler = Callable[[argparse.Namespace], int]


class Subcommands:
    def __init__(self, action: Any, configuration: argparse.ArgumentParser) -> None:
        """`action` is what `add_subparsers` returned; `configuration` holds the flags every
        subcommand accepts (`--config`, one per configuration key)."""
        self._action = action
        self._configuration = configuration

    def add(
        self, name: str, handler: Handler, help_: str, *, exit_statuses: str = EXIT_STATUS_HELP
    ) -> argparse.ArgumentParser:
        """A subcommand that runs `handler`; the caller adds its own arguments. Its `--help`
        ends with the environment variables and `exit_statuses`."""
        parser = self._action.add_parser(
            name,
            parents=[self._configuration],
            help=help_,
            description=help_,
            epilog=f"{ENVIRONMENT_HELP}\n\n{exit_statuses}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        parser.set_defaults(handler=handler)
        return parser

    def group(self, name: str, help_: str, dest: str) -> Subcommands:
        """A subcommand with actions of its own (`drift check`, `dead-letters list`)."""
        parser = self._action.add_parser(name, help=help_, description=help_)
        actions = parser.add_subparsers(dest=dest, required=True, metavar="ACTION")
        return Subcommands(actions, self._configuration)
