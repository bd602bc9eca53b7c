"""How an operator subcommand talks to the daemon: one request over the control socket, whose
failures become `CommandError`s with the operator statuses (3 no daemon answers, 1 the daemon
refused)."""

from __future__ import annotations

import argparse
from typing import Any

from projectord.cli.configuration import settings_from_args
from projectord.cli.exits import EXIT_FAILED, EXIT_NO_DAEMON, CommandError
from projectord.control.client import ControlClient, ControlError, NoDaemon


def control_client(args: argparse.Namespace) -> ControlClient:
    """A client for the socket the configuration names (the same one the daemon binds)."""
    return ControlClient(settings_from_args(args).socket_path())


def ask(client: ControlClient, operation: str, **request_args: Any) -> Any:
    """The result of one control-socket operation, or a `CommandError` saying why not."""
    try:
        return client.request(operation, **request_args)
    except NoDaemon as exc:
        raise CommandError(str(exc), EXIT_NO_DAEMON) from None
    except ControlError as exc:
        raise CommandError(exc.message, EXIT_FAILED, code=exc.code) from None
