"""Large events: the daemon's peak memory while it catches up on events of hundreds of kB.

The real daemon, with its default settings unless told otherwise, catches up on N events of a
~400 kB JSON payload each (a document of a few thousand line items: repeated keys, distinct
values), into a last-value projection that decodes every payload. The figure is the daemon's
peak RSS (VmHWM); issue 17's target is 512 MB at most for 4,000 such events (1.6 GB of JSON) with
the default `batch_max_bytes`. Every document's final version is checked against the events.

    python -m benchmarks.large_events                       # 4,000 events of 400 kB
    python -m benchmarks.large_events --batch-max-bytes 8MiB
    python -m benchmarks.large_events --smoke               # CI: 100 events
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psycopg
from psycopg import AsyncConnection

from benchmarks.bench_db import argument_parser, banner, fresh_database, server, server_description
from benchmarks.many_projections import peak_rss_mib, wait_for
from benchmarks.processes import TENANT, daemon
from projectord import Event, Projection, Table

DOCUMENTS = 400  # aggregates; each gets events / DOCUMENTS versions
ITEM_BYTES = 110  # about the JSON text of one generated line item
RSS_TARGET_MIB = 512 * 10**6 / 2**20  # issue 17: 512 MB

# One transaction per `per_transaction` events; every event a new version of one document.
GENERATE = """
INSERT INTO projectord.events (tenant_id, aggregate_id, version, type, payload)
SELECT %(tenant)s, md5('document' || (g %% %(documents)s))::uuid, g / %(documents)s + 1,
       'Documented', jsonb_build_object('n', g, 'items', i.items)
FROM generate_series(%(start)s::bigint, %(stop)s::bigint - 1) AS g,
     (SELECT jsonb_agg(jsonb_build_object('sku', md5(n::text), 'qty', n, 'note', repeat('n', 40)))
             AS items
      FROM generate_series(1, %(items)s) AS n) AS i
"""
MISMATCHES = """
SELECT count(*) FROM (
    SELECT DISTINCT ON (aggregate_id) aggregate_id AS id, version, (payload->>'n')::bigint AS n
    FROM projectord.events WHERE type = 'Documented' ORDER BY aggregate_id, version DESC
) f FULL JOIN large_documents d USING (id)
WHERE f.id IS NULL OR d.id IS NULL OR f.version <> d.version OR f.n <> d.n
"""
APPLIED = "SELECT coalesce(max(applied_total), 0) FROM projectord.projection_positions"
LARGE_DOCUMENTS = Table(
    {
        "id": "uuid PRIMARY KEY",
        "version": "integer NOT NULL",
        "n": "bigint NOT NULL",
        "items": "integer NOT NULL",
    }
)


class LargeDocuments(Projection):
    """The last version of each document and its number of line items (decodes every payload)."""

    name = "large_documents"
    event_types = ("Documented",)
    tables = {"large_documents": LARGE_DOCUMENTS}

    async def handle(self, events: Sequence[Event], conn: AsyncConnection[Any]) -> None:
        last: dict[Any, tuple[int, int, int]] = {}
        for event in events:
            payload = event.payload
            last[event.aggregate_id] = (event.version, payload["n"], len(payload["items"]))
        await conn.execute(
            "INSERT INTO large_documents AS d (id, version, n, items)"
            " SELECT * FROM unnest(%s::uuid[], %s::int[], %s::bigint[], %s::int[])"
            " ON CONFLICT (id) DO UPDATE"
            " SET version = excluded.version, n = excluded.n, items = excluded.items",
            (list(last), *(list(column) for column in zip(*last.values(), strict=True))),
        )


def projections() -> list[Projection]:
    return [LargeDocuments()]


def generate(url: str, events: int, payload_kb: int, per_transaction: int) -> float:
    """Append the documents; returns the mean payload size in bytes (as JSON text)."""
    items = max(1, payload_kb * 1000 // ITEM_BYTES)
    with psycopg.connect(url, autocommit=True) as conn:
        for start in range(0, events, per_transaction):
            params = {
                "tenant": TENANT,
                "documents": DOCUMENTS,
                "start": start,
                "stop": min(start + per_transaction, events),
                "items": items,
            }
            conn.execute(GENERATE, params)
        row = conn.execute(
            "SELECT avg(octet_length(payload::text)) FROM projectord.events"
            " WHERE global_position <= 10"
        ).fetchone()
    return float(row[0]) if row and row[0] is not None else 0.0


def main(argv: list[str] | None = None) -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--events", type=int, default=4000)
    parser.add_argument("--payload-kb", type=int, default=400)
    parser.add_argument("--per-transaction", type=int, default=50)
    parser.add_argument(
        "--batch-max-bytes", help="the daemon's batch_max_bytes, e.g. 8MiB (its default)"
    )
    parser.add_argument("--batch-size", help="the daemon's batch_size (its default)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.events = 100
    banner("large-events")
    settings = {
        key: value
        for key, value in (
            ("batch_max_bytes", args.batch_max_bytes),
            ("batch_size", args.batch_size),
        )
        if value
    }
    with (
        server(args.database_url, fsync_off=args.fsync_off) as admin_url,
        tempfile.TemporaryDirectory() as tmp,
    ):
        print(f"server: {server_description(admin_url)}")
        with fresh_database(admin_url, projections()) as url:
            started = time.perf_counter()
            size = generate(url, args.events, args.payload_kb, args.per_transaction)
            total = args.events * size
            print(
                f"history: {args.events:,} events of {size / 1000:,.0f} kB JSON"
                f" ({total / 1e9:.2f} GB), generated in {time.perf_counter() - started:.1f}s"
            )
            print(f"daemon settings: {settings or 'defaults'}")
            with daemon(url, "benchmarks.large_events:projections", Path(tmp), **settings) as p:
                started = time.perf_counter()
                wait_for(url, APPLIED, None, args.events, timeout=3600)
                seconds = time.perf_counter() - started
                rss = peak_rss_mib(p.pid)
            with psycopg.connect(url, autocommit=True) as conn:
                bad = (conn.execute(MISMATCHES).fetchone() or (0,))[0]
    if bad:
        raise SystemExit(f"the read model differs from the events in {bad} documents")
    print(
        f"catch-up: {seconds:.1f}s, {args.events / seconds:,.0f} events/s,"
        f" {total / seconds / 1e6:,.0f} MB/s of JSON; read model checked"
    )
    verdict = "met" if rss <= RSS_TARGET_MIB else "NOT met"
    print(f"peak RSS {rss:,.0f} MiB (target <= 512 MB = {RSS_TARGET_MIB:.0f} MiB): {verdict}")


if __name__ == "__main__":
    main()
