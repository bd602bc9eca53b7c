"""`projectord rebuild NAME`: through the daemon that owns the projection (empty its tables,
replay from the first event, with a progress bar on a TTY), or with `--online` into shadow tables
this process fills while the live ones serve reads, then swaps in (no daemon needed).

Exit statuses: 0 done (or started), 1 the rebuild failed or is stuck, 2 usage, 3 no daemon answers.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, TextIO

from projectord.cli.daemon_requests import ask, control_client
from projectord.cli.database_jobs import run_database_job
from projectord.cli.exits import EXIT_FAILED, EXIT_OK, EXIT_USAGE, CommandError
from projectord.cli.operator import rebuild_percent
from projectord.cli.subcommands import Subcommands
from projectord.control.client import ControlClient
from projectord.schema.online_rebuild import rebuild_online

FOLLOW_INTERVAL = 0.25  # seconds between progress polls


def register(subcommands: Subcommands) -> None:
    rebuild = subcommands.add(
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
    rebuild.add_argument(
        "--online",
        action="store_true",
        help="rebuild into shadow tables while the live ones serve reads, then swap (no daemon"
        " needed)",
    )


def cmd_rebuild(args: argparse.Namespace) -> int:
    if not args.online:
        return rebuild_through_daemon(args)
    if args.allow_undeclared:
        raise CommandError(
            "--allow-undeclared is for the offline rebuild: an online rebuild never writes"
            " outside its shadow tables (it stops instead)",
            EXIT_USAGE,
        )
    return rebuild_online_here(args)


def rebuild_online_here(args: argparse.Namespace) -> int:
    async def rebuild(dsn: str, settings: Any, projections: Any) -> dict[str, Any]:
        by_name = {p.name: p for p in projections}
        if args.name not in by_name:
            raise CommandError(f"unknown projection {args.name!r}", EXIT_FAILED)
        return await rebuild_online(dsn, settings, by_name[args.name])

    result = run_database_job(args, rebuild, EXIT_FAILED)
    print(
        f"rebuilt {result['projection']} online: {result['applied']} event(s) applied,"
        f" swapped in after {result['seconds']}s"
    )
    return EXIT_OK


def rebuild_through_daemon(args: argparse.Namespace) -> int:
    """Start a rebuild. On a TTY, follow it with a progress bar; `--wait` follows it anywhere.
    Following ends with exit 1 when the projection fails on an event (the error is shown, not
    swallowed) and exit 3 when the daemon goes away."""
    out = sys.stdout
    with control_client(args) as client:
        request = {"allow_undeclared": True} if args.allow_undeclared else {}
        started = ask(client, "rebuild", name=args.name, **request)["rebuild"]
        if not (args.wait or out.isatty()):
            print(f"rebuilding {args.name}: {started['total']} events to apply")
            return EXIT_OK
        return _follow_rebuild(client, args.name, args.timeout, out)


def _follow_rebuild(client: ControlClient, name: str, timeout: float, out: TextIO) -> int:
    deadline = time.monotonic() + timeout if timeout > 0 else None
    tty = out.isatty()
    while True:
        projection = ask(client, "status", names=[name])["projections"][0]
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
            raise CommandError(
                f"rebuild of {name} is stuck at event {error.get('event_id')}: "
                f"{error.get('message')} (state {projection['state']}; `projectord skip {name}` "
                "moves the event to the dead letters)",
                EXIT_FAILED,
            )
        if deadline is not None and time.monotonic() > deadline:
            if tty:
                out.write("\n")
            raise CommandError(
                f"rebuild of {name} not done after {timeout:g}s; it goes on", EXIT_FAILED
            )
        time.sleep(FOLLOW_INTERVAL)


def progress_bar(progress: dict[str, Any], width: int = 30) -> str:
    percent = rebuild_percent(progress)
    filled = width * percent // 100
    eta = progress["eta_seconds"]
    eta_text = "?" if eta is None else f"{eta:.0f}s"
    return (
        f"[{'#' * filled}{'.' * (width - filled)}] {percent:3d}%  "
        f"{progress['applied']}/{progress['total']}  "
        f"{progress['events_per_second']:.0f} ev/s  ETA {eta_text}  "
    )
