"""The operator commands of the command line: status, health, pause, resume, rebuild, skip.

Each sends one request over the control socket (`projectord.control.client`) and turns the reply
into text, JSON (`--json`) and an exit status: 0 done, 1 refused or not ok, 3 no daemon answers.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any, TextIO

from projectord.cli.text_table import render_table
from projectord.control.client import ControlClient, ControlError, NoDaemon

EXIT_OK, EXIT_FAILED, EXIT_NO_DAEMON = 0, 1, 3
# `health`: one status per verdict, so a probe can tell degraded from failing (CONTRACT.md).
HEALTH_EXIT = {"ok": 0, "degraded": 1, "failing": 2}
FOLLOW_INTERVAL = 0.25  # seconds between progress polls of `rebuild`

AddCommand = Callable[[str, Callable[[argparse.Namespace], int], str], Any]


def add_operator_commands(add: AddCommand) -> None:
    status = add("status", cmd_status, "per projection: state, lag, caught up, last error")
    status.add_argument("--json", action="store_true", help="one JSON object")
    status.add_argument("--watch", action="store_true", help="a live table, refreshed in place")
    status.add_argument("--interval", type=float, default=1.0, help="--watch refresh (1 s)")
    health = add("health", cmd_health, "ok / degraded / failing with reasons; exit 1 unless ok")
    health.add_argument("--json", action="store_true", help="one JSON object")
    for name, handler, text in (
        ("pause", cmd_pause, "stop applying events to a projection; its checkpoint stays"),
        ("resume", cmd_resume, "start applying events to a paused projection again"),
        ("skip", cmd_skip, "dead-letter the event a failing projection is stuck on; go on"),
    ):
        add(name, handler, text).add_argument("name", metavar="NAME")
    rebuild = add(
        "rebuild", cmd_rebuild, "empty a projection's tables and rebuild them from the first event"
    )
    rebuild.add_argument("name", metavar="NAME")
    rebuild.add_argument("--wait", action="store_true", help="block until the rebuild is done")
    rebuild.add_argument(
        "--allow-undeclared",
        action="store_true",
        help="rebuild even though the projection writes tables it does not declare (which are"
        " not emptied): you emptied them yourself, or its writes to them can be repeated",
    )
    rebuild.add_argument(
        "--timeout", type=float, default=0.0, help="give up waiting after S seconds (0: never)"
    )


def _fail(message: str, status: int) -> Exception:
    from projectord.cli.main import (
        CommandError,  # the CLI's error type; imported late (cli imports us)
    )

    return CommandError(message, status)


def _client(args: argparse.Namespace) -> ControlClient:
    from projectord.cli.main import settings_from_args

    return ControlClient(settings_from_args(args).socket_path())


def _call(client: ControlClient, command: str, **request_args: Any) -> Any:
    try:
        return client.request(command, **request_args)
    except NoDaemon as exc:
        raise _fail(str(exc), EXIT_NO_DAEMON) from None
    except ControlError as exc:
        raise _fail(exc.message, EXIT_FAILED) from None


def cmd_status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.watch:
            return _watch(client, args.interval, sys.stdout)
        result = _call(client, "status")
    if args.json:
        print(json.dumps(result))
    else:
        print(render_status(result))
    return EXIT_OK


def _watch(client: ControlClient, interval: float, out: TextIO) -> int:
    """Redraw the table every `interval` until interrupted; a daemon that goes away is shown
    and retried, not fatal (the first request still exits 3 when no daemon answers)."""
    _call(client, "status")
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
        state += f" {_percent(p['rebuild'])}%"
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


def _percent(progress: dict[str, Any]) -> int:
    total = progress["total"]
    return 100 if not total else min(100, int(100 * progress["applied"] / total))


def cmd_health(args: argparse.Namespace) -> int:
    with _client(args) as client:
        result = _call(client, "health")
    if args.json:
        print(json.dumps(result))
    else:
        print(result["status"])
        for reason in result["reasons"]:
            print(f"  {reason['severity']}: {reason['message']}")
    return HEALTH_EXIT[result["status"]]


def cmd_pause(args: argparse.Namespace) -> int:
    with _client(args) as client:
        _call(client, "pause", name=args.name)
    print(f"paused {args.name}: no batch of it commits until `projectord resume {args.name}`")
    return EXIT_OK


def cmd_resume(args: argparse.Namespace) -> int:
    with _client(args) as client:
        _call(client, "resume", name=args.name)
    print(f"resumed {args.name}")
    return EXIT_OK


def cmd_skip(args: argparse.Namespace) -> int:
    with _client(args) as client:
        result = _call(client, "skip", name=args.name)
    event = result["dead_lettered"]
    print(
        f"moved event {event['event_id']} ({event['event_type']}, position "
        f"{event['global_position']}) of {args.name} to the dead letters; it goes on"
    )
    return EXIT_OK


def cmd_rebuild(args: argparse.Namespace) -> int:
    """Start a rebuild. On a TTY, follow it with a progress bar; `--wait` follows it anywhere.
    Following ends with exit 1 when the projection fails on an event (the error is shown, not
    swallowed) and exit 3 when the daemon goes away."""
    out = sys.stdout
    with _client(args) as client:
        request = {"allow_undeclared": True} if args.allow_undeclared else {}
        started = _call(client, "rebuild", name=args.name, **request)["rebuild"]
        if not (args.wait or out.isatty()):
            print(f"rebuilding {args.name}: {started['total']} events to apply")
            return EXIT_OK
        return _follow_rebuild(client, args.name, args.timeout, out)


def _follow_rebuild(client: ControlClient, name: str, timeout: float, out: TextIO) -> int:
    deadline = time.monotonic() + timeout if timeout > 0 else None
    tty = out.isatty()
    while True:
        projection = _call(client, "status", names=[name])["projections"][0]
        progress = projection["rebuild"]
        if tty:
            out.write("\r" + progress_bar(progress))
            out.flush()
        if progress["done"]:
            if tty:
                out.write("\n")
            print(f"rebuilt {name}: {progress['applied']} events applied", file=out)
            return EXIT_OK
        if projection["state"] in ("retrying", "failed"):
            error = projection["last_error"] or {}
            if tty:
                out.write("\n")
            raise _fail(
                f"rebuild of {name} is stuck at event {error.get('event_id')}: "
                f"{error.get('message')} (state {projection['state']}; `projectord skip {name}` "
                "moves the event to the dead letters)",
                EXIT_FAILED,
            )
        if deadline is not None and time.monotonic() > deadline:
            if tty:
                out.write("\n")
            raise _fail(f"rebuild of {name} not done after {timeout:g}s; it goes on", EXIT_FAILED)
        time.sleep(FOLLOW_INTERVAL)


def progress_bar(progress: dict[str, Any], width: int = 30) -> str:
    percent = _percent(progress)
    filled = width * percent // 100
    eta = progress["eta_seconds"]
    eta_text = "?" if eta is None else f"{eta:.0f}s"
    return (
        f"[{'#' * filled}{'.' * (width - filled)}] {percent:3d}%  "
        f"{progress['applied']}/{progress['total']}  "
        f"{progress['events_per_second']:.0f} ev/s  ETA {eta_text}  "
    )
