"""`projectord dispatch TYPE --tenant UUID --payload JSON`: submit a command from a shell or script.

Exit 0 when the command is consumed (or, with `--wait`, processed), 1 when it failed (the reason on
stderr, the command stored as `failed`), 2 for bad usage (invalid JSON, no aggregates configured),
nothing stored. `--id` makes a retried call idempotent: the second call prints the first outcome.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import uuid
from collections.abc import Sequence
from typing import Any

import anyio
import psycopg

from projectord.cli.configuration import configured
from projectord.cli.connection import database, open_connection
from projectord.cli.exits import EXIT_FAILED, EXIT_OK, EXIT_USAGE, CommandError
from projectord.cli.subcommands import Subcommands
from projectord.commands.aggregate import AggregateError, CommandRegistry, load_aggregates
from projectord.commands.dispatch import CommandIdReused, Dispatcher, ReadModelTimeout
from projectord.commands.store import Command
from projectord.config import Settings
from projectord.database import describe_error
from projectord.projection import Projection, load_projections


def register(subcommands: Subcommands) -> None:
    dispatch = subcommands.add(
        "dispatch", cmd_dispatch, "submit a command through the command side"
    )
    dispatch.add_argument("type", metavar="TYPE", help="command type, e.g. Deposit")
    dispatch.add_argument("--tenant", type=uuid.UUID, required=True, metavar="UUID")
    dispatch.add_argument("--payload", default="{}", metavar="JSON", help="a JSON object")
    dispatch.add_argument("--id", type=uuid.UUID, metavar="UUID", help="command id (idempotency)")
    dispatch.add_argument(
        "--wait",
        action="append",
        default=[],
        metavar="NAME",
        help="return once projection NAME shows the result (repeatable)",
    )
    dispatch.add_argument("--timeout", type=float, default=30.0, help="for --wait (default 30)")
    dispatch.add_argument("--json", action="store_true", help="print the stored command as JSON")


def cmd_dispatch(args: argparse.Namespace) -> int:
    settings = configured(args)  # with the upcasters: appends record the current versions
    registry = _registry(settings)
    wait_for = _projections_to_wait_for(settings, args.wait)
    command = Command(args.tenant, args.type, _payload(args.payload), id=args.id or uuid.uuid4())
    outcome = anyio.run(_dispatch, settings, registry, command, wait_for, args.timeout)
    if args.json:
        print(json.dumps(outcome.as_dict()))
    if not outcome.status.succeeded:
        print(f"projectord: command {outcome.id} failed: {outcome.error}", file=sys.stderr)
        return EXIT_FAILED
    if not args.json:
        count = len((outcome.result or {}).get("events", []))
        print(f"{outcome.status} {outcome.id}: {outcome.type} on {outcome.aggregate_id},", end="")
        print(f" {count} event(s)")
    return EXIT_OK


def _registry(settings: Settings) -> CommandRegistry:
    try:
        registry = load_aggregates(settings.aggregates)
    except AggregateError as exc:
        raise CommandError(str(exc), EXIT_USAGE) from None
    if not registry.command_types:
        raise CommandError("no aggregates configured: set `aggregates` (module:attr)", EXIT_USAGE)
    return registry


def _projections_to_wait_for(settings: Settings, names: Sequence[str]) -> list[Projection]:
    if not names:
        return []
    by_name = {p.name: p for p in load_projections(settings.projections)}
    unknown = [name for name in names if name not in by_name]
    if unknown:
        raise CommandError(f"--wait: unknown projection(s): {', '.join(unknown)}", EXIT_USAGE)
    return [by_name[name] for name in names]


def _payload(text: str) -> dict[str, Any]:
    """The `--payload` object. NaN, Infinity and numbers past a double (1e999) are refused: they
    are not JSON, Python's reader takes them anyway, and the stores would write them as null."""
    try:
        payload = json.loads(text, parse_constant=_not_json, parse_float=_finite)
    except ValueError as exc:
        raise CommandError(f"--payload is not valid JSON: {exc}", EXIT_USAGE) from None
    if not isinstance(payload, dict):
        raise CommandError("--payload must be a JSON object, e.g. '{\"amount\": 5}'", EXIT_USAGE)
    return payload


def _not_json(constant: str) -> float:
    raise ValueError(f"{constant} is not a JSON number")


def _finite(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise ValueError(f"{text} is too large for a JSON number")
    return number


async def _dispatch(
    settings: Settings,
    registry: CommandRegistry,
    command: Command,
    wait_for: Sequence[Projection],
    timeout: float,
) -> Command:
    dispatcher = Dispatcher(registry, schema=settings.schema)
    async with database(settings) as dsn, await open_connection(dsn) as conn:
        try:
            if wait_for:
                return await dispatcher.dispatch_and_wait(conn, command, wait_for, timeout=timeout)
            return await dispatcher.dispatch(conn, command)
        except (CommandIdReused, ReadModelTimeout) as exc:
            raise CommandError(str(exc)) from None
        except psycopg.errors.UndefinedTable:
            missing = f"schema {settings.schema!r} has no command store: run `projectord init`"
            raise CommandError(missing) from None
        except psycopg.Error as exc:
            raise CommandError(f"dispatch failed: {describe_error(exc, dsn)}") from None
