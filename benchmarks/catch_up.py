"""Catch-up benchmark: N events into the reference `Balances` projection through projectord's real
`ProjectionRunner`, against a hand-written psycopg loop measured in the same run.

Contenders, in interleaved rounds (the machine is noisy: compare the ratios, not the absolutes):
- `reference`: the hand-written loop: sync psycopg, keyset fetch by (transaction_id,
  global_position) of only the columns it needs, payload decoded by orjson, fold in Python, one
  set-based upsert and one checkpoint update per batch, one transaction per batch.
- `runner`: projectord's runner driving `projectord.samples.Balances` (set-based handler).
- `naive`: the runner driving `NaiveBalances` (one `INSERT … ON CONFLICT` per event in `on`).
- `upcast`: `runner` again, with a one-step upcaster (v1→v2, the amount given its currency) on
  every event: what upcasting costs a catch-up (docs/upcasting.md; target >= 0.85x of `runner`).
- `sql`: the whole projection as one SQL statement: the ceiling no Python loop reaches.
Every round's read model is checked against a fold of the events in SQL.

    python -m benchmarks.catch_up                      # 100k events, embedded Postgres
    python -m benchmarks.catch_up --events 1000000     # the issue's 1M figure
    python -m benchmarks.catch_up --smoke              # CI: small and quick
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import Any

import anyio
import psycopg
from psycopg_pool import AsyncConnectionPool

from benchmarks.bench_db import (
    FOLD_SQL,
    SCHEMA,
    argument_parser,
    banner,
    fresh_database,
    generate_history,
    median,
    scalar,
    server,
    server_description,
)
from benchmarks.projections import NaiveBalances
from projectord.daemon.gc_tuning import tune_for_batches
from projectord.database import configure_json, make_pool
from projectord.projection import Projection
from projectord.queries import Queries
from projectord.runner.loop import ProjectionRunner
from projectord.samples import DEPOSITED, Balances
from projectord.upcasting import Upcasters, install

CONTENDERS = ("reference", "runner", "upcast", "naive", "sql")
UPCAST_TARGET = 0.85  # upcast / runner, issue 16


def one_step_upcasters(calls: list[int]) -> Upcasters:
    """Deposited and Withdrawn v1 → v2: the stored history is all v1, so every event takes the
    step. It adds a field and keeps `amount`, so the same `Balances` handler folds both runs; it
    counts its calls, so the run can show it really ran."""
    upcasters = Upcasters()

    def with_currency(payload: dict[str, Any]) -> dict[str, Any]:
        calls[0] += 1
        payload["currency"] = "EUR"
        return payload

    for event_type in Balances.event_types:
        upcasters.add(event_type, 1, with_currency)
    return upcasters


async def upcast_catch_up(
    pool: AsyncConnectionPool, batch_size: int, expected: int, calls: list[int]
) -> None:
    """`runner`, with the one-step upcasters installed for the run (and only for it)."""
    previous = install(one_step_upcasters(calls))
    try:
        await runner_catch_up(pool, Balances(), batch_size, expected)
    finally:
        install(previous)


REFERENCE_FETCH = """
SELECT e.transaction_id::text AS txid, e.global_position, e.tenant_id, e.aggregate_id, e.type,
       e.payload
FROM projectord.events e
WHERE (e.transaction_id, e.global_position) > (%s::xid8, %s::bigint)
  AND e.type = ANY(%s::text[])
ORDER BY e.transaction_id, e.global_position
LIMIT %s
"""
REFERENCE_UPSERT = """
INSERT INTO balances AS b (id, tenant_id, balance, events)
SELECT * FROM unnest(%s::uuid[], %s::uuid[], %s::bigint[], %s::bigint[])
ON CONFLICT (id) DO UPDATE
SET balance = b.balance + excluded.balance, events = b.events + excluded.events
"""
REFERENCE_CHECKPOINT = """
UPDATE projectord.projection_positions
SET transaction_id = %s::xid8, global_position = %s, updated_at = now()
WHERE name = 'reference'
"""
MISMATCHES = f"""
SELECT count(*) FROM ({FOLD_SQL}) f FULL JOIN balances b USING (id)
WHERE f.id IS NULL OR b.id IS NULL OR f.balance <> b.balance OR f.events <> b.events
   OR f.tenant_id <> b.tenant_id
"""


def reference_loop(url: str, batch_size: int) -> int:
    """The hand-written loop: what a careful engineer writes without a framework."""
    types = list(Balances.event_types)
    applied = 0
    with psycopg.connect(url) as conn:
        configure_json(conn)
        conn.execute("SET search_path TO public")
        txid, position = "0", 0
        while True:
            rows = conn.execute(REFERENCE_FETCH, (txid, position, types, batch_size)).fetchall()
            if not rows:
                conn.rollback()
                break
            deltas: dict[Any, list[Any]] = {}
            for _txid, _position, tenant_id, aggregate_id, type_, payload in rows:
                amount = int(payload["amount"])
                row = deltas.get(aggregate_id)
                if row is None:
                    row = deltas[aggregate_id] = [tenant_id, 0, 0]
                row[1] += amount if type_ == DEPOSITED else -amount
                row[2] += 1
            ids = list(deltas)
            conn.execute(
                REFERENCE_UPSERT,
                (
                    ids,
                    [deltas[i][0] for i in ids],
                    [deltas[i][1] for i in ids],
                    [deltas[i][2] for i in ids],
                ),
            )
            txid, position = rows[-1][0], rows[-1][1]
            conn.execute(REFERENCE_CHECKPOINT, (txid, position))
            conn.commit()
            applied += len(rows)
            if len(rows) < batch_size:
                break
    return applied


async def runner_catch_up(
    pool: AsyncConnectionPool, projection: Projection, batch_size: int, expected: int
) -> None:
    """projectord's own runner loop, from a reset checkpoint until it has applied `expected`."""
    # With its read-model schema, as the daemon runs it: each batch then checks its tables.
    runner = ProjectionRunner(
        projection,
        pool,
        Queries(SCHEMA),
        batch_size=batch_size,
        poll_interval=60.0,
        read_model_schema="public",
    )
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(runner.run)
        # Polling the status the daemon reports costs < 0.1 % here and needs no hook in the runner.
        while runner.status.applied_total < expected:  # noqa: ASYNC110
            await anyio.sleep(0.001)
        runner.request_stop()


def reset(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("TRUNCATE balances")
        conn.execute(
            "INSERT INTO projectord.projection_positions (name)"
            " SELECT unnest(ARRAY['reference', 'balances', 'naive_balances'])"
            " ON CONFLICT (name) DO UPDATE SET transaction_id = '0', global_position = 0,"
            " applied_total = 0, last_error = NULL"
        )


def check(url: str, contender: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        bad = scalar(conn, MISMATCHES)
    if bad:
        raise SystemExit(f"{contender}: the read model differs from the fold in {bad} rows")


async def run_rounds(
    args: argparse.Namespace, url: str
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Interleaved rounds; per contender, events/s and the client's CPU µs per event."""
    pool = make_pool(url, max_size=4, read_model_schema="public", name="bench")
    await pool.open(wait=True)
    try:
        upcaster_calls = [0]
        contenders: dict[str, Callable[[], Any]] = {
            "reference": lambda: reference_loop(url, args.batch_size),
            "runner": lambda: runner_catch_up(pool, Balances(), args.batch_size, args.events),
            "upcast": lambda: upcast_catch_up(pool, args.batch_size, args.events, upcaster_calls),
            "naive": lambda: runner_catch_up(pool, NaiveBalances(), args.batch_size, args.events),
            "sql": lambda: _one_statement(url),
        }
        chosen = [c for c in CONTENDERS if c in args.contenders]
        rates: dict[str, list[float]] = {c: [] for c in chosen}
        cpu_per_event: dict[str, list[float]] = {c: [] for c in chosen}
        for round_ in range(args.rounds):
            order = chosen[round_ % len(chosen) :] + chosen[: round_ % len(chosen)]
            line = []
            for contender in order:
                reset(url)
                upcaster_calls[0] = 0
                started, cpu = time.perf_counter(), time.process_time()
                result = contenders[contender]()
                if hasattr(result, "__await__"):
                    await result
                elapsed = time.perf_counter() - started
                cpu_us = (time.process_time() - cpu) / args.events * 1e6
                check(url, contender)
                if contender == "upcast" and upcaster_calls[0] < args.events:
                    raise SystemExit(f"upcast: only {upcaster_calls[0]} upcaster calls")
                rates[contender].append(args.events / elapsed)
                cpu_per_event[contender].append(cpu_us)
                line.append(f"{contender} {args.events / elapsed:,.0f} ({cpu_us:.1f} us)")
            print(
                f"round {round_ + 1}: " + " | ".join(line) + " events/s (client CPU per event)",
                flush=True,
            )
        return rates, cpu_per_event
    finally:
        await pool.close()


def _one_statement(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"INSERT INTO balances {FOLD_SQL}")


def report(
    args: argparse.Namespace, rates: dict[str, list[float]], cpu: dict[str, list[float]]
) -> None:
    print(f"\nsummary: median of {args.rounds} interleaved rounds, {args.events:,} events")
    labels = {
        "reference": "hand-written psycopg loop (reference)",
        "runner": "projectord runner, Balances (set-based)",
        "upcast": "runner, one-step upcaster on every event",
        "naive": "projectord runner, NaiveBalances (on())",
        "sql": "one SQL statement (ceiling)",
    }
    for contender, values in rates.items():
        print(
            f"  {labels[contender]:<42} {median(values):>11,.0f} events/s"
            f"  {median(cpu[contender]):5.1f} us client CPU/event"
        )
    if "reference" in rates and "runner" in rates:
        ratios = [r / ref for r, ref in zip(rates["runner"], rates["reference"], strict=True)]
        print(
            f"  runner / reference: {median(ratios):.2f}x"
            f" (rounds {min(ratios):.2f}-{max(ratios):.2f}; target >= 0.90x)"
        )
    if "upcast" in rates and "runner" in rates:
        ratios = [u / r for u, r in zip(rates["upcast"], rates["runner"], strict=True)]
        print(
            f"  upcast / runner: {median(ratios):.2f}x (rounds {min(ratios):.2f}-{max(ratios):.2f};"
            f" target >= {UPCAST_TARGET:.2f}x: {_verdict(median(ratios), UPCAST_TARGET)})"
        )
        # Client CPU per event is steadier than a rate on a shared machine: what upcasting adds.
        cpu_ratios = [r / u for u, r in zip(cpu["upcast"], cpu["runner"], strict=True)]
        print(f"  runner / upcast client CPU per event: {median(cpu_ratios):.2f}x")
    if "runner" in rates:
        print(f"  runner target >= 100,000 events/s: {_verdict(median(rates['runner']), 100_000)}")
    if "naive" in rates:
        print(f"  naive target >= 20,000 events/s: {_verdict(median(rates['naive']), 20_000)}")


def _verdict(value: float, target: float) -> str:
    return "met" if value >= target else "NOT met"


def main(argv: list[str] | None = None) -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--batch-size", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--accounts", type=int, default=1000)
    parser.add_argument("--per-transaction", type=int, default=1000)
    parser.add_argument(
        "--contenders",
        default=",".join(CONTENDERS),
        help="comma-separated subset of " + ", ".join(CONTENDERS),
    )
    args = parser.parse_args(argv)
    args.contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    if args.smoke:
        args.events, args.rounds = min(args.events, 20_000), min(args.rounds, 2)
    tune_for_batches()  # as the daemon does; the reference loop, in this process, gains too
    banner("catch-up")
    with (
        server(args.database_url, fsync_off=args.fsync_off) as admin_url,
        fresh_database(admin_url, [Balances(), NaiveBalances()]) as url,
    ):
        print(f"server: {server_description(url)}")
        started = time.perf_counter()
        generate_history(
            url, args.events, accounts=args.accounts, per_transaction=args.per_transaction
        )
        print(
            f"history: {args.events:,} events over {args.accounts} accounts,"
            f" {args.per_transaction} per transaction, generated in"
            f" {time.perf_counter() - started:.1f}s; batch size {args.batch_size}",
            flush=True,
        )
        rates, cpu = anyio.run(run_rounds, args, url)
    report(args, rates, cpu)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
