"""`projectord rebuild NAME`: through the daemon that owns the projection (empty its tables,
replay from the first event, with a progress bar on a TTY), or with `--online` into shadow tables
this process fills while the live ones serve reads, then swaps in (no daemon needed).

Exit statuses: 0 done (or started), 1 the rebuild failed or is stuck, 2 usage, 3 no daemon answers.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import Any

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
)

from projectord.cli.daemon_requests import ask, control_client
from projectord.cli.database_jobs import run_database_job
from projectord.cli.exits import EXIT_FAILED, EXIT_OK, EXIT_USAGE, CommandError
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
    rebuild.add_argument("--json", action="store_true", help="the outcome as one JSON object")


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
    if args.json:
        print(json.dumps(result))
        return EXIT_OK
    print(
        f"rebuilt {result['projection']} online: {result['applied']} event(s) applied,"
        f" swapped in after {result['seconds']}s"
    )
    return EXIT_OK


def rebuild_through_daemon(args: argparse.Namespace) -> int:
    """Start a rebuild. On a TTY, follow it with a progress bar; `--wait` follows it anywhere.
    Following ends with exit 1 when the projection fails on an event (the error is shown, not
    swallowed) and exit 3 when the daemon goes away. `--json` prints the daemon's reply: the
    rebuild as started, or with `--wait` as finished."""
    with control_client(args) as client:
        request = {"allow_undeclared": True} if args.allow_undeclared else {}
        started = ask(client, "rebuild", name=args.name, **request)
        follow = args.wait or (sys.stdout.isatty() and not args.json)
        if not follow:
            if args.json:
                print(json.dumps(started))
            else:
                print(f"rebuilding {args.name}: {started['rebuild']['total']} events to apply")
            return EXIT_OK
        if sys.stdout.isatty() and not args.json:
            with RebuildProgress(args.name) as bar:
                done = _follow_rebuild(client, args.name, args.timeout, bar.show)
        else:
            done = _follow_rebuild(client, args.name, args.timeout, lambda progress: None)
    if args.json:
        print(json.dumps({"name": args.name, "rebuild": done}))
    else:
        print(f"rebuilt {args.name}: {done['applied']} events applied")
    return EXIT_OK


def _follow_rebuild(
    client: ControlClient, name: str, timeout: float, show: Callable[[dict[str, Any]], None]
) -> dict[str, Any]:
    """Poll the rebuild's progress until it is done (returned), stuck or past `timeout`."""
    deadline = time.monotonic() + timeout if timeout > 0 else None
    while True:
        projection = ask(client, "status", names=[name])["projections"][0]
        progress = projection["rebuild"]
        show(progress)
        if progress["done"]:
            return progress
        if projection["state"] in ("retrying", "failed"):
            error = projection["last_error"] or {}
            raise CommandError(
                f"rebuild of {name} is stuck at event {error.get('event_id')}: "
                f"{error.get('message')} (state {projection['state']}; `projectord skip {name}` "
                "moves the event to the dead letters)",
                EXIT_FAILED,
            )
        if deadline is not None and time.monotonic() > deadline:
            raise CommandError(
                f"rebuild of {name} not done after {timeout:g}s; it goes on", EXIT_FAILED
            )
        time.sleep(FOLLOW_INTERVAL)


class RebuildProgress:
    """The progress bar of a rebuild on a terminal: rich draws it to the terminal's width (and
    in colour unless NO_COLOR is set), from the daemon's figures (its rate and ETA, not ones
    guessed from this process's polls)."""

    def __init__(self, name: str) -> None:
        self._progress = Progress(
            TextColumn(f"rebuild {name}"),
            BarColumn(),
            TaskProgressColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]} ev/s  ETA {task.fields[eta]}"),
            transient=False,
        )
        self._task = self._progress.add_task(name, total=None, rate="?", eta="?")

    def __enter__(self) -> RebuildProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def show(self, progress: dict[str, Any]) -> None:
        eta = progress["eta_seconds"]
        rate = progress["events_per_second"]
        total = progress["total"] or 1  # an empty rebuild is done at once: 100%, not 0/0
        self._progress.update(
            self._task,
            completed=total if progress["done"] else progress["applied"],
            total=total or 1,
            rate="?" if rate is None else f"{rate:.0f}",
            eta="0s" if progress["done"] else ("?" if eta is None else f"{eta:.0f}s"),
        )
