"""Versioned projections: how long the swap of a new version takes, and how long readers wait.

A history of `--events` account events (1M by default) is folded into version 1 of the balances
projection (the live table, by one SQL statement, with its checkpoint at the end). Then version 2
(the same fold; only the version differs) is built blue/green in-process by the daemon's own
builder (`projectord.schema.versioned_build.VersionBuild`) while a writer appends and `--readers`
threads read the live table in a loop, each read one `SELECT sum(balance)` over every row.

Printed: the build's duration and rate; the swap transaction's duration (`swap`: from its first
lock to its commit, including the final catch-up under the EXCLUSIVE lock, during which reads go
on) and the part under ACCESS EXCLUSIVE (`exclusive`: readers wait for it); and the readers'
latencies: the median outside the swap, and the longest read that overlapped the exclusive part
(the time a reader waited on the swap's lock, plus one read). Every read must see a complete
table: never empty, and never fewer accounts than a read before it (version 1 is frozen during
the build, version 2 holds every account once swapped in); the benchmark fails otherwise.

    python -m benchmarks.version_swap                  # 1M events
    python -m benchmarks.version_swap --smoke          # CI: 20k events
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import anyio
import psycopg

from benchmarks.bench_db import (
    FOLD_SQL,
    SCHEMA,
    argument_parser,
    banner,
    fresh_database,
    generate_history,
    median,
    server,
    server_description,
)
from projectord.config import load_settings
from projectord.database import make_pool
from projectord.queries import Queries
from projectord.samples import Balances
from projectord.schema.versioned_build import VersionBuild

READ = "SELECT count(*), coalesce(sum(balance), 0)::bigint FROM balances"
# Version 1, folded by SQL, its checkpoint at the end of the history: a live table as a daemon
# that caught up leaves it.
LIVE_V1 = f"""
INSERT INTO balances (id, tenant_id, balance, events) SELECT id, tenant_id, balance, events
FROM ({FOLD_SQL}) f;
UPDATE projectord.projection_positions
SET (transaction_id, global_position, applied_total) = (
    SELECT e.transaction_id, e.global_position, (SELECT count(*) FROM projectord.events)
    FROM projectord.events e ORDER BY e.transaction_id DESC, e.global_position DESC LIMIT 1)
WHERE name = 'balances';
"""
APPEND = (
    "INSERT INTO projectord.events (tenant_id, aggregate_id, version, type, payload)"
    " VALUES (%s, %s, 1, 'Deposited', '{\"amount\": 1}')"
)


class BalancesV2(Balances):
    version = 2


class Readers:
    """Threads reading the live table in a loop: (monotonic start, seconds, rows, sum)."""

    def __init__(self, url: str, count: int) -> None:
        self.url = url
        self.done = threading.Event()
        self.reads: list[tuple[float, float, int, int]] = []
        self.errors: list[str] = []
        self.went_back = 0  # reads that saw fewer accounts than the same thread's read before
        self.threads = [threading.Thread(target=self._read, daemon=True) for _ in range(count)]

    def _read(self) -> None:
        seen = 0
        with psycopg.connect(self.url, autocommit=True) as conn:
            while not self.done.is_set():
                started = time.monotonic()
                try:
                    row = conn.execute(READ).fetchone()
                except psycopg.Error as exc:
                    self.errors.append(str(exc))
                    continue
                assert row is not None
                self.reads.append((started, time.monotonic() - started, int(row[0]), int(row[1])))
                if int(row[0]) < seen:
                    self.went_back += 1
                seen = max(seen, int(row[0]))

    def __enter__(self) -> Readers:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        for thread in self.threads:
            thread.join()


class Writer(threading.Thread):
    """Appends one deposit of 1 per transaction to a new account, a few hundred a second."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.done = threading.Event()
        self.appended = 0

    def run(self) -> None:
        tenant = uuid.uuid4()
        with psycopg.connect(self.url, autocommit=True) as conn:
            while not self.done.is_set():
                conn.execute(APPEND, (tenant, uuid.uuid4()))
                self.appended += 1
                time.sleep(0.002)

    def __enter__(self) -> Writer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.join()


async def build_v2(url: str, batch_size: int) -> VersionBuild:
    settings = load_settings(None, database_url=url, batch_size=batch_size)
    pool = make_pool(url, max_size=4, read_model_schema="public", name="projectord-bench")
    async with pool:
        build = VersionBuild(
            BalancesV2(), pool, Queries(SCHEMA), dsn=url, settings=settings, owner=None, once=True
        )
        await build.run()
    return build


def main(argv: list[str] | None = None) -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--readers", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=5000)
    args = parser.parse_args(argv)
    if args.smoke:
        args.events, args.readers = 20_000, 2
    banner("version-swap")
    with server(args.database_url, fsync_off=args.fsync_off) as admin_url:
        with fresh_database(admin_url, [Balances()]) as url:
            started = time.perf_counter()
            generate_history(url, args.events, progress=args.events > 1_000_000)
            print(
                f"history: {args.events:,} events generated in {time.perf_counter() - started:.0f}s"
            )
            print(f"server: {server_description(url)}")
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute(LIVE_V1)
            with Readers(url, args.readers) as readers, Writer(url) as writer:
                started = time.perf_counter()
                build = anyio.run(build_v2, url, args.batch_size)
                built = time.perf_counter() - started
            with psycopg.connect(url, autocommit=True) as conn:
                row = conn.execute(
                    "SELECT version FROM projectord.projection_positions WHERE name = 'balances'"
                ).fetchone()
            assert row is not None and row[0] == 2, "version 2 was not swapped in"
            report(args, build, built, readers, writer)


def report(args: Any, build: VersionBuild, built: float, readers: Readers, writer: Writer) -> None:
    timing = build.swap_timing
    swap_ms = (timing["ended"] - timing["started"]) * 1000
    exclusive_ms = (timing["ended"] - timing["locked"]) * 1000
    overlapping = [
        seconds
        for started, seconds, _, _ in readers.reads
        if started < timing["ended"] and started + seconds > timing["locked"]
    ]
    outside = [
        seconds
        for started, seconds, _, _ in readers.reads
        if started + seconds < timing["started"] or started > timing["ended"]
    ]
    empty = sum(1 for _, _, rows, _ in readers.reads if rows == 0)
    print(
        f"\nsummary: version 2 of balances built over {args.events:,} events (+{writer.appended}"
        f" appended meanwhile), {args.readers} readers"
    )
    print(
        f"  build: {built:.1f}s, {build.status.applied_total / built:,.0f} events/s"
        f" (batch size {args.batch_size})"
    )
    print(f"  swap: {swap_ms:.1f} ms (the transaction, reads go on until its last part)")
    print(f"  exclusive: {exclusive_ms:.1f} ms (ACCESS EXCLUSIVE held: readers wait)")
    print(
        f"  reads: {len(readers.reads):,}, median {median(outside) * 1000:.2f} ms outside the"
        f" swap; longest overlapping the exclusive part"
        f" {max(overlapping, default=0.0) * 1000:.2f} ms ({len(overlapping)} reads)"
    )
    print(
        f"  reads that saw an empty table: {empty}; fewer accounts than before:"
        f" {readers.went_back}; errors: {len(readers.errors)}"
    )
    if empty or readers.went_back or readers.errors:
        raise SystemExit("a reader saw an empty or partial table, or failed")


if __name__ == "__main__":
    main()
