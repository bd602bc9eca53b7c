"""The subcommands that set up and run the daemon: `init`, `run`, `wait` and `demo`.

`init` and `wait` connect to the database themselves; `run` is the daemon in the foreground.
"""

from __future__ import annotations

import argparse
import json
import sys

import anyio
import psycopg

from projectord.cli.configuration import load, settings_from_args
from projectord.cli.connection import database, open_connection, require_database_url
from projectord.cli.exits import EXIT_FAILED, EXIT_OK, EXIT_USAGE, CommandError
from projectord.cli.subcommands import Subcommands
from projectord.database import describe_error
from projectord.logs import configure_logging
from projectord.queries import Queries
from projectord.runner.catch_up import wait_for_projections
from projectord.schema.bootstrap import bootstrap
from projectord.schema.foreign_owner import ForeignOwnerError, refused_projections


def register(subcommands: Subcommands) -> None:
    init = subcommands.add(
        "init", cmd_init, "create or upgrade the schema objects and missing projection tables"
    )
    init.add_argument("--json", action="store_true", help="what was created, as one JSON object")
    subcommands.add("run", cmd_run, "run the daemon in the foreground")
    wait = subcommands.add(
        "wait", cmd_wait, "block until projections applied every event committed before"
    )
    wait.add_argument("names", nargs="*", metavar="NAME")
    wait.add_argument("--timeout", type=float, default=60.0, help="seconds (default 60)")
    demo = subcommands.add(
        "demo", cmd_demo, "the main job end to end (on an embedded Postgres by default)"
    )
    demo.add_argument("--duration", type=float, default=20.0, help="seconds of writing (20)")
    demo.add_argument("--writers", type=int, default=8, help="concurrent writers (8)")


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
    if args.json:
        print(json.dumps({"created": created, "refused": [str(error) for error in refused]}))
        return EXIT_FAILED if refused else EXIT_OK
    for item in created:
        print(f"created {item}")
    print("schema is up to date" if not created else f"{len(created)} change(s) applied")
    for error in refused:
        print(f"projectord: {error}", file=sys.stderr)
    return EXIT_FAILED if refused else EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    # Imported here: the daemon's modules are the heaviest, and only `run` needs them.
    from projectord.daemon.service import Daemon, StartupError
    from projectord.daemon.systemd import SystemdNotifier

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
        async with database(settings) as dsn, await open_connection(dsn) as conn:
            try:
                return await wait_for_projections(
                    conn, Queries(settings.schema), chosen, timeout=args.timeout
                )
            except psycopg.Error as exc:
                raise CommandError(f"wait failed: {describe_error(exc, dsn)}") from None

    if anyio.run(wait):
        return EXIT_OK
    print("projectord: timed out waiting for projections", file=sys.stderr)
    return EXIT_FAILED


def cmd_demo(args: argparse.Namespace) -> int:
    # Imported here: the demo pulls in the samples and the command side, which no other
    # subcommand needs.
    from projectord.cli.demo import run_demo

    settings = settings_from_args(args)
    configure_logging(settings.log_format, settings.log_level)
    return run_demo(settings, duration=args.duration, writers=args.writers)
