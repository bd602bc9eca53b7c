"""The command line of dead letters: `dead-letters list` and `dead-letters retry [ID…]`.

Both connect to the database directly, like `wait` and `drift`: the dead letters are rows, and a
retry runs the projection's own handler from the configured projections, so neither needs a
daemon, and with several daemons it does not matter which one owns the projection.

Exit statuses: 0 done (also: nothing to retry); 1 a retry was refused or failed, or the database
could not be read; 2 invalid configuration or usage.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import anyio
import psycopg

from projectord.cli.configuration import load, settings_from_args
from projectord.cli.connection import database, open_connection
from projectord.cli.exits import EXIT_FAILED, EXIT_OK, EXIT_USAGE, CommandError
from projectord.cli.subcommands import Subcommands
from projectord.cli.text_table import render_table
from projectord.database import describe_error
from projectord.logs import configure_logging
from projectord.queries import Queries, quote_ident
from projectord.runner.dead_letters import (
    DeadLetterRetry,
    RetryFailed,
    RetryRefused,
    list_dead_letters,
    pending_ids,
)
from projectord.runner.error_policy import ErrorPolicy

COLUMNS = ("ID", "PROJECTION", "POSITION", "EVENT", "TYPE", "ATTEMPTS", "SINCE", "ERROR")


def register(subcommands: Subcommands) -> None:
    actions = subcommands.group(
        "dead-letters",
        "show or re-apply the events projections set aside",
        dest="dead_letters_command",
    )
    listing = actions.add("list", cmd_list, "the pending dead letters, oldest first")
    listing.add_argument("--json", action="store_true", help="one JSON object")
    listing.add_argument(
        "--all", action="store_true", help="also the resolved ones (retried, or rebuilt)"
    )
    listing.add_argument("--projection", metavar="NAME", help="only this projection's")
    retry = actions.add(
        "retry",
        cmd_retry,
        "re-apply dead letters (all pending ones when no ID is given) after a fix",
    )
    retry.add_argument("ids", nargs="*", type=int, metavar="ID")
    retry.add_argument("--projection", metavar="NAME", help="only this projection's")
    retry.add_argument("--json", action="store_true", help="one JSON object")


def cmd_list(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    configure_logging(settings.log_format, settings.log_level)

    async def read() -> list[dict[str, Any]]:
        async with database(settings) as dsn, await open_connection(dsn) as conn:
            try:
                return await list_dead_letters(
                    conn,
                    Queries(settings.schema),
                    projection=args.projection,
                    include_resolved=args.all,
                )
            except psycopg.Error as exc:
                message = describe_error(exc, dsn)
                raise CommandError(f"cannot read the dead letters: {message}") from None

    letters = anyio.run(read)
    if args.json:
        print(json.dumps({"dead_letters": letters}))
    else:
        print(render(letters, include_resolved=args.all))
    return EXIT_OK


def render(letters: list[dict[str, Any]], *, include_resolved: bool) -> str:
    if not letters:
        return "no dead letters" if include_resolved else "no pending dead letters"
    columns = (*COLUMNS[:-1], "RESOLVED", COLUMNS[-1]) if include_resolved else COLUMNS
    rows = [columns] + [_row(letter, include_resolved) for letter in letters]
    return "\n".join(render_table(rows, default_width=160))


def _row(letter: dict[str, Any], include_resolved: bool) -> tuple[str, ...]:
    error = " ".join(f"{letter['error_type'] or 'Error'}: {letter['error_message']}".split())
    cells = [
        str(letter["id"]),
        letter["projection"],
        str(letter["global_position"]),
        letter["event_id"],
        letter["event_type"],
        str(letter["attempts"]),
        letter["created_at"][:19],
    ]
    if include_resolved:
        resolved = letter["resolved_at"]
        cells.append(f"{letter['resolution']} {resolved[:19]}" if resolved else "pending")
    return (*cells, error)


def cmd_retry(args: argparse.Namespace) -> int:
    settings, projections = load(args)
    by_name = {p.name: p for p in projections}
    if args.projection is not None and args.projection not in by_name:
        known = ", ".join(sorted(by_name)) or "none"
        raise CommandError(
            f"no projection named {args.projection[:100]!r} is configured (configured: {known})",
            EXIT_USAGE,
        )
    names = [args.projection] if args.projection else list(by_name)
    queries = Queries(settings.schema)
    policy = ErrorPolicy.configured(settings)

    async def retry_all() -> list[dict[str, Any]]:
        async with database(settings) as dsn, await open_connection(dsn) as conn:
            await conn.execute(f"SET search_path TO {quote_ident(settings.read_model_schema)}")
            ids = args.ids or await pending_ids(conn, queries, names)
            retry = DeadLetterRetry(conn, queries, by_name, policy)
            return [await _retry(retry, dsn, i) for i in ids]

    results = anyio.run(retry_all)
    if args.json:
        print(json.dumps({"retried": results}))
    else:
        _print_results(results)
    return EXIT_OK if all(r["ok"] for r in results) else EXIT_FAILED


async def _retry(retry: DeadLetterRetry, dsn: str, letter_id: int) -> dict[str, Any]:
    """One dead letter; a refusal or failure is reported and the next one is tried."""
    try:
        done = await retry.retry(letter_id)
    except (RetryRefused, RetryFailed) as exc:
        return {"id": letter_id, "ok": False, "error": str(exc)}
    except psycopg.Error as exc:
        error = f"dead letter {letter_id}: {describe_error(exc, dsn)}"
        return {"id": letter_id, "ok": False, "error": error}
    return {**done, "ok": True}


def _print_results(results: list[dict[str, Any]]) -> None:
    if not results:
        print("no pending dead letters: nothing to retry")
    for result in results:
        if result["ok"]:
            print(
                f"retried dead letter {result['id']}: event {result['event_id']} "
                f"({result['event_type']}, position {result['global_position']}) applied to "
                f"{result['projection']}"
            )
        else:
            print(f"projectord: {result['error']}", file=sys.stderr)
