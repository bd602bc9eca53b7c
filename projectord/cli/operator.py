"""The operator subcommands: status, health, pause, resume, skip.

Each sends one request over the control socket (`projectord.cli.daemon_requests`) and turns the
reply into text, JSON (`--json`) and an exit status: 0 done, 1 refused or not ok, 3 no daemon
answers; `health` exits with its verdict (`HEALTH_EXIT`). `rebuild` has its own module.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime
from typing import Any, TextIO

from projectord.cli.daemon_requests import ask, control_client
from projectord.cli.exits import EXIT_OK, HEALTH_EXIT
from projectord.cli.subcommands import Subcommands
from projectord.cli.text_table import render_table
from projectord.control.client import ControlClient, ControlError, NoDaemon


def register(subcommands: Subcommands) -> None:
    status = subcommands.add(
        "status", cmd_status, "per projection: state, lag, caught up, last error"
    )
    status.add_argument("--json", action="store_true", help="one JSON object")
    status.add_argument("--watch", action="store_true", help="a live table, refreshed in place")
    status.add_argument("--interval", type=float, default=1.0, help="--watch refresh (1 s)")
    health = subcommands.add(
        "health", cmd_health, "ok / degraded / failing with reasons; exit 1 unless ok"
    )
    health.add_argument("--json", action="store_true", help="one JSON object")
    for name, handler, text in (
        ("pause", cmd_pause, "stop applying events to a projection; its checkpoint stays"),
        ("resume", cmd_resume, "start applying events to a paused projection again"),
        ("skip", cmd_skip, "dead-letter the event a failing projection is stuck on; go on"),
    ):
        subcommands.add(name, handler, text).add_argument("name", metavar="NAME")


def cmd_status(args: argparse.Namespace) -> int:
    with control_client(args) as client:
        if args.watch:
            return _watch(client, args.interval, sys.stdout)
        result = ask(client, "status")
    if args.json:
        print(json.dumps(result))
    else:
        print(render_status(result))
    return EXIT_OK


def _watch(client: ControlClient, interval: float, out: TextIO) -> int:
    """Redraw the table every `interval` until interrupted; a daemon that goes away is shown
    and retried, not fatal (the first request still exits 3 when no daemon answers)."""
    ask(client, "status")
    tty = out.isatty()
    try:
        while True:
            try:
                text = render_status(client.request("status"))
            except (NoDaemon, ControlError) as exc:
                text = f"projectord: {exc}"
            stamp = datetime.now().strftime("%H:%M:%S")
            if tty:
                out.write("\x1b[H\x1b[2J")  # home, clear: refresh in place
            out.write(f"{stamp}  (every {interval:g}s, Ctrl-C to stop)\n{text}\n")
            out.flush()
            time.sleep(interval)
    except KeyboardInterrupt:
        return EXIT_OK


COLUMNS = ("NAME", "STATE", "OWNER", "LAG", "LAG_S", "CAUGHT_UP", "APPLIED", "EV/S", "LAST ERROR")


def render_status(result: dict[str, Any]) -> str:
    lines = render_table([COLUMNS] + [_status_row(p) for p in result["projections"]])
    notes = [f"* runs in this daemon ({result['instance']})"]
    if not result["database"]["reachable"]:
        notes.append(f"database unreachable: {result['database']['error']}")
    if not result["listener"]["connected"]:
        notes.append("listener disconnected: projections only poll")
    if result.get("stopping"):
        notes.append("the daemon is stopping")
    return "\n".join(lines + notes)


def _status_row(p: dict[str, Any]) -> tuple[str, ...]:
    error = p["last_error"]
    error_text = ""
    if error:
        where = (
            f"event {error['event_id']} ({error['event_type']}): " if error.get("event_id") else ""
        )
        error_text = f"{where}{error['message']} [attempt {error['attempts']}]"
    state = p["state"]
    if p.get("rebuild") and not p["rebuild"]["done"]:
        state += f" {rebuild_percent(p['rebuild'])}%"
    owner = f"{p['owner'] or '-'}{' *' if p.get('local') else ''}"
    return (
        p["name"],
        state,
        owner,
        _cell(p["lag"]),
        _cell(p["lag_seconds"]),
        "yes" if p["caught_up"] else "no",
        _cell(p["applied_total"]),
        _cell(p["events_per_second"]),
        error_text,
    )


def _cell(value: Any) -> str:
    return "?" if value is None else str(value)


def rebuild_percent(progress: dict[str, Any]) -> int:
    total = progress["total"]
    return 100 if not total else min(100, int(100 * progress["applied"] / total))


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


def cmd_pause(args: argparse.Namespace) -> int:
    with control_client(args) as client:
        ask(client, "pause", name=args.name)
    print(f"paused {args.name}: no batch of it commits until `projectord resume {args.name}`")
    return EXIT_OK


def cmd_resume(args: argparse.Namespace) -> int:
    with control_client(args) as client:
        ask(client, "resume", name=args.name)
    print(f"resumed {args.name}")
    return EXIT_OK


def cmd_skip(args: argparse.Namespace) -> int:
    with control_client(args) as client:
        result = ask(client, "skip", name=args.name)
    event = result["dead_lettered"]
    print(
        f"moved event {event['event_id']} ({event['event_type']}, position "
        f"{event['global_position']}) of {args.name} to the dead letters; it goes on"
    )
    return EXIT_OK
