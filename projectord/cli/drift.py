"""The command line of schema drift: `drift check` and `drift repair`.

These connect to the database directly (no daemon needed), so a CI job can run `drift check`
against staging: exit 0 no drift, 1 drift, 2 the check itself failed. `drift repair --apply` of a
change that needs a rebuild records a versioned rebuild and returns once it has swapped in: built
by the running daemon, or by the command itself when no daemon runs
(projectord/schema/versioned_repair.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from projectord.cli.database_jobs import run_database_job
from projectord.cli.exits import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from projectord.cli.subcommands import Subcommands
from projectord.schema.drift import Drift, drift_check
from projectord.schema.repair import drift_repair, plan_text

DRIFT_CHECK_EXIT_HELP = """\
exit statuses:
  0  no drift
  1  drift found
  2  the check itself failed (configuration, or the database could not be read)"""


def register(subcommands: Subcommands) -> None:
    actions = subcommands.group(
        "drift",
        "compare the projections' tables with the database, or repair them",
        dest="drift_command",
    )
    check = actions.add(
        "check",
        cmd_drift_check,
        "report drift: exit 0 none, 1 drift, 2 error",
        exit_statuses=DRIFT_CHECK_EXIT_HELP,
    )
    check.add_argument("--json", action="store_true", help="one JSON object")
    repair = actions.add(
        "repair", cmd_drift_repair, "print (or --apply) the SQL that removes the drift"
    )
    repair.add_argument("--apply", action="store_true", help="run it, in one transaction")
    repair.add_argument(
        "--drop-extra",
        action="store_true",
        help="also drop extra columns and policies (never dropped otherwise)",
    )
    repair.add_argument("--json", action="store_true", help="one JSON object")


def cmd_drift_check(args: argparse.Namespace) -> int:
    report = run_database_job(args, drift_check, EXIT_USAGE)
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

    result = run_database_job(args, repair, EXIT_FAILED)
    if args.json:
        print(json.dumps(result))
        return EXIT_OK
    for line in plan_text(result, result["schema"]):
        print(line)
    if args.apply:
        done = len(result["statements"])
        rebuilt = ", ".join(result["rebuilds"]) or "none"
        print(
            f"-- applied {done} statement(s); versioned rebuild, swapped in, replaced tables"
            f" kept: {rebuilt}",
            file=sys.stderr,
        )
    return EXIT_OK
