"""Many projections in one daemon: memory, idle CPU, and their combined catch-up against one.

The real daemon runs 1, then 50 copies of the reference `Balances` projection (each with its own
table), in interleaved rounds, each on a fresh database. Once the daemon is idle (its listener
armed, every runner asleep), N events are committed in one transaction and the clock runs until
every projection has applied them. Combined catch-up is projections * N / time; the target is at
least 70 % of one projection's rate. Memory is the daemon's peak RSS (VmHWM); idle CPU is its CPU
time over an idle period after the catch-up.

    python -m benchmarks.many_projections              # 50 projections, 20k events
    python -m benchmarks.many_projections --smoke      # CI: small
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg

from benchmarks.bench_db import (
    SCHEMA,
    argument_parser,
    banner,
    fresh_database,
    generate_history,
    median,
    server,
    server_description,
)
from benchmarks.processes import cpu_seconds, daemon
from benchmarks.projections import balances_copy
from projectord.daemon.listener import channel_name
from projectord.queries import Queries

ARMED = Queries(SCHEMA)["armed_listeners"]
APPLIED = """
SELECT count(*) FILTER (WHERE applied_total >= %s) FROM projectord.projection_positions
"""


def wait_for(url: str, query: str, params: Any, value: int, timeout: float) -> None:
    """Poll `query` until its first column reaches `value`."""
    deadline = time.monotonic() + timeout
    with psycopg.connect(url, autocommit=True) as conn:
        while (conn.execute(query, params).fetchone() or (0,))[0] < value:
            if time.monotonic() > deadline:
                raise SystemExit(f"timed out waiting for {query.split()[1]}... to reach {value}")
            time.sleep(0.02)


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def phase(
    admin_url: str, count: int, args: argparse.Namespace, state_dir: Path
) -> tuple[float, float, float]:
    """Catch-up of `count` projections; returns (seconds, peak RSS MiB, idle CPU %)."""
    projections = [balances_copy(n) for n in range(count)]
    with fresh_database(admin_url, projections) as url:
        settings = {"batch_size": str(args.batch_size)} if args.batch_size else {}
        env_count = {"BENCH_PROJECTIONS": str(count)}
        os.environ.update(env_count)  # the daemon inherits it: how many copies to run
        with daemon(url, "benchmarks.projections:many_balances", state_dir, **settings) as process:
            # Every runner asleep: the listener is armed.
            wait_for(url, ARMED, {"channel": channel_name(SCHEMA)}, 1, timeout=60)
            started = time.perf_counter()
            generate_history(
                url, args.events, per_transaction=args.events, progress=False, vacuum=False
            )
            wait_for(url, APPLIED, (args.events,), count, timeout=600)
            seconds = time.perf_counter() - started
            time.sleep(2)  # settle: the last checkpoints, the listener re-armed
            cpu = cpu_seconds(process.pid)
            time.sleep(args.idle_seconds)
            idle = (cpu_seconds(process.pid) - cpu) / args.idle_seconds * 100
            return seconds, peak_rss_mib(process.pid), idle


def main(argv: list[str] | None = None) -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--projections", type=int, default=50)
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--idle-seconds", type=float, default=30)
    parser.add_argument("--batch-size", type=int, help="the daemon's batch_size (its default)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.events, args.rounds, args.idle_seconds = 2000, 1, 5
    banner("many-projections")
    results: dict[int, list[tuple[float, float, float]]] = {1: [], args.projections: []}
    with (
        server(args.database_url, fsync_off=args.fsync_off) as admin_url,
        tempfile.TemporaryDirectory() as tmp,
    ):
        print(f"server: {server_description(admin_url)}")
        print(f"history: {args.events:,} events in one transaction, committed once all sleep")
        for round_ in range(args.rounds):
            order = [1, args.projections] if round_ % 2 == 0 else [args.projections, 1]
            for count in order:
                seconds, rss, idle = phase(admin_url, count, args, Path(tmp))
                results[count].append((seconds, rss, idle))
                print(
                    f"round {round_ + 1}: {count:>3} projection(s): {seconds:6.2f} s,"
                    f" {count * args.events / seconds:>9,.0f} events applied/s,"
                    f" peak RSS {rss:5.1f} MiB, idle CPU {idle:.2f} % of a core",
                    flush=True,
                )
    single = median([args.events / r[0] for r in results[1]])
    many = median([args.projections * args.events / r[0] for r in results[args.projections]])
    rss = max(r[1] for r in results[args.projections])
    idle = median([r[2] for r in results[args.projections]])
    print(f"\nsummary: median of {args.rounds} rounds")
    print(f"  1 projection:   {single:>9,.0f} events/s")
    print(
        f"  {args.projections} projections: {many:>9,.0f} events/s combined,"
        f" {many / single:.2f}x of one (target >= 0.70x):"
        f" {'met' if many / single >= 0.7 else 'NOT met'}"
    )
    print(f"  peak RSS {rss:.1f} MiB (target < 200): {'met' if rss < 200 else 'NOT met'}")
    print(f"  idle CPU {idle:.2f} % of a core (target < 1 %): {'met' if idle < 1 else 'NOT met'}")


if __name__ == "__main__":
    main()
