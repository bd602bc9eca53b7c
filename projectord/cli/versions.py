"""`projectord rollback NAME` and `projectord versions list|drop` (docs/evolution.md).

`rollback` asks the daemon (whose code must be the kept version's) to make that kept version serve
again, then follows it until the swap: the kept tables are caught up from their kept checkpoint
first, so they are live *and* caught up when it exits 0. It exits 1 when the daemon refuses (no
kept version of its code, nothing to roll back) or the swap has not happened within `--timeout`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from projectord.cli.daemon_requests import ask, control_client
from projectord.cli.exits import EXIT_FAILED, EXIT_OK, CommandError
from projectord.cli.subcommands import Subcommands

POLL = 0.2  # seconds between two looks at a rollback's progress


def register(subcommands: Subcommands) -> None:
    rollback = subcommands.add(
        "rollback",
        cmd_rollback,
        "make the kept previous version of a projection serve again, caught up (needs a daemon"
        " running that version's code)",
    )
    rollback.add_argument("name", metavar="NAME")
    rollback.add_argument(
        "--timeout", type=float, default=600.0, help="seconds to wait for the swap (600)"
    )
    versions = subcommands.group("versions", "the versions of the projections", "versions_action")
    listing = versions.add(
        "list", cmd_list, "per projection: code, serving, building and kept versions"
    )
    listing.add_argument("--json", action="store_true", help="one JSON object")
    drop = versions.add("drop", cmd_drop, "drop a kept version's tables now")
    drop.add_argument("name", metavar="NAME")
    drop.add_argument("version", metavar="VERSION", type=int)


def cmd_rollback(args: argparse.Namespace) -> int:
    with control_client(args) as client:
        asked = ask(client, "rollback", name=args.name)
        version = asked["version"]
        origin = (
            f"from version {asked['from_version']} to version {version}"
            if asked["from_version"] != version
            else f"to the tables version {version} had before its last rebuild"
        )
        print(f"rolling {args.name} back {origin}: catching up its kept tables", file=sys.stderr)
        deadline = time.monotonic() + args.timeout
        while time.monotonic() < deadline:
            if _rolled_back(ask(client, "versions"), args.name, version):
                print(f"{args.name}: version {version} serves again")
                return EXIT_OK
            status = ask(client, "status", names=[args.name])["projections"][0]
            build = (status.get("versions") or {}).get("build") or {}
            if build.get("state") == "failed":
                error = (build.get("last_error") or {}).get("message")
                raise CommandError(f"the rollback of {args.name} stopped: {error}", EXIT_FAILED)
            time.sleep(POLL)
    raise CommandError(
        f"version {asked['version']} of {args.name} does not serve yet after {args.timeout:g}s;"
        " it goes on: `projectord status` shows its progress",
        EXIT_FAILED,
    )


def _rolled_back(listed: dict[str, Any], name: str, version: int) -> bool:
    """The version serves and is no longer being built: swapped in (read from the database, so
    a rollback asked a moment ago, not yet taken by a build, is not mistaken for done)."""
    found = next(p for p in listed["projections"] if p["name"] == name)
    return found["serving_version"] == version and version not in found["building"]


def cmd_list(args: argparse.Namespace) -> int:
    with control_client(args) as client:
        result = ask(client, "versions")
    if args.json:
        print(json.dumps(result))
        return EXIT_OK
    for p in result["projections"]:
        print(
            f"{p['name']}: code {p['code_version']}, serving {p['serving_version']}"
            + "".join(f", building {v}" for v in p["building"])
        )
        for kept in p["kept"]:
            print(_kept_line(kept))
    return EXIT_OK


def _kept_line(kept: dict[str, Any]) -> str:
    expires = f", expires {kept['expires_at']}" if kept.get("expires_at") else ""
    return f"  kept {kept['version']} since {kept['since']}{expires} ({kept['tables_schema']})"


def cmd_drop(args: argparse.Namespace) -> int:
    with control_client(args) as client:
        ask(client, "drop_version", name=args.name, version=args.version)
    print(f"{args.name}: version {args.version} dropped")
    return EXIT_OK
