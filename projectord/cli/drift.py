"""The command line of schema drift and online rebuilds: `drift check`, `drift repair`,
`rebuild NAME --online`.

These connect to the database directly (no daemon needed), so a CI job can run `drift check`
against staging: exit 0 no drift, 1 drift, 2 the check itself failed.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

import anyio
import psycopg

from projectord.database import describe_error
from projectord.schema.drift import Drift, DriftError, drift_check
from projectord.schema.online_rebuild import RebuildError, rebuild_online
from projectord.schema.repair import RepairError, drift_repair, plan_text

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

AddCommand = Callable[[str, Callable[[argparse.Namespace], int], str], Any]


def add_drift_commands(add: AddCommand, commands: Any, parent: argparse.ArgumentParser) -> None:
    """Register `drift check|repair` and the `--online` flag of `rebuild` (which the operator
    commands define, when they are present: an offline rebuild goes through the daemon)."""
    drift = commands.add_parser(
        "drift", help="compare the projections' tables with the database, or repair them"
    )
    actions = drift.add_subparsers(dest="drift_command", required=True, metavar="ACTION")
    check = actions.add_parser(
        "check", parents=[parent], help="report drift: exit 0 none, 1 drift, 2 error"
    )
    check.add_argument("--json", action="store_true", help="one JSON object")
    check.set_defaults(handler=cmd_drift_check)
    repair = actions.add_parser(
        "repair", parents=[parent], help="print (or --apply) the SQL that removes the drift"
    )
    repair.add_argument("--apply", action="store_true", help="run it, in one transaction")
    repair.add_argument(
        "--drop-extra",
        action="store_true",
        help="also drop extra columns and policies (never dropped otherwise)",
    )
    repair.add_argument("--json", action="store_true", help="one JSON object")
    repair.set_defaults(handler=cmd_drift_repair)
    _add_online_rebuild(add, commands)


def _add_online_rebuild(add: AddCommand, commands: Any) -> None:
    rebuild = commands.choices.get("rebuild")
    if rebuild is None:
        rebuild = add("rebuild", _offline_unavailable, "rebuild a projection from the first event")
        rebuild.add_argument("name", metavar="NAME")
    rebuild.add_argument(
        "--online",
        action="store_true",
        help="rebuild into shadow tables while the live ones serve reads, then swap (no daemon"
        " needed)",
    )
    offline = rebuild.get_default("handler")

    def handler(args: argparse.Namespace) -> int:
        if args.online and getattr(args, "allow_undeclared", False):
            raise _fail(
                "--allow-undeclared is for the offline rebuild: an online rebuild never writes"
                " outside its shadow tables (it stops instead)",
                EXIT_USAGE,
            )
        return cmd_rebuild_online(args) if args.online else int(offline(args))

    rebuild.set_defaults(handler=handler)


def _offline_unavailable(args: argparse.Namespace) -> int:
    raise _fail("an offline rebuild goes through the daemon; use --online here", EXIT_USAGE)


def _fail(message: str, status: int) -> Exception:
    from projectord.cli.main import (
        CommandError,  # the CLI's error type; imported late (cli imports us)
    )

    return CommandError(message, status)


def _run(args: argparse.Namespace, job: Callable[..., Any], error_status: int) -> Any:
    """Load settings and projections, get the database, run `job(dsn, settings, projections)`;
    known failures become one line with `error_status`."""
    from projectord.cli.main import database, load

    settings, projections = load(args)

    async def run() -> Any:
        async with database(settings) as dsn:
            try:
                return await job(dsn, settings, projections)
            except (DriftError, RepairError, RebuildError) as exc:
                raise _fail(str(exc), error_status) from None
            except (psycopg.Error, OSError) as exc:
                raise _fail(describe_error(exc, dsn), error_status) from None

    return anyio.run(run)


def cmd_drift_check(args: argparse.Namespace) -> int:
    report = _run(args, drift_check, EXIT_USAGE)
    if args.json:
        print(json.dumps(report | {"ok": report["count"] == 0}))
    else:
        for item in report["drift"]:
            print(Drift.from_json(item).line(report["schema"]))
        count = report["count"]
        print(f"{count} drift item(s) in schema {report['schema']}" if count else "no drift")
    return EXIT_FAILED if report["count"] else EXIT_OK


def cmd_drift_repair(args: argparse.Namespace) -> int:
    async def repair(dsn: str, settings: Any, projections: Any) -> dict[str, Any]:
        result = await drift_repair(
            dsn, settings, projections, apply=args.apply, drop_extra=args.drop_extra
        )
        return result | {"schema": settings.read_model_schema}

    result = _run(args, repair, EXIT_FAILED)
    if args.json:
        print(json.dumps(result))
        return EXIT_OK
    for line in plan_text(result, result["schema"]):
        print(line)
    if args.apply:
        done = len(result["statements"])
        rebuilt = ", ".join(result["rebuilds"]) or "none"
        print(f"-- applied {done} statement(s); rebuilt online: {rebuilt}", file=sys.stderr)
    return EXIT_OK


def cmd_rebuild_online(args: argparse.Namespace) -> int:
    async def rebuild(dsn: str, settings: Any, projections: Any) -> dict[str, Any]:
        by_name = {p.name: p for p in projections}
        if args.name not in by_name:
            raise _fail(f"unknown projection {args.name!r}", EXIT_FAILED)
        return await rebuild_online(dsn, settings, by_name[args.name])

    result = _run(args, rebuild, EXIT_FAILED)
    print(
        f"rebuilt {result['projection']} online: {result['applied']} event(s) applied,"
        f" swapped in after {result['seconds']}s"
    )
    return EXIT_OK
