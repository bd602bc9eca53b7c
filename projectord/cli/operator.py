"""The operator subcommands: status, health, pause, resume, skip.

Each sends one request over the control socket (`projectord.cli.daemon_requests`) and turns the
reply into text, JSON (`--json`) and an exit status: 0 done, 1 refused or not ok, 3 no daemon
answers; `health` exits with its verdict (`HEALTH_EXIT`). `rebuild` has its own module.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from projectord.cli.daemon_requests import ask, control_client
from projectord.cli.exits import EXIT_OK, HEALTH_EXIT, HEALTH_EXIT_HELP
from projectord.cli.status_table import render_status
from projectord.cli.status_watch import watch_status
from projectord.cli.subcommands import Subcommands


def register(subcommands: Subcommands) -> None:
    status = subcommands.add(
        "status", cmd_status, "per projection: state, lag, caught up, last error"
    )
    status.add_argument("--json", action="store_true", help="one JSON object")
    status.add_argument("--watch", action="store_true", help="a live table, refreshed in place")
    status.add_argument("--interval", type=float, default=1.0, help="--watch refresh (1 s)")
    health = subcommands.add(
        "health",
        cmd_health,
        "ok / degraded / failing with reasons; the exit status tells which",
        exit_statuses=HEALTH_EXIT_HELP,
    )
    health.add_argument("--json", action="store_true", help="one JSON object")
    for name, handler, text in (
        ("pause", cmd_pause, "stop applying events to a projection; its checkpoint stays"),
        ("resume", cmd_resume, "start applying events to a paused projection again"),
        ("skip", cmd_skip, "dead-letter the event a failing projection is stuck on; go on"),
    ):
        action = subcommands.add(name, handler, text)
        action.add_argument("name", metavar="NAME")
        action.add_argument("--json", action="store_true", help="the daemon's reply as JSON")


def cmd_status(args: argparse.Namespace) -> int:
    with control_client(args) as client:
        if args.watch:
            return watch_status(client, args.interval, sys.stdout)
        result = ask(client, "status")
    if args.json:
        print(json.dumps(result))
    else:
        print(render_status(result))
    return EXIT_OK


def cmd_health(args: argparse.Namespace) -> int:
    with control_client(args) as client:
        result = ask(client, "health")
    if args.json:
        print(json.dumps(result))
    else:
        print(result["status"])
        for reason in result["reasons"]:
            print(f"  {reason['severity']}: {reason['message']}")
    return HEALTH_EXIT[result["status"]]


def _ask_about(args: argparse.Namespace, operation: str) -> dict[str, Any] | None:
    """One request about the projection `args.name`. With `--json` its result is printed as it
    came and None returned: the caller then prints nothing of its own."""
    with control_client(args) as client:
        result = ask(client, operation, name=args.name)
    if args.json:
        print(json.dumps(result))
        return None
    return result


def cmd_pause(args: argparse.Namespace) -> int:
    if _ask_about(args, "pause") is not None:
        print(f"paused {args.name}: no batch of it commits until `projectord resume {args.name}`")
    return EXIT_OK


def cmd_resume(args: argparse.Namespace) -> int:
    if _ask_about(args, "resume") is not None:
        print(f"resumed {args.name}")
    return EXIT_OK


def cmd_skip(args: argparse.Namespace) -> int:
    result = _ask_about(args, "skip")
    if result is not None:
        event = result["dead_lettered"]
        print(
            f"moved event {event['event_id']} ({event['event_type']}, position "
            f"{event['global_position']}) of {args.name} to the dead letters; it goes on"
        )
    return EXIT_OK
    event = result["dead_lettered"]
    print(
        f"moved event {event['event_id']} ({event['event_type']}, position "
        f"{event['global_position']}) of {args.name} to the dead letters; it goes on"
    )
    return EXIT_OK
