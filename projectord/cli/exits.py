"""How a subcommand ends: its exit status, and the one line that says why it failed.

Every subcommand returns one of these statuses or raises `CommandError`; `finish` is the one place
that turns the errors a subcommand may raise into a line on stderr and a status, so no command
ends in a traceback and every command means the same by the same number.
"""

from __future__ import annotations

import argparse
import sys

from projectord.config import ConfigError
from projectord.embedded import EmbeddedError, EmbeddedUnavailable
from projectord.projection import ProjectionError

EXIT_OK = 0  # done
EXIT_FAILED = 1  # the operation failed, was refused, or timed out
EXIT_USAGE = 2  # invalid configuration or usage: nothing started
EXIT_NO_DAEMON = 3  # no daemon answers on the control socket (operator subcommands)
EXIT_INTERRUPTED = 130  # Ctrl-C, as a shell reports it

# `health`: one status per verdict, so a probe can tell degraded from failing (CONTRACT.md).
HEALTH_EXIT = {"ok": 0, "degraded": 1, "failing": 2}


class CommandError(Exception):
    """A failure to report as one line, with an exit status."""

    def __init__(self, message: str, status: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.status = status


def finish(args: argparse.Namespace) -> int:
    """Run the chosen subcommand's handler and return its exit status; a known failure is printed
    as one line on stderr instead of a traceback."""
    try:
        return int(args.handler(args))
    except ConfigError as exc:
        return _report(f"invalid configuration: {exc}", EXIT_USAGE)
    except (ProjectionError, EmbeddedUnavailable) as exc:
        return _report(str(exc), EXIT_USAGE)
    except EmbeddedError as exc:
        return _report(f"cannot start the embedded Postgres: {exc}", EXIT_FAILED)
    except CommandError as exc:
        return _report(str(exc), exc.status)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def _report(message: str, status: int) -> int:
    print(f"projectord: {message}", file=sys.stderr)
    return status
