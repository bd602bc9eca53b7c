"""Scale benchmark: the cost of one batch fetch must not grow with the history.

Two databases, a small and a large history (100k and 1M events by default; `--large 5000000` by
hand), and the runner's own fetch (`projectord.fetcher.Fetcher`, 5000 events) at checkpoints
spread over each history, alternating between the two databases. Printed: the median time of a
fetch (client: the query and turning rows into events) and of the query alone on the server
(EXPLAIN ANALYZE), for each size, and their ratio (target: within 1.5x).

    python -m benchmarks.fetch_scale                   # 100k vs 1M events
    python -m benchmarks.fetch_scale --large 5000000   # the issue's 5M figure
    python -m benchmarks.fetch_scale --smoke           # CI: 20k vs 200k
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from typing import Any

import anyio
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
from projectord.database import connect
from projectord.fetcher import DEFAULT_BATCH_MAX_BYTES, Fetcher
from projectord.queries import Queries
from projectord.samples import Balances

CHECKPOINT_AT = """
SELECT e.transaction_id::text::bigint, e.global_position FROM projectord.events e
ORDER BY e.transaction_id, e.global_position OFFSET %s LIMIT 1
"""


def checkpoints(url: str, events: int, count: int, batch: int) -> list[tuple[int, int]]:
    """`count` checkpoints spread evenly over the history, each with a full batch after it."""
    found = []
    with psycopg.connect(url, autocommit=True) as conn:
        for n in range(count):
            row = conn.execute(CHECKPOINT_AT, ((events - batch - 1) * n // max(count - 1, 1),))
            value = row.fetchone()
            assert value is not None
            found.append((int(value[0]), int(value[1])))
    return found


def server_ms(url: str, after: tuple[int, int], batch: int) -> float:
    """The fetch query's execution time on the server."""
    query = Queries(SCHEMA)["fetch_batch"]
    params = {
        "txid": str(after[0]),
        "position": after[1],
        "types": list(Balances.event_types),
        "limit": batch,
        "max_event_bytes": DEFAULT_BATCH_MAX_BYTES // (2 * batch),
    }
    with psycopg.connect(url, autocommit=True) as conn:
        plan = conn.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + query, params).fetchone()
    assert plan is not None
    return float(plan[0][0]["Execution Time"])


async def client_ms(url: str, after: tuple[int, int], batch: int) -> float:
    conn = await connect(url, autocommit=True)
    async with conn:
        fetcher = Fetcher(Queries(SCHEMA), list(Balances.event_types))
        await fetcher.fetch(conn, after, batch)  # warm: plan, caches
        started = time.perf_counter()
        fetched = await fetcher.fetch(conn, after, batch)
        elapsed = time.perf_counter() - started
    assert len(fetched.events) == batch
    return elapsed * 1000


def main(argv: list[str] | None = None) -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--small", type=int, default=100_000)
    parser.add_argument("--large", type=int, default=1_000_000)
    parser.add_argument("--batch-size", type=int, default=5000)
    parser.add_argument("--checkpoints", type=int, default=9)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    if args.smoke:
        args.small, args.large, args.rounds = 20_000, 200_000, 1
    banner("fetch-scale")
    sizes = (args.small, args.large)
    with server(args.database_url, fsync_off=args.fsync_off) as admin_url, ExitStack() as stack:
        urls = {}
        for size in sizes:
            url = stack.enter_context(fresh_database(admin_url))
            started = time.perf_counter()
            generate_history(url, size, progress=size > 1_000_000)
            print(f"history: {size:,} events generated in {time.perf_counter() - started:.0f}s")
            urls[size] = url
        print(f"server: {server_description(urls[args.small])}")
        points = {
            size: checkpoints(urls[size], size, args.checkpoints, args.batch_size) for size in sizes
        }
        client: dict[int, list[float]] = {size: [] for size in sizes}
        on_server: dict[int, list[float]] = {size: [] for size in sizes}
        for _ in range(args.rounds):
            for n in range(args.checkpoints):
                for size in sizes:  # alternate: the machine's noise hits both sizes alike
                    after = points[size][n]
                    client[size].append(anyio.run(client_ms, urls[size], after, args.batch_size))
                    on_server[size].append(server_ms(urls[size], after, args.batch_size))
    report(args, client, on_server)


def report(args: Any, client: dict[int, list[float]], on_server: dict[int, list[float]]) -> None:
    print(
        f"\nsummary: one fetch of {args.batch_size} events, median over"
        f" {args.checkpoints} checkpoints x {args.rounds} rounds"
    )
    for size in (args.small, args.large):
        print(
            f"  {size:>10,} events: fetch {median(client[size]):7.2f} ms,"
            f" query on the server {median(on_server[size]):6.2f} ms"
        )
    ratio = median(client[args.large]) / median(client[args.small])
    server_ratio = median(on_server[args.large]) / median(on_server[args.small])
    print(
        f"  large / small: fetch {ratio:.2f}x, server {server_ratio:.2f}x (target <= 1.5x):"
        f" {'met' if max(ratio, server_ratio) <= 1.5 else 'NOT met'}"
    )


if __name__ == "__main__":
    main()
