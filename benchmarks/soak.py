"""Soak: the real daemon under an hour of mixed load, printing every minute what grows.

The load, all at once:
- live writers: pgbench at `--rate` single-event transactions per second (the `latency_probe`
  projection measures each event's latency, writer's INSERT to the handler);
- a catch-up burst of `--burst-events` account events every `--burst-minutes`;
- an offline rebuild of `balances` (through the control socket) every `--rebuild-minutes`;
- one of the daemon's backends terminated (`pg_terminate_backend`) every minute.

Every tick (a minute by default) it prints the daemon's RSS, CPU, open file descriptors, its
connections to the server (pool and listener), the tick's live latency p50/p99 and the lag that
`projectord status` reports. At the end it stops the writers, waits for the daemon, and checks the
state is exact: `balances` equals a fold of the events in SQL, and every `Pinged` event was
applied exactly once. RSS and file descriptors must stay flat after the warm-up (the first
`--warm-up-minutes`): under 10 % growth.

    python -m benchmarks.soak                 # an hour
    python -m benchmarks.soak --minutes 5
    python -m benchmarks.soak --smoke         # CI: one minute, ticks of 15 s
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

from benchmarks.bench_db import (
    FOLD_SQL,
    argument_parser,
    banner,
    fresh_database,
    generate_history,
    percentile,
    scalar,
    server,
    server_description,
)
from benchmarks.processes import APPEND_SCRIPT, background, cpu_seconds, daemon, pgbench_path
from benchmarks.projections import soak_projections
from projectord.database import APPLICATION_NAME

GROWTH_LIMIT = 0.10  # RSS and file descriptors after the warm-up
LATENCY_SINCE = """
SELECT (extract(epoch FROM applier_clock) - writer_clock) * 1000
FROM latency_probe WHERE global_position > %s
"""
PINGED_NOT_APPLIED = """
SELECT count(*) FROM projectord.events e
WHERE e.type = 'Pinged'
  AND NOT EXISTS (SELECT 1 FROM latency_probe p WHERE p.global_position = e.global_position)
"""
APPLIED_NOT_PINGED = """
SELECT count(*) FROM latency_probe p
WHERE NOT EXISTS (
    SELECT 1 FROM projectord.events e
    WHERE e.global_position = p.global_position AND e.type = 'Pinged'
)
"""
BALANCES_DIFFER = f"""
SELECT count(*) FROM (
    (SELECT id, tenant_id, balance, events FROM balances EXCEPT ({FOLD_SQL}))
    UNION ALL
    (({FOLD_SQL}) EXCEPT SELECT id, tenant_id, balance, events FROM balances)
) AS d
"""


@dataclass
class Sample:
    minute: float
    rss_mib: float
    cpu_percent: float
    fds: int
    connections: int
    p50_ms: float
    p99_ms: float
    events: int
    lag: int | str


@dataclass
class Soak:
    """The daemon under load, and what is measured of it tick by tick."""

    url: str
    state_dir: Path
    pid: int
    samples: list[Sample] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    last_cpu: float = 0.0
    last_position: int = 0
    rng: random.Random = field(default_factory=lambda: random.Random(7))

    def cli(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        env = {
            **os.environ,
            "PROJECTORD_DATABASE_URL": self.url,
            "PROJECTORD_STATE_DIR": str(self.state_dir),
            "PROJECTORD_PROJECTIONS": "benchmarks.projections:soak_projections",
        }
        return subprocess.run(
            [sys.executable, "-m", "projectord", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def lag(self) -> int | str:
        result = self.cli("status", "--json", timeout=30)
        if result.returncode != 0:
            return f"status exit {result.returncode}"
        return sum(int(p["lag"]) for p in json.loads(result.stdout)["projections"])

    def sample(self, conn: psycopg.Connection[object], seconds: float) -> Sample:
        cpu = cpu_seconds(self.pid)
        latencies = [float(r[0]) for r in conn.execute(LATENCY_SINCE, (self.last_position,))]
        self.last_position = scalar(
            conn, "SELECT coalesce(max(global_position), 0) FROM latency_probe"
        )
        sample = Sample(
            minute=(time.monotonic() - self.started) / 60,
            rss_mib=_rss_kib(self.pid) / 1024,
            cpu_percent=(cpu - self.last_cpu) / seconds * 100,
            fds=len(os.listdir(f"/proc/{self.pid}/fd")),
            connections=scalar(
                conn,
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND application_name = %s",
                APPLICATION_NAME,
            ),
            p50_ms=percentile(latencies, 0.5) if latencies else float("nan"),
            p99_ms=percentile(latencies, 0.99) if latencies else float("nan"),
            events=len(latencies),
            lag=self.lag(),
        )
        self.last_cpu = cpu
        self.samples.append(sample)
        return sample

    def terminate_a_backend(self, conn: psycopg.Connection[object]) -> int:
        pids = [
            int(r[0])
            for r in conn.execute(
                "SELECT pid FROM pg_stat_activity"
                " WHERE datname = current_database() AND application_name = %s",
                (APPLICATION_NAME,),
            )
        ]
        if not pids:
            return 0
        victim = self.rng.choice(pids)
        conn.execute("SELECT pg_terminate_backend(%s)", (victim,))
        return victim

    def rebuild(self) -> str:
        started = time.monotonic()
        result = self.cli("rebuild", "balances", "--wait")
        took = time.monotonic() - started
        if result.returncode != 0:
            return f"rebuild FAILED (exit {result.returncode}): {result.stderr.strip()}"
        return f"rebuild of balances done in {took:.1f} s"


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def print_sample(sample: Sample) -> None:
    print(
        f"{sample.minute:6.1f} min  RSS {sample.rss_mib:6.1f} MiB  CPU {sample.cpu_percent:5.1f} %"
        f"  fds {sample.fds:4d}  connections {sample.connections:2d}"
        f"  live p50 {sample.p50_ms:7.2f} ms  p99 {sample.p99_ms:8.2f} ms (n={sample.events})"
        f"  lag {sample.lag}",
        flush=True,
    )


def growth(samples: list[Sample], warm_up: float, value: str) -> float:
    """How much `value` grew from the first sample after the warm-up to the largest one since."""
    after = [s for s in samples if s.minute >= warm_up] or samples[-1:]
    base = getattr(after[0], value)
    return (max(getattr(s, value) for s in after) - base) / base if base else 0.0


def exact_state(soak: Soak) -> list[str]:
    """What is wrong with the read models once every event is applied (empty when exact)."""
    problems = []
    waited = soak.cli("wait", "--timeout", "300", timeout=330)
    if waited.returncode != 0:
        problems.append(f"`projectord wait` exited {waited.returncode}: {waited.stderr.strip()}")
    with psycopg.connect(soak.url) as conn:
        # One snapshot for every count, so a late event cannot fall between two of them.
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        differ = scalar(conn, BALANCES_DIFFER)
        missing = scalar(conn, PINGED_NOT_APPLIED)
        extra = scalar(conn, APPLIED_NOT_PINGED)
    if differ:
        problems.append(f"{differ} balances rows differ from the fold of the events")
    if missing or extra:
        problems.append(f"{missing} Pinged events not applied, {extra} applied that are not")
    return problems


def main(argv: list[str] | None = None) -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--minutes", type=float, default=60)
    parser.add_argument("--tick", type=float, default=60, help="seconds between samples")
    parser.add_argument("--rate", type=int, default=300, help="live transactions per second")
    parser.add_argument("--burst-events", type=int, default=50_000)
    parser.add_argument("--burst-minutes", type=float, default=5)
    parser.add_argument("--rebuild-minutes", type=float, default=10)
    parser.add_argument("--warm-up-minutes", type=float, default=10)
    args = parser.parse_args(argv)
    if args.smoke:
        args.minutes, args.tick, args.burst_events = 1, 15, 5_000
        args.burst_minutes, args.rebuild_minutes, args.warm_up_minutes = 0.25, 0.5, 0.25
    banner("soak")
    with (
        server(args.database_url, fsync_off=args.fsync_off) as admin_url,
        fresh_database(admin_url, soak_projections()) as url,
        tempfile.TemporaryDirectory(prefix="projectord-soak-") as tmp,
    ):
        state_dir = Path(tmp)
        print(f"server: {server_description(url)}")
        print(
            f"load: pgbench {args.rate} tx/s; {args.burst_events:,} events every"
            f" {args.burst_minutes:g} min; a rebuild every {args.rebuild_minutes:g} min;"
            f" a backend terminated every tick ({args.tick:g} s); {args.minutes:g} min in all"
        )
        (state_dir / "append.sql").write_text(APPEND_SCRIPT)
        pgbench = [
            pgbench_path(), "-n", "-c", "4", "-j", "2", "-R", str(args.rate),
            "-T", str(round(args.minutes * 60) + 5), "-f", str(state_dir / "append.sql"), url,
        ]  # fmt: skip
        with daemon(url, "benchmarks.projections:soak_projections", state_dir) as process:
            with background("pgbench", pgbench, state_dir):
                soak = Soak(url, state_dir, process.pid, last_cpu=cpu_seconds(process.pid))
                run(soak, args)
            # The writers have stopped: only now is "every event applied" a fixed target.
            problems = exact_state(soak)
        report(soak, args.warm_up_minutes, problems)


def run(soak: Soak, args: argparse.Namespace) -> None:
    """Tick by tick until the time is up: load events, then a sample."""
    next_burst, next_rebuild = args.burst_minutes, args.rebuild_minutes
    with psycopg.connect(soak.url, autocommit=True) as conn:
        while (elapsed := (time.monotonic() - soak.started) / 60) < args.minutes:
            tick_started = time.monotonic()
            if elapsed >= next_burst:
                generate_history(soak.url, args.burst_events, progress=False, vacuum=False)
                print(f"        burst of {args.burst_events:,} events appended", flush=True)
                next_burst += args.burst_minutes
            if elapsed >= next_rebuild:
                print(f"        {soak.rebuild()}", flush=True)
                next_rebuild += args.rebuild_minutes
            victim = soak.terminate_a_backend(conn)
            print(f"        terminated backend {victim}", flush=True)
            time.sleep(max(0.0, args.tick - (time.monotonic() - tick_started)))
            print_sample(soak.sample(conn, time.monotonic() - tick_started))


def report(soak: Soak, warm_up: float, problems: list[str]) -> None:
    rss, fds = growth(soak.samples, warm_up, "rss_mib"), growth(soak.samples, warm_up, "fds")
    print(f"\nafter the {warm_up:g} min warm-up: RSS grew {rss:+.1%}, file descriptors {fds:+.1%}")
    flat = rss < GROWTH_LIMIT and fds < GROWTH_LIMIT
    print(f"flat (both under {GROWTH_LIMIT:.0%}): {'yes' if flat else 'NO'}")
    print("state at the end: " + ("exact" if not problems else "WRONG: " + "; ".join(problems)))
    if problems:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
