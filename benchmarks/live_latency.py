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
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg

from benchmarks.bench_db import (
    SCHEMA,
    fresh_database,
    machine,
    median,
    percentile,
    scalar,
    server,
    server_description,
)
from benchmarks.projections import LatencyProbe
from projectord.database import configure_json
from projectord.embedded import EmbeddedPostgres
from projectord.listener import channel_name

ROOT = Path(__file__).resolve().parent.parent
TENANT = "00000000-0000-0000-0000-00000000000b"
WRITER_SCRIPT = (
    "INSERT INTO projectord.events (tenant_id, aggregate_id, version, type, payload)"
    f" VALUES ('{TENANT}', gen_random_uuid(), 1, 'Pinged',"
    " jsonb_build_object('clock', extract(epoch FROM clock_timestamp())));\n"
)
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
    """The hand-written applier: LISTEN, read below the horizon, INSERT, commit."""
    listener = psycopg.connect(url, autocommit=True)
    listener.execute(f'LISTEN "{channel_name(SCHEMA)}"')
    conn = psycopg.connect(url)
    configure_json(conn)
    conn.execute(REFERENCE_TABLE)
    conn.commit()
    checkpoint = ("0", 0)
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


@contextmanager
def applier(kind: str, url: str, state_dir: Path) -> Iterator[None]:
    """The daemon (`projectord`) or the reference loop, as a process, for one phase."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if kind == "projectord":
        env |= {
            "PROJECTORD_DATABASE_URL": url,
            "PROJECTORD_PROJECTIONS": "benchmarks.projections:latency_probe",
            "PROJECTORD_STATE_DIR": str(state_dir),
            "PROJECTORD_LOG_FORMAT": "json",
            "PROJECTORD_LOG_LEVEL": "warning",
        }
        command = [sys.executable, "-m", "projectord", "run"]
    else:
        command = [sys.executable, "-m", "benchmarks.live_latency", "--reference-loop", url]
    with (state_dir / f"{kind}.log").open("a") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            time.sleep(1.5)  # connected and listening (the warm-up phase confirms it)
            if process.poll() is not None:
                raise SystemExit(f"{kind} exited early; see {state_dir / f'{kind}.log'}")
            yield
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(30)


def pgbench() -> str:
    found = shutil.which("pgbench")
    if found:
        return found
    try:
        return str(EmbeddedPostgres(Path(tempfile.gettempdir()) / "unused").bin_dir / "pgbench")
    except Exception as exc:
        raise SystemExit(f"pgbench not found ({exc}); install the `embedded` extra") from None


def write(url: str, rate: int, seconds: float, clients: int, state_dir: Path) -> float:
    """Single-event transactions at `rate` per second for `seconds`; returns the achieved rate."""
    script = state_dir / "append.sql"
    script.write_text(WRITER_SCRIPT)
    result = subprocess.run(
        [
            pgbench(),
            "-n",
            "-c",
            str(clients),
            "-j",
            "1",
            "-R",
            str(rate),
            "-T",
            str(int(seconds)),
            "-f",
            str(script),
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    for line in result.stdout.splitlines():
        if line.startswith("tps ="):
            return float(line.split()[2])
    return 0.0


def measure(
    url: str, table: str, rate: int, seconds: float, clients: int, state_dir: Path, by_commit: bool
) -> tuple[float, list[float]]:
    with psycopg.connect(url, autocommit=True) as conn:
        before = scalar(conn, "SELECT coalesce(max(global_position), 0) FROM projectord.events")
        achieved = write(url, rate, seconds, clients, state_dir)
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
        query = (LATENCY_BY_COMMIT_TS if by_commit else LATENCY_BY_CLOCK).format(table=table)
        latencies = [float(r[0]) for r in conn.execute(query, (before,))]
    return achieved, latencies


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", default="200,2000", help="writer transactions per second")
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--database-url", help="a server to create a throwaway database on")
    parser.add_argument("--smoke", action="store_true", help="short phases for CI")
    parser.add_argument("--reference-loop", metavar="URL", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.reference_loop:
        reference_loop(args.reference_loop)
        return
    if args.smoke:
        args.seconds, args.rounds = min(args.seconds, 3), 1
    rates = [int(r) for r in args.rates.split(",")]
    print("projectord live latency benchmark")
    print(f"machine: {machine()}")
    settings = ["track_commit_timestamp=on"]
    with (
        server(args.database_url, settings=settings) as admin_url,
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
        tables = {"projectord": "latency_probe", "reference": "latency_reference"}
        for round_ in range(args.rounds):
            kinds = ["projectord", "reference"] if round_ % 2 == 0 else ["reference", "projectord"]
            for kind in kinds:
                with applier(kind, url, state_dir):
                    measure(url, tables[kind], 50, 1, 1, state_dir, by_commit)  # warm-up
                    for rate in rates:
                        tps, latencies = measure(
                            url,
                            tables[kind],
                            rate,
                            args.seconds,
                            args.clients,
                            state_dir,
                            by_commit,
                        )
                        results.setdefault((kind, rate), []).extend(latencies)
                        achieved.setdefault((kind, rate), []).append(tps)
                        print(
                            f"round {round_ + 1} {kind:<10} {rate:>5} tx/s (achieved {tps:,.0f}):"
                            f" p50 {percentile(latencies, 0.5):6.2f} ms"
                            f"  p99 {percentile(latencies, 0.99):6.2f} ms"
                            f"  n={len(latencies)}",
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
                    f"  n={len(values)}"
                )
            mine = results[("projectord", rate)]
            met = percentile(mine, 0.5) <= 2 and percentile(mine, 0.99) <= 6
            verdict = "met" if met else "NOT met"
            print(f"  target at {rate} tx/s (p50 <= 2 ms, p99 <= 6 ms): {verdict}")


if __name__ == "__main__":
    main()
