"""How a subcommand ends: its exit status, and the one line that says why it failed.

Every subcommand returns one of these statuses or raises; `finish` is the one place that turns
whatever a subcommand raises into a line on stderr (and, with `--json`, one JSON object on stdout
shaped like a control-socket error reply) and a status. No command ends in a traceback: an error
no one foresaw is still one line, and `PROJECTORD_TRACEBACK=1` shows where it came from.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import psycopg

from projectord.config import ConfigError
from projectord.database import describe_error
from projectord.embedded import EmbeddedError, EmbeddedUnavailable
from projectord.projection import ProjectionError
from projectord.upcasting import UpcastingError

EXIT_OK = 0  # done
EXIT_FAILED = 1  # the operation failed, was refused, or timed out
EXIT_USAGE = 2  # invalid configuration or usage: nothing started
EXIT_NO_DAEMON = 3  # no daemon answers on the control socket (operator subcommands)
EXIT_INTERRUPTED = 130  # Ctrl-C, as a shell reports it

# `health`: one status per verdict, so a probe can tell degraded from failing (CONTRACT.md).
HEALTH_EXIT = {"ok": 0, "degraded": 1, "failing": 2}

# The `code` of a `--json` error reply when nothing more precise is known.
ERROR_CODES = {EXIT_FAILED: "failed", EXIT_USAGE: "usage", EXIT_NO_DAEMON: "no_daemon"}

EXIT_STATUS_HELP = """\
exit statuses:
  0  done
  1  the operation failed, was refused, or timed out
  2  invalid configuration or usage: nothing was started
  3  no daemon answers on the control socket (status, health, pause, resume, skip, rebuild)"""

HEALTH_EXIT_HELP = """\
exit statuses:
  0  ok
  1  degraded: working, with reasons to look
  2  failing: a projection or the daemon needs an operator
  3  no daemon answers on the control socket
  (a configuration error also exits 2, with one line naming the key)"""

ENVIRONMENT_HELP = """\
environment:
  PROJECTORD_CONFIG        the TOML file, when --config is not given
  PROJECTORD_<KEY>         any configuration key, e.g. PROJECTORD_DATABASE_URL or
                           PROJECTORD_STATE_DIR (a flag overrides it; it overrides the file)
  PROJECTORD_TRACEBACK=1   show the traceback of an unexpected error"""


class CommandError(Exception):
    """A failure to report as one line, with an exit status and, for `--json`, a code."""

    def __init__(self, message: str, status: int = EXIT_FAILED, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code or ERROR_CODES.get(status, "failed")


def finish(args: argparse.Namespace) -> int:
    """Run the chosen subcommand's handler and return its exit status; any failure is printed
    as one line instead of a traceback."""
    try:
        return int(args.handler(args))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`| head`): nothing more can be said on stdout, nor should be.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED
    except Exception as exc:
        if os.environ.get("PROJECTORD_TRACEBACK") == "1":
            raise
        error = as_command_error(exc)
    if getattr(args, "json", False):
        reply = {"ok": False, "error": {"code": error.code, "message": str(error)}}
        print(json.dumps(reply))
    print(f"projectord: {error}", file=sys.stderr)
    return error.status


def as_command_error(exc: BaseException) -> CommandError:
    """What to tell the operator about `exc`."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]  # a task group's wrapping says nothing to an operator
    if isinstance(exc, CommandError):
        return exc
    if isinstance(exc, ConfigError):
        return CommandError(f"invalid configuration: {exc}", EXIT_USAGE)
    if isinstance(exc, (ProjectionError, UpcastingError, EmbeddedUnavailable)):
        return CommandError(str(exc), EXIT_USAGE)
    if isinstance(exc, EmbeddedError):
        return CommandError(f"cannot start the embedded Postgres: {exc}")
    if isinstance(exc, psycopg.Error):
        return CommandError(f"database error: {describe_error(exc)}")
    return CommandError(
        f"{type(exc).__name__}: {describe_error(exc)} (PROJECTORD_TRACEBACK=1 shows where)",
        code="internal_error",
    )
