"""Live latency benchmark: from the commit of a writer's single-event transaction to the commit of
the projection transaction that applied it, with the real daemon as a process.

pgbench is the writer (4 clients, a Poisson schedule at the target rate, one INSERT per
transaction), so the writer costs the machine little. Latency comes from the server's commit
timestamps (`track_commit_timestamp`, which this benchmark turns on in its embedded server); on a
server without them it falls back to `clock_timestamp()` at the writer's INSERT and at the
handler, and says so.

The reference, measured in the same run with interleaved phases, is a minimal hand-written loop
(`--reference-loop`): sync psycopg, LISTEN, on each notification the same gap-safe read below the
xmin horizon and one INSERT, nothing else.

    python -m benchmarks.live_latency                  # 200 and 2000 tx/s, 10 s each
    python -m benchmarks.live_latency --smoke          # CI: short
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import AbstractContextManager
from pathlib import Path

import psycopg

from benchmarks.bench_db import (
    SCHEMA,
    argument_parser,
    banner,
    fresh_database,
    median,
    percentile,
    scalar,
    server,
    server_description,
)
from benchmarks.processes import append_with_pgbench, background, cpu_seconds, daemon
from benchmarks.projections import LatencyProbe
from projectord.database import configure_json
from projectord.listener import channel_name
from projectord.queries import Queries

REFERENCE_TABLE = """
CREATE TABLE IF NOT EXISTS latency_reference (
    global_position bigint PRIMARY KEY, writer_xid xid8 NOT NULL, writer_clock float8 NOT NULL,
    applier_xid xid8 NOT NULL, applier_clock timestamptz NOT NULL)
"""
REFERENCE_FETCH = """
SELECT pg_snapshot_xmin(pg_current_snapshot())::text,
       EXISTS (SELECT 1 FROM projectord.events w
               WHERE w.transaction_id >= pg_snapshot_xmin(pg_current_snapshot())),
       array_agg(e.global_position ORDER BY e.transaction_id, e.global_position),
       array_agg(e.transaction_id::text ORDER BY e.transaction_id, e.global_position),
       array_agg((e.payload->>'clock')::float8 ORDER BY e.transaction_id, e.global_position)
FROM projectord.events e
WHERE (e.transaction_id, e.global_position) > (%s::xid8, %s::bigint)
  AND e.transaction_id < pg_snapshot_xmin(pg_current_snapshot())
  AND e.type = 'Pinged'
"""
REFERENCE_APPLY = """
INSERT INTO latency_reference
SELECT p, x::xid8, c, pg_current_xact_id(), clock_timestamp()
FROM unnest(%s::bigint[], %s::text[], %s::float8[]) AS u(p, x, c)
"""
# Latency per event of one phase: commit to commit (commit timestamps) or clock to clock.
_XID = "(({0})::text::bigint %% 4294967296)::text::xid"
LATENCY_BY_COMMIT_TS = f"""
SELECT extract(epoch FROM pg_xact_commit_timestamp({_XID.format("applier_xid")})
                        - pg_xact_commit_timestamp({_XID.format("writer_xid")})) * 1000
FROM {{table}} WHERE global_position > %s
"""
LATENCY_BY_CLOCK = """
SELECT (extract(epoch FROM applier_clock) - writer_clock) * 1000
FROM {table} WHERE global_position > %s
"""


def reference_loop(url: str) -> None:
    """The hand-written applier: LISTEN, read below the horizon, INSERT, commit. It stays armed
    (sql/queries/listener.sql), so every append notifies it, as a simple loop would want."""
    listener = psycopg.connect(url, autocommit=True)
    listener.execute(f'LISTEN "{channel_name(SCHEMA)}"')
    listener.execute(Queries(SCHEMA)["arm_wakeups"], {"channel": channel_name(SCHEMA)})
    conn = psycopg.connect(url)
    configure_json(conn)
    conn.execute(REFERENCE_TABLE)
    conn.commit()
    row = conn.execute(
        "SELECT r.writer_xid::text, r.global_position FROM latency_reference r"
        " ORDER BY r.writer_xid DESC, r.global_position DESC LIMIT 1"
    ).fetchone()
    checkpoint = (row[0], row[1]) if row else ("0", 0)  # where an earlier phase stopped
    held_back = False
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    while not stop:
        timeout = 0.002 if held_back else 0.5
        for _ in listener.notifies(timeout=timeout, stop_after=1):
            break
        horizon, held_back, positions, xids, clocks = conn.execute(
            REFERENCE_FETCH, checkpoint
        ).fetchone()  # type: ignore[misc]
        if positions:
            conn.execute(REFERENCE_APPLY, (positions, xids, clocks))
            checkpoint = (xids[-1], positions[-1])
        conn.commit()
        del horizon


def applier(
    kind: str, url: str, state_dir: Path
) -> AbstractContextManager[subprocess.Popen[bytes]]:
    """The daemon (`projectord`) or the reference loop, as a process, for one phase."""
    if kind == "projectord":
        return daemon(url, "benchmarks.projections:latency_probe", state_dir)
    command = [sys.executable, "-m", "benchmarks.live_latency", "--reference-loop", url]
    return background("reference", command, state_dir)


def measure(
    url: str,
    table: str,
    rate: int,
    seconds: float,
    clients: int,
    state_dir: Path,
    by_commit: bool,
    pid: int,
) -> tuple[float, list[float], float]:
    """One phase: transactions/s achieved, each event's latency (ms), and the applier's CPU
    time per event (µs), from the first append until every event is applied."""
    with psycopg.connect(url, autocommit=True) as conn:
        before = scalar(conn, "SELECT coalesce(max(global_position), 0) FROM projectord.events")
        cpu = cpu_seconds(pid)
        achieved = append_with_pgbench(
            url, clients=clients, seconds=seconds, state_dir=state_dir, rate=rate
        )
        expected = scalar(
            conn, "SELECT count(*) FROM projectord.events WHERE global_position > %s", before
        )
        deadline = time.monotonic() + 30
        while True:
            done = scalar(conn, f"SELECT count(*) FROM {table} WHERE global_position > %s", before)
            if done >= expected:
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"{table}: {expected - done} events never applied")
            time.sleep(0.05)
        cpu_us = (cpu_seconds(pid) - cpu) / max(expected, 1) * 1e6
        query = (LATENCY_BY_COMMIT_TS if by_commit else LATENCY_BY_CLOCK).format(table=table)
        latencies = [float(r[0]) for r in conn.execute(query, (before,))]
    return achieved, latencies, cpu_us


def main(argv: list[str] | None = None) -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--rates", default="200,2000", help="writer transactions per second")
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--reference-loop", metavar="URL", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.reference_loop:
        reference_loop(args.reference_loop)
        return
    if args.smoke:
        args.seconds, args.rounds = min(args.seconds, 3), 1
    rates = [int(r) for r in args.rates.split(",")]
    banner("live latency")
    settings = ["track_commit_timestamp=on"]
    with (
        server(args.database_url, settings=settings, fsync_off=args.fsync_off) as admin_url,
        fresh_database(admin_url, [LatencyProbe()]) as url,
        tempfile.TemporaryDirectory(prefix="projectord-latency-") as tmp,
    ):
        state_dir = Path(tmp)
        with psycopg.connect(url, autocommit=True) as conn:
            by_commit = scalar(conn, "SELECT current_setting('track_commit_timestamp') = 'on'")
            conn.execute(REFERENCE_TABLE)
        print(f"server: {server_description(url)}")
        print(
            "latency: "
            + (
                "commit timestamps (writer commit -> projection commit)"
                if by_commit
                else "clock_timestamp() at the writer's INSERT -> at the handler"
                " (no commit timestamps)"
            )
        )
        print(f"writer: pgbench, {args.clients} clients, {args.seconds:.0f} s per phase")
        results: dict[tuple[str, int], list[float]] = {}
        achieved: dict[tuple[str, int], list[float]] = {}
        cpu: dict[tuple[str, int], list[float]] = {}  # the applier's CPU µs per event
        tables = {"projectord": "latency_probe", "reference": "latency_reference"}
        for round_ in range(args.rounds):
            kinds = ["projectord", "reference"] if round_ % 2 == 0 else ["reference", "projectord"]
            for kind in kinds:
                with applier(kind, url, state_dir) as process:
                    pid = process.pid
                    measure(url, tables[kind], 50, 1, 1, state_dir, by_commit, pid)  # warm-up
                    for rate in rates:
                        tps, latencies, cpu_us = measure(
                            url,
                            tables[kind],
                            rate,
                            args.seconds,
                            args.clients,
                            state_dir,
                            by_commit,
                            pid,
                        )
                        results.setdefault((kind, rate), []).extend(latencies)
                        achieved.setdefault((kind, rate), []).append(tps)
                        cpu.setdefault((kind, rate), []).append(cpu_us)
                        print(
                            f"round {round_ + 1} {kind:<10} {rate:>5} tx/s (achieved {tps:,.0f}):"
                            f" p50 {percentile(latencies, 0.5):6.2f} ms"
                            f"  p99 {percentile(latencies, 0.99):6.2f} ms"
                            f"  n={len(latencies)}  CPU {cpu_us:,.0f} us/event",
                            flush=True,
                        )
        print("\nsummary (all rounds pooled):")
        for rate in rates:
            for kind in ("projectord", "reference"):
                values = results[(kind, rate)]
                print(
                    f"  {kind:<10} {rate:>5} tx/s (achieved {median(achieved[(kind, rate)]):,.0f}):"
                    f" p50 {percentile(values, 0.5):6.2f} ms  p90 {percentile(values, 0.9):6.2f} ms"
                    f"  p99 {percentile(values, 0.99):6.2f} ms  max {max(values):7.2f} ms"
                    f"  n={len(values)}  CPU {median(cpu[(kind, rate)]):,.0f} us/event"
                )
            mine = results[("projectord", rate)]
            met = percentile(mine, 0.5) <= 2 and percentile(mine, 0.99) <= 6
            verdict = "met" if met else "NOT met"
            print(f"  target at {rate} tx/s (p50 <= 2 ms, p99 <= 6 ms): {verdict}")


if __name__ == "__main__":
    main()
