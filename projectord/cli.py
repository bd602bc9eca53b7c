"""The `projectord` command line.

Exit statuses: 0 success; 1 the operation failed (or timed out); 2 invalid configuration or usage,
nothing started; 3 no daemon answers (operator commands).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
from psycopg import AsyncConnection

from projectord.bootstrap import bootstrap
from projectord.catch_up import wait_for_projections
from projectord.config import ConfigError, Settings, load_settings
from projectord.database import connect, describe_error, redact
from projectord.dead_letters_cli import add_dead_letter_commands
from projectord.dispatch_cli import add_dispatch_command
from projectord.drift_cli import add_drift_commands
from projectord.embedded import (
    EMBEDDED_URL,
    EmbeddedError,
    EmbeddedUnavailable,
    embedded_database,
)
from projectord.foreign_owner import ForeignOwnerError, refused_projections
from projectord.logs import configure_logging
from projectord.operator_cli import add_operator_commands
from projectord.projection import Projection, ProjectionError, load_projections
from projectord.queries import Queries
from projectord.upcasting import UpcastingError, install, load_upcasters

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NO_DAEMON = 0, 1, 2, 3


class CommandError(Exception):
    """A failure to report as one line, with an exit status."""

    def __init__(self, message: str, status: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.status = status


def _settings_parent() -> argparse.ArgumentParser:
    """Flags every command accepts; each overrides the environment and the TOML file."""
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("configuration")
    group.add_argument("--config", type=Path, help="TOML configuration file")
    group.add_argument(
        "--database-url", help='libpq URL or DSN, or "embedded" for a private embedded Postgres'
    )
    group.add_argument(
        "--embedded",
        action="store_true",
        help='use a private embedded Postgres in state_dir (database_url = "embedded")',
    )
    group.add_argument("--projections", help="comma-separated module:attr list")
    group.add_argument("--aggregates", help="comma-separated module:attr list (command side)")
    group.add_argument("--upcasters", help="comma-separated module:attr list (event upcasters)")
    group.add_argument("--schema", help="schema of projectord's own tables")
    group.add_argument("--read-model-schema", help="schema of the projections' tables")
    group.add_argument("--control-socket", type=Path)
    group.add_argument("--state-dir", type=Path)
    group.add_argument("--batch-size", type=int)
    group.add_argument("--poll-interval", type=float)
    group.add_argument("--log-format", choices=["auto", "json", "console"])
    group.add_argument("--log-level")
    return parent


SETTING_FLAGS = (
    "database_url",
    "projections",
    "aggregates",
    "upcasters",
    "schema",
    "read_model_schema",
    "control_socket",
    "state_dir",
    "batch_size",
    "poll_interval",
    "log_format",
    "log_level",
)


def settings_from_args(args: argparse.Namespace) -> Settings:
    overrides = {key: getattr(args, key, None) for key in SETTING_FLAGS}
    if getattr(args, "embedded", False):
        if overrides["database_url"] not in (None, EMBEDDED_URL):
            raise ConfigError("database_url: --embedded and --database-url are both given")
        overrides["database_url"] = EMBEDDED_URL
    return load_settings(args.config, **overrides)


def build_parser() -> argparse.ArgumentParser:
    parent = _settings_parent()
    parser = argparse.ArgumentParser(
        prog="projectord", description="Keeps event-sourced read models up to date on PostgreSQL."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, handler: Callable[[argparse.Namespace], int], help_: str) -> Any:
        sub = commands.add_parser(name, parents=[parent], help=help_, description=help_)
        sub.set_defaults(handler=handler)
        return sub

    add("init", cmd_init, "create or upgrade the schema objects and missing projection tables")
    add("run", cmd_run, "run the daemon in the foreground")
    wait = add("wait", cmd_wait, "block until projections applied every event committed before")
    wait.add_argument("names", nargs="*", metavar="NAME")
    wait.add_argument("--timeout", type=float, default=60.0, help="seconds (default 60)")
    demo = add("demo", cmd_demo, "the main job end to end (on an embedded Postgres by default)")
    demo.add_argument("--duration", type=float, default=20.0, help="seconds of writing (20)")
    demo.add_argument("--writers", type=int, default=8, help="concurrent writers (8)")
    add_operator_commands(add)
    add_dispatch_command(add)
    add_drift_commands(add, commands, parent)
    add_dead_letter_commands(commands, parent)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args))
    except ConfigError as exc:
        print(f"projectord: invalid configuration: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (ProjectionError, UpcastingError, EmbeddedUnavailable) as exc:
        print(f"projectord: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except EmbeddedError as exc:
        print(f"projectord: cannot start the embedded Postgres: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except CommandError as exc:
        print(f"projectord: {exc}", file=sys.stderr)
        return exc.status
    except KeyboardInterrupt:
        return 130


def load(args: argparse.Namespace) -> tuple[Settings, list[Projection]]:
    """Settings and projections, both checked before anything starts; the configured upcasters
    installed before any event is decoded."""
    settings = settings_from_args(args)
    configure_logging(settings.log_format, settings.log_level)
    install(load_upcasters(settings.upcasters))
    return settings, load_projections(settings.projections)


MISSING_DATABASE_URL = (
    "database_url is not set: set it to a libpq URL (PROJECTORD_DATABASE_URL, --database-url or "
    'the config file), or to "embedded" (--embedded) for a private embedded Postgres in state_dir'
)


def require_database_url(settings: Settings) -> str:
    """The configured `database_url`. An unset one is a configuration error rather than a cue to
    start a server: a line missing from an env file must not quietly give a daemon its own empty
    database."""
    if not settings.database_dsn:
        raise CommandError(MISSING_DATABASE_URL, EXIT_USAGE)
    return settings.database_dsn


@asynccontextmanager
async def database(settings: Settings) -> AsyncIterator[str]:
    """The DSN to use: `database_url`, or with `database_url = "embedded"` the embedded Postgres
    in `state_dir`, which this process starts (and stops again on exit) unless one already runs
    there."""
    url = require_database_url(settings)
    if url != EMBEDDED_URL:
        yield url
        return
    async with embedded_database(settings.state_dir) as dsn:
        yield dsn


async def open_connection(dsn: str) -> AsyncConnection[Any]:
    """An autocommit connection for a command, or a one-line `CommandError` saying why not."""
    try:
        return await connect(dsn, autocommit=True, connect_timeout=10)
    except Exception as exc:
        raise CommandError(
            f"cannot connect to the database ({redact(dsn)}): {describe_error(exc, dsn)}"
        ) from None


def cmd_init(args: argparse.Namespace) -> int:
    settings, projections = load(args)

    async def init() -> tuple[list[str], list[ForeignOwnerError]]:
        async with database(settings) as dsn:
            async with await open_connection(dsn) as conn:
                try:
                    created = await bootstrap(conn, settings, projections)
                    refused = await refused_projections(
                        conn, Queries(settings.schema), settings.read_model_schema, projections
                    )
                except Exception as exc:
                    raise CommandError(f"init failed: {describe_error(exc, dsn)}") from None
        return created, refused

    created, refused = anyio.run(init)
    for item in created:
        print(f"created {item}")
    print("schema is up to date" if not created else f"{len(created)} change(s) applied")
    for error in refused:
        print(f"projectord: {error}", file=sys.stderr)
    return EXIT_FAILED if refused else EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from projectord.daemon import Daemon, StartupError
    from projectord.systemd import SystemdNotifier

    settings, projections = load(args)
    require_database_url(settings)
    if not projections:
        raise CommandError(
            "no projections configured: set projections (PROJECTORD_PROJECTIONS, --projections "
            "or the config file) to the read models this daemon keeps",
            EXIT_USAGE,
        )
    # Taken from the environment before an embedded Postgres starts, so it does not inherit it.
    notifier = SystemdNotifier.from_environment()

    async def run() -> None:
        async with database(settings) as dsn:
            daemon = Daemon(
                settings,
                projections,
                dsn,
                notifier=notifier,
                reload_settings=lambda: settings_from_args(args),
            )
            try:
                await daemon.run()
            except StartupError as exc:
                raise CommandError(str(exc), exc.status) from None

    anyio.run(run)
    return EXIT_OK


def cmd_wait(args: argparse.Namespace) -> int:
    settings, projections = load(args)
    by_name = {p.name: p for p in projections}
    unknown = [n for n in args.names if n not in by_name]
    if unknown:
        raise CommandError(f"unknown projection(s): {', '.join(unknown)}", EXIT_USAGE)
    chosen = [by_name[n] for n in args.names] if args.names else projections

    async def wait() -> bool:
        async with database(settings) as dsn:
            conn = await connect(dsn, autocommit=True, connect_timeout=10)
            async with conn:
                return await wait_for_projections(
                    conn, Queries(settings.schema), chosen, timeout=args.timeout
                )

    if anyio.run(wait):
        return EXIT_OK
    print("projectord: timed out waiting for projections", file=sys.stderr)
    return EXIT_FAILED


def cmd_demo(args: argparse.Namespace) -> int:
    from projectord.demo import run_demo

    settings = settings_from_args(args)
    configure_logging(settings.log_format, settings.log_level)
    return run_demo(settings, duration=args.duration, writers=args.writers)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
