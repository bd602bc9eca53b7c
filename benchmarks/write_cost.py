"""Write-side benchmark: what the wake-up mechanism costs the writers.

8 pgbench clients append single-event transactions as fast as they can while the real daemon runs
a projection of those events. Modes, in interleaved rounds:
- `none`: the events trigger disabled (the daemon only polls): the writers' ceiling.
- `always`: a trigger that notifies in every appending transaction (projectord's first design).
- `projectord`: the installed trigger, which notifies only while a listener sleeps.
- `unordered`: as `projectord`, without the store's ordering trigger (`events_ordered`, which
  sets `transaction_id` and checks each aggregate's version order): what that trigger costs.
- `overwrite`: as `projectord`, with an ordering trigger that only sets `transaction_id`: what
  the version-order check costs beyond it.
Each NOTIFY takes a cluster-wide lock at commit and holds it through the commit's flush, so
notifying in every transaction serialises the writers' commits.

    python -m benchmarks.write_cost                    # 6 rounds of 8 s per mode
    python -m benchmarks.write_cost --smoke            # CI: short
    python -m benchmarks.write_cost --next-version     # each append extends an existing aggregate
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import psycopg

from benchmarks.bench_db import (
    argument_parser,
    banner,
    fresh_database,
    median,
    server,
    server_description,
)
from benchmarks.processes import (
    APPEND_SCRIPT,
    NEXT_VERSION_SCRIPT,
    append_with_pgbench,
    daemon,
)
from benchmarks.projections import Pings
from projectord.runner.loop import BUSY_READ_PAUSE

MODES = ("none", "always", "projectord", "unordered", "overwrite")
POLL = str(BUSY_READ_PAUSE)
ALWAYS_NOTIFY = """
CREATE OR REPLACE FUNCTION projectord.notify_events_appended() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('projectord_' || TG_TABLE_SCHEMA, '');
    RETURN NULL;
END;
$$
"""
INSTALLED = """
SELECT pg_get_functiondef('projectord.notify_events_appended()'::regprocedure)
"""
INSTALLED_ORDER = """
SELECT pg_get_functiondef('projectord.order_appended_event()'::regprocedure)
"""
OVERWRITE_ONLY = """
CREATE OR REPLACE FUNCTION projectord.order_appended_event() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.transaction_id := pg_current_xact_id();
    RETURN NEW;
END;
$$
"""


def set_order_mode(conn: psycopg.Connection[object], mode: str, installed_order: str) -> None:
    """The store's ordering trigger as installed, disabled (`unordered`) or reduced to setting
    `transaction_id` (`overwrite`)."""
    conn.execute(OVERWRITE_ONLY if mode == "overwrite" else installed_order)
    action = "DISABLE" if mode == "unordered" else "ENABLE"
    conn.execute(f"ALTER TABLE projectord.events {action} TRIGGER events_ordered")


def set_mode(url: str, mode: str, installed: str, installed_order: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        set_order_mode(conn, mode, installed_order)
        if mode == "none":
            conn.execute("ALTER TABLE projectord.events DISABLE TRIGGER events_appended")
            return
        conn.execute(ALWAYS_NOTIFY if mode == "always" else installed)
        conn.execute("ALTER TABLE projectord.events ENABLE TRIGGER events_appended")


def main(argv: list[str] | None = None) -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument(
        "--next-version",
        action="store_true",
        help="append the next version of each client's own aggregate, not a new aggregate",
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.seconds, args.rounds = min(args.seconds, 2), 1
    banner("write-side")
    with (
        server(args.database_url) as admin_url,
        fresh_database(admin_url, [Pings()]) as url,
        tempfile.TemporaryDirectory(prefix="projectord-write-") as tmp,
    ):
        state_dir = Path(tmp)
        print(f"server: {server_description(url)}")
        print(
            f"writers: pgbench, {args.clients} clients, one event per transaction,"
            f" {args.seconds:.0f} s per round; the daemon runs `pings` throughout, reading"
            f" about every {POLL} s when it gets no wake-ups"
        )
        with psycopg.connect(url, autocommit=True) as conn:
            row = conn.execute(INSTALLED).fetchone()
            order_row = conn.execute(INSTALLED_ORDER).fetchone()
            assert row is not None and order_row is not None
            installed, installed_order = row[0], order_row[0]
        script = NEXT_VERSION_SCRIPT if args.next_version else APPEND_SCRIPT
        print(
            "appends: "
            + (
                "the next version of an existing aggregate"
                if args.next_version
                else "version 1 of a new aggregate"
            )
        )
        rates: dict[str, list[float]] = {mode: [] for mode in MODES}
        # The daemon reads about every 20 ms in every mode: with the trigger disabled its
        # listener polls that often, and with busy writers (no wake-ups) a runner pauses as long
        # between two short batches (projectord/runner/loop.py, BUSY_READ_PAUSE). So the modes
        # differ
        # only by the trigger, not by how often the daemon works next to the writers.
        with daemon(url, "benchmarks.projections:pings", state_dir, poll_interval=POLL):
            for round_ in range(args.rounds):
                turn = round_ % len(MODES)
                order = MODES[turn:] + MODES[:turn]
                line = []
                for mode in order:
                    set_mode(url, mode, installed, installed_order)
                    time.sleep(0.5)  # let the daemon catch up between rounds
                    tps = append_with_pgbench(
                        url,
                        clients=args.clients,
                        seconds=args.seconds,
                        state_dir=state_dir,
                        append_script=script,
                    )
                    rates[mode].append(tps)
                    line.append(f"{mode} {tps:,.0f}")
                print(f"round {round_ + 1}: " + " | ".join(line) + " appends/s", flush=True)
            set_mode(url, "projectord", installed, installed_order)
    print(f"\nsummary: median of {args.rounds} interleaved rounds")
    for mode in MODES:
        ratios = [r / base for r, base in zip(rates[mode], rates["none"], strict=True)]
        print(
            f"  {mode:<11} {median(rates[mode]):>9,.0f} appends/s"
            f"   vs none: {median(ratios):.2f}x (rounds {min(ratios):.2f}-{max(ratios):.2f})"
        )
    ratios = [r / base for r, base in zip(rates["projectord"], rates["none"], strict=True)]
    cost = 1 - median(ratios)
    verdict = "met" if cost <= 0.10 else "NOT met"
    print(f"  wake-up cost with projectord's trigger: {cost:.0%} (target <= 10%): {verdict}")
    for label, mode, reference in (
        ("the ordering trigger (transaction_id + version-order check)", "projectord", "unordered"),
        ("setting transaction_id alone", "overwrite", "unordered"),
        ("the version-order check beyond it", "projectord", "overwrite"),
    ):
        pairs = zip(rates[mode], rates[reference], strict=True)
        print(f"  cost of {label}: {1 - median([r / b for r, b in pairs]):.1%}")


if __name__ == "__main__":
    main()
