"""Live latency benchmark: from the writer's commit acknowledgement to the handler's write of that
event, with the real daemon as a process, against a minimal hand-written loop in the same run.

Writers are Python threads (sync psycopg), each appending one event per transaction on a Poisson
schedule and noting the wall-clock time its COMMIT returned; the handler notes
`clock_timestamp()` when it writes the event (same machine, same clock). Phases:
- 200 tx/s from one writer, 2000 tx/s from four;
- `saturated`: 8 pgbench clients appending as fast as they go, and one probe writer at 50 tx/s
  whose events are measured: what a projection trails by while the writers are busy.

The reference (`--reference-loop`), measured in interleaved phases of the same run, is a minimal
sync loop: LISTEN on a plain statement-level NOTIFY trigger (installed for its phases in place of
projectord's wake-up trigger), on each notification the same gap-safe read below the xmin
horizon and one INSERT, nothing else.

    python -m benchmarks.live_latency                  # durable embedded server
    python -m benchmarks.live_latency --database-url postgresql://postgres@127.0.0.1/postgres
    python -m benchmarks.live_latency --smoke          # CI: short
"""

from __future__ import annotations

import argparse
import random
import signal
import subprocess
import sys
import tempfile
import threading
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
from benchmarks.processes import (
    APPEND_SCRIPT,
    append_with_pgbench,
    background,
    cpu_seconds,
    daemon,
)
from benchmarks.projections import LatencyProbe
from projectord.daemon.listener import channel_name
from projectord.database import configure_json

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
# The reference's wake-up: what a hand-written loop would install.
PLAIN_NOTIFY = f"""
CREATE OR REPLACE FUNCTION projectord.bench_plain_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('{channel_name(SCHEMA)}', '');
    RETURN NULL;
END;
$$;
CREATE TRIGGER bench_plain_notify AFTER INSERT ON projectord.events
FOR EACH STATEMENT EXECUTE FUNCTION projectord.bench_plain_notify()
"""
APPEND = (
    "INSERT INTO projectord.events (tenant_id, aggregate_id, version, type, payload)"
    " VALUES ('00000000-0000-0000-0000-00000000000b', gen_random_uuid(), 1, 'Pinged',"
    " jsonb_build_object('clock', extract(epoch FROM clock_timestamp())))"
    " RETURNING global_position"
)
APPLIED_AT = "SELECT global_position, extract(epoch FROM applier_clock) FROM {table}"
WAIT_DEADLINE = 60.0


def reference_loop(url: str) -> None:
    """The hand-written applier: LISTEN, read below the horizon, INSERT, commit."""
    listener = psycopg.connect(url, autocommit=True)
    listener.execute(f'LISTEN "{channel_name(SCHEMA)}"')
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


def set_wakeup(url: str, kind: str) -> None:
    """projectord's wake-up trigger for its phases, a plain NOTIFY trigger for the reference's."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DROP TRIGGER IF EXISTS bench_plain_notify ON projectord.events")
        if kind == "reference":
            conn.execute("ALTER TABLE projectord.events DISABLE TRIGGER events_appended")
            conn.execute(PLAIN_NOTIFY)
        else:
            conn.execute("ALTER TABLE projectord.events ENABLE TRIGGER events_appended")


def paced_writers(url: str, rate: float, threads: int, seconds: float) -> dict[int, float]:
    """`threads` connections appending one event per transaction, `rate` a second in all
    (Poisson); returns each event's position and the wall-clock time its COMMIT returned."""
    acks: dict[int, float] = {}
    lock = threading.Lock()
    start = time.perf_counter() + 0.05

    def write() -> None:
        mine: dict[int, float] = {}
        with psycopg.connect(url) as conn:
            due = start
            while True:
                due += random.expovariate(rate / threads)
                if due - start > seconds:
                    break
                delay = due - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                row = conn.execute(APPEND).fetchone()
                conn.commit()
                mine[row[0]] = time.time()  # type: ignore[index]
        with lock:
            acks.update(mine)

    workers = [threading.Thread(target=write) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return acks


def measure(
    url: str, table: str, phase: str, rate: int, seconds: float, state_dir: Path, pid: int
) -> tuple[float, list[float], float]:
    """One phase: achieved tx/s of the measured writers, each measured event's latency (ms) and
    the applier's CPU time per applied event (µs)."""
    with psycopg.connect(url, autocommit=True) as conn:
        before = scalar(conn, "SELECT coalesce(max(global_position), 0) FROM projectord.events")
        cpu = cpu_seconds(pid)
        if phase == "saturated":
            background_load = threading.Thread(
                target=append_with_pgbench,
                args=(url,),
                kwargs={
                    "clients": 8,
                    "seconds": seconds,
                    "state_dir": state_dir,
                    "append_script": APPEND_SCRIPT,
                },
            )
            background_load.start()
            acks = paced_writers(url, 50, 1, seconds - 0.5)
            background_load.join()
        else:
            acks = paced_writers(url, rate, 1 if rate <= 200 else 4, seconds)
        expected = scalar(
            conn, "SELECT count(*) FROM projectord.events WHERE global_position > %s", before
        )
        deadline = time.monotonic() + WAIT_DEADLINE
        while True:
            done = scalar(conn, f"SELECT count(*) FROM {table} WHERE global_position > %s", before)
            if done >= expected:
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"{table}: {expected - done} events never applied")
            time.sleep(0.05)
        cpu_us = (cpu_seconds(pid) - cpu) / max(expected, 1) * 1e6
        applied = dict(
            conn.execute(
                APPLIED_AT.format(table=table) + " WHERE global_position > %s", (before,)
            ).fetchall()
        )
    latencies = [(float(applied[p]) - ack) * 1000 for p, ack in acks.items()]
    return len(acks) / seconds, latencies, cpu_us


def main(argv: list[str] | None = None) -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--rates", default="200,2000", help="writer transactions per second")
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--no-saturated", action="store_true", help="skip the saturated phase")
    parser.add_argument("--reference-loop", metavar="URL", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.reference_loop:
        reference_loop(args.reference_loop)
        return
    if args.smoke:
        args.seconds, args.rounds = min(args.seconds, 3), 1
    phases: list[tuple[str, int]] = [(f"{int(r)} tx/s", int(r)) for r in args.rates.split(",")]
    if not args.no_saturated:
        phases.append(("saturated", 50))
    banner("live latency")
    with (
        server(args.database_url, fsync_off=args.fsync_off) as admin_url,
        fresh_database(admin_url, [LatencyProbe()]) as url,
        tempfile.TemporaryDirectory(prefix="projectord-latency-") as tmp,
    ):
        state_dir = Path(tmp)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(REFERENCE_TABLE)
        print(f"server: {server_description(url)}")
        print(
            "latency: writer's COMMIT returned -> the handler's write (clock_timestamp());"
            f" {args.seconds:.0f} s per phase; 200 tx/s from one writer, more from four;"
            " saturated: 8 pgbench clients flat out plus one probe writer at 50 tx/s"
        )
        results: dict[tuple[str, str], list[float]] = {}
        achieved: dict[tuple[str, str], list[float]] = {}
        cpu: dict[tuple[str, str], list[float]] = {}  # the applier's CPU µs per event
        tables = {"projectord": "latency_probe", "reference": "latency_reference"}
        for round_ in range(args.rounds):
            kinds = ["projectord", "reference"] if round_ % 2 == 0 else ["reference", "projectord"]
            for kind in kinds:
                set_wakeup(url, kind)
                with applier(kind, url, state_dir) as process:
                    pid = process.pid
                    measure(url, tables[kind], "warm-up", 50, 1, state_dir, pid)
                    for name, rate in phases:
                        tps, latencies, cpu_us = measure(
                            url, tables[kind], name, rate, args.seconds, state_dir, pid
                        )
                        results.setdefault((kind, name), []).extend(latencies)
                        achieved.setdefault((kind, name), []).append(tps)
                        cpu.setdefault((kind, name), []).append(cpu_us)
                        print(
                            f"round {round_ + 1} {kind:<10} {name:>10} (measured {tps:,.0f}/s):"
                            f" p50 {percentile(latencies, 0.5):6.2f} ms"
                            f"  p99 {percentile(latencies, 0.99):6.2f} ms"
                            f"  n={len(latencies)}  CPU {cpu_us:,.0f} us/event",
                            flush=True,
                        )
        set_wakeup(url, "projectord")
        print("\nsummary (all rounds pooled):")
        for name, _rate in phases:
            for kind in ("projectord", "reference"):
                values = results[(kind, name)]
                print(
                    f"  {kind:<10} {name:>10}:"
                    f" p50 {percentile(values, 0.5):6.2f} ms  p90 {percentile(values, 0.9):6.2f} ms"
                    f"  p99 {percentile(values, 0.99):6.2f} ms  max {max(values):7.2f} ms"
                    f"  n={len(values)}  CPU {median(cpu[(kind, name)]):,.0f} us/event"
                )
            mine, ref = results[("projectord", name)], results[("reference", name)]
            p50 = percentile(mine, 0.5) / percentile(ref, 0.5)
            p99 = percentile(mine, 0.99) / percentile(ref, 0.99)
            verdict = "met" if p50 <= 1.2 and p99 <= 1.5 else "NOT met"
            if name == "saturated":
                verdict = "(no target: reported)"
            print(
                f"  {name}: projectord / reference p50 {p50:.2f}x, p99 {p99:.2f}x"
                f" (target <= 1.2x / 1.5x): {verdict}"
            )


if __name__ == "__main__":
    main()
