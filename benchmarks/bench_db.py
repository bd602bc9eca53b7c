"""Where a benchmark runs: a throwaway embedded Postgres by default (as the tests do), or a fresh
database created on the server `--database-url` names and dropped afterwards, with projectord's
schema and a generated event history.

Every benchmark describes the machine in its output: figures mean nothing without it.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import psycopg
from psycopg.conninfo import make_conninfo

from projectord.database import connect
from projectord.embedded import EmbeddedPostgres
from projectord.logs import configure_logging
from projectord.projection import Projection
from projectord.schema.migrations import initialise

SCHEMA = "projectord"
DEPOSITED, WITHDRAWN = "Deposited", "Withdrawn"

# The generated history: `accounts` aggregates spread over `tenants` tenants; every fifth event of
# an account is a withdrawal. Each INSERT is its own transaction, so transaction ids vary as they
# do in production and the commit-order read walks many transactions.
_GENERATE = """
INSERT INTO projectord.events (tenant_id, aggregate_id, aggregate_type, version, type, payload)
SELECT md5('tenant' || (g %% %(accounts)s %% %(tenants)s))::uuid,
       md5('account' || (g %% %(accounts)s))::uuid,
       'account',
       g / %(accounts)s + 1,
       CASE WHEN (g / %(accounts)s) %% 5 = 4 THEN 'Withdrawn' ELSE 'Deposited' END,
       jsonb_build_object('amount', 1 + g %% 7)
FROM generate_series(%(start)s::bigint, %(stop)s::bigint - 1) AS g
"""

# The Balances read model as one SQL statement over the whole history: the correctness oracle.
FOLD_SQL = """
SELECT aggregate_id AS id, min(tenant_id::text)::uuid AS tenant_id,
       sum(CASE type WHEN 'Deposited' THEN (payload->>'amount')::bigint
                     ELSE -(payload->>'amount')::bigint END) AS balance,
       count(*) AS events
FROM projectord.events
WHERE type IN ('Deposited', 'Withdrawn')
GROUP BY aggregate_id
"""


@contextmanager
def server(
    database_url: str | None, *, settings: Sequence[str] = (), fsync_off: bool = False
) -> Iterator[str]:
    """An admin URL: the given server's, or a throwaway embedded server's with the default
    durability (fsync, synchronous_commit and full_page_writes on), as production runs. With
    `fsync_off` (`--fsync-off`) the embedded server runs as the tests do: figures that are never
    the targets. `settings` are `name=value` server settings the benchmark needs (embedded only)."""
    if database_url:
        yield database_url
        return
    with tempfile.TemporaryDirectory(prefix="projectord-bench-") as tmp:
        embedded = EmbeddedPostgres(Path(tmp) / "pgdata", durable=not fsync_off)
        url = embedded.start()
        try:
            if settings:
                with psycopg.connect(url, autocommit=True) as conn:
                    for setting in settings:
                        name, _, value = setting.partition("=")
                        conn.execute(f"ALTER SYSTEM SET {name} = '{value}'")
                embedded.restart("fast")
            yield url
        finally:
            embedded.destroy()


@contextmanager
def fresh_database(admin_url: str, projections: Sequence[Projection] = ()) -> Iterator[str]:
    """A new database with projectord's schema and the projections' tables; dropped afterwards."""
    name = f"projectord_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = make_conninfo(admin_url, dbname=name)
    try:
        anyio.run(_initialise, url, list(projections))
        yield url
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def _initialise(url: str, projections: list[Projection]) -> None:
    conn = await connect(url, autocommit=True)
    async with conn:
        await initialise(conn, schema=SCHEMA, read_model_schema="public", projections=projections)


def generate_history(
    url: str,
    events: int,
    *,
    accounts: int = 1000,
    tenants: int = 10,
    per_transaction: int = 1000,
    progress: bool = True,
    vacuum: bool = True,
) -> None:
    """Append `events` account events, `per_transaction` per committed transaction, then VACUUM
    ANALYZE (unless told not to) so every round reads the same well-kept table."""
    with psycopg.connect(url, autocommit=True) as conn:
        start = scalar(conn, "SELECT count(*) FROM projectord.events")
        stop = start + events
        step = max(1, per_transaction)
        for low in range(start, stop, step):
            conn.execute(
                _GENERATE,
                {
                    "accounts": accounts,
                    "tenants": tenants,
                    "start": low,
                    "stop": min(low + step, stop),
                },
            )
            if progress and (low - start) % 200_000 < step and low > start:
                print(f"  generated {low - start:,} events", file=sys.stderr)
        if vacuum:
            conn.execute("VACUUM ANALYZE projectord.events")


def argument_parser(doc: str | None) -> argparse.ArgumentParser:
    """The options every benchmark takes (`--database-url`, `--smoke`); the rest is its own."""
    parser = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0])
    parser.add_argument(
        "--database-url", help="a server to create throwaway databases on (default: embedded)"
    )
    parser.add_argument("--smoke", action="store_true", help="small sizes, for CI")
    parser.add_argument(
        "--fsync-off",
        action="store_true",
        help="the embedded server without durability (fsync off): a second, labelled figure,"
        " never a target",
    )
    return parser


def banner(title: str) -> None:
    """Quiet logs, and the first lines of every benchmark's output: what and where."""
    configure_logging("console", "warning")
    print(f"projectord {title} benchmark")
    print(f"machine: {machine()}")


def machine() -> str:
    """One line: CPU, cores, memory, OS, Python, psycopg implementation."""
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = ""
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        memory = f", {pages / 2**30:.0f} GiB RAM"
    except (ValueError, OSError):
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores{memory}, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}, psycopg {psycopg.__version__} "
        f"({psycopg.pq.__impl__})"
    )


def server_description(url: str) -> str:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT current_setting('server_version'), current_setting('fsync'),"
            " current_setting('synchronous_commit'), inet_server_addr() IS NULL"
        ).fetchone()
    assert row is not None
    transport = "a unix socket" if row[3] else "TCP"
    label = "" if row[1] == "on" else " (NOT DURABLE: these figures are not the targets)"
    return (
        f"PostgreSQL {row[0]} over {transport}, fsync={row[1]}, synchronous_commit={row[2]}{label}"
    )


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of a non-empty sequence."""
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * len(ordered) + 0.5) - 1))
    return ordered[index]


def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[middle]
    return (ordered[middle - 1] + ordered[middle]) / 2


def scalar(conn: psycopg.Connection[Any], query: str, *params: Any) -> int:
    """The first column of the first row, as an int."""
    row = conn.execute(query, params or None).fetchone()
    assert row is not None
    return int(row[0])
