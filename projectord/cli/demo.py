"""`projectord demo`: the main job end to end, on the embedded Postgres by default.

It starts the real daemon as a separate process on the sample projections, runs several
concurrent writers (deposits and withdrawals dispatched through the command side, with
optimistic-concurrency retries; plain appends with random delays before commit and rollbacks),
shows each projection's applied count, lag and events/s live, and at the end checks that every
read model equals a fold of the committed events, printing the verdict.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import psycopg
from psycopg.conninfo import make_conninfo
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from projectord.commands.aggregate import CommandRegistry
from projectord.commands.dispatch import Dispatcher
from projectord.commands.store import Command
from projectord.config import Settings
from projectord.database import connect
from projectord.embedded import EMBEDDED_URL, embedded_database
from projectord.event_store import EventStore, NewEvent
from projectord.logs import configure_logging
from projectord.projection import Projection
from projectord.queries import Queries
from projectord.runner.catch_up import wait_for_projections
from projectord.runner.checkpoint_store import CheckpointStore
from projectord.samples import NOTED, Deposit, Withdraw, demo_aggregates, demo_projections
from projectord.schema.bootstrap import bootstrap

DEMO_DATABASE = "projectord_demo"
PROJECTIONS_SPEC = "projectord.samples:demo_projections"
TENANTS = [uuid.UUID(int=n) for n in range(1, 6)]
ACCOUNTS = [
    (TENANTS[n % len(TENANTS)], uuid.uuid5(uuid.NAMESPACE_OID, f"acct{n}")) for n in range(40)
]


@dataclass
class WriterStats:
    committed: int = 0  # commands consumed
    rejected: int = 0  # commands refused by the aggregate (insufficient funds)
    rolled_back: int = 0  # plain append transactions rolled back
    conflicts: int = 0  # version conflicts the dispatcher retried


def run_demo(settings: Settings, *, duration: float, writers: int) -> int:
    # The live view owns the terminal: the writers' own info lines (command conflicts) would
    # scroll it away. The daemon's log goes to a file.
    configure_logging(settings.log_format, "warning")
    return anyio.run(_demo, settings, duration, writers)


async def _demo(settings: Settings, duration: float, writers: int) -> int:
    """On `database_url` when one is set, else (the Quickstart) on the embedded Postgres."""
    admin_dsn = settings.database_dsn
    if admin_dsn and admin_dsn != EMBEDDED_URL:
        return await _run(settings, await _fresh_database(admin_dsn), duration, writers)
    async with embedded_database(settings.state_dir, announce=True) as admin_dsn:
        return await _run(settings, await _fresh_database(admin_dsn), duration, writers)


async def _fresh_database(admin_dsn: str) -> str:
    conn = await connect(admin_dsn, autocommit=True)
    async with conn:
        await conn.execute(f'DROP DATABASE IF EXISTS "{DEMO_DATABASE}" WITH (FORCE)')
        await conn.execute(f'CREATE DATABASE "{DEMO_DATABASE}"')
    return make_conninfo(admin_dsn, dbname=DEMO_DATABASE)


async def _run(settings: Settings, dsn: str, duration: float, writer_count: int) -> int:
    projections = demo_projections()
    queries = Queries(settings.schema)
    conn = await connect(dsn, autocommit=True)
    async with conn:
        await bootstrap(conn, settings, projections)
    daemon, log_path = _start_daemon(settings, dsn)
    print(f"daemon started (pid {daemon.pid}, log {log_path})", flush=True)
    stats = WriterStats()
    try:
        async with anyio.create_task_group() as tg:
            stop = anyio.Event()
            for seed in range(writer_count):
                writer = _activity_writer if seed % 4 == 3 else _command_writer
                tg.start_soon(writer, dsn, settings.schema, seed, stop, stats)
            await _live_view(dsn, queries, projections, duration, stats, daemon)
            stop.set()
        print(
            f"writers stopped: {stats.committed} commands consumed, {stats.rejected} refused, "
            f"{stats.conflicts} version conflicts retried, {stats.rolled_back} appends "
            "rolled back"
        )
        ok = await _verify(dsn, queries, projections)
    finally:
        exit_code = _stop_daemon(daemon)
    print(f"daemon exited with status {exit_code} after SIGTERM")
    return 0 if ok and exit_code == 0 else 1


def _start_daemon(settings: Settings, dsn: str) -> tuple[subprocess.Popen[bytes], Path]:
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    log_path = (settings.state_dir / "demo-daemon.log").resolve()
    env = {
        **os.environ,
        "PROJECTORD_DATABASE_URL": dsn,
        "PROJECTORD_PROJECTIONS": PROJECTIONS_SPEC,
        "PROJECTORD_SCHEMA": settings.schema,
        "PROJECTORD_READ_MODEL_SCHEMA": settings.read_model_schema,
        "PROJECTORD_STATE_DIR": str(settings.state_dir),
        "PROJECTORD_LOG_FORMAT": "json",
    }
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "projectord", "run"],
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    return process, log_path


def _stop_daemon(process: subprocess.Popen[bytes]) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        return process.wait(60)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


async def _command_writer(
    dsn: str, schema: str, seed: int, stop: anyio.Event, stats: WriterStats
) -> None:
    """Deposits and withdrawals through the command side: dispatch, aggregate, append."""
    rng = random.Random(seed)
    dispatcher = Dispatcher(CommandRegistry(demo_aggregates()), schema=schema)
    conn = await connect(dsn, autocommit=True)
    async with conn:
        while not stop.is_set():
            tenant, account = rng.choice(ACCOUNTS)
            kind = Deposit if rng.random() < 0.7 else Withdraw
            command = Command(
                tenant,
                kind.type_name(),
                {"account_id": str(account), "amount": rng.randint(1, 100)},
            )
            outcome = await dispatcher.dispatch(conn, command)
            if outcome.status.succeeded:
                stats.committed += 1
            else:
                stats.rejected += 1
            stats.conflicts += max(outcome.attempts - 1, 0)
            await anyio.sleep(rng.uniform(0, 0.01))


async def _activity_writer(
    dsn: str, schema: str, seed: int, stop: anyio.Event, stats: WriterStats
) -> None:
    """Plain appends of `Noted` events, with random delays before commit (so commit order and
    position order differ) and some rollbacks."""
    rng = random.Random(seed)
    store = EventStore(schema)
    conn = await connect(dsn)
    async with conn:
        while not stop.is_set():
            tenant = rng.choice(TENANTS)
            async with conn.transaction() as tx:
                await store.append(conn, [NewEvent(tenant, uuid.uuid4(), 1, NOTED, {})])
                await anyio.sleep(rng.uniform(0, 0.03))
                if rng.random() < 0.1:
                    stats.rolled_back += 1
                    raise psycopg.Rollback(tx)
            await anyio.sleep(rng.uniform(0, 0.01))


async def _live_view(
    dsn: str,
    queries: Queries,
    projections: Sequence[Projection],
    duration: float,
    stats: WriterStats,
    daemon: subprocess.Popen[bytes],
) -> None:
    """The live view: on a terminal rich redraws a table in place (the terminal's width, colour,
    any terminal rich supports); elsewhere a summary line every 2 s, as a log would hold it."""
    tty = sys.stdout.isatty()
    conn = await connect(dsn, autocommit=True)
    previous: dict[str, tuple[float, int]] = {}
    started = time.monotonic()
    last_print = 0.0
    live = Live(console=Console(), auto_refresh=False) if tty else None
    async with conn:
        with live or nullcontext():
            while (elapsed := time.monotonic() - started) < duration:
                if daemon.poll() is not None:
                    raise RuntimeError(f"the daemon exited early with status {daemon.returncode}")
                title = (
                    f"projectord demo  {elapsed:5.1f}s / {duration:.0f}s   "
                    f"commands consumed: {stats.committed}"
                )
                table = Table(box=None, header_style="bold")
                for column in ("projection", "state", "applied", "lag", "events/s"):
                    table.add_column(column, justify="left" if column[0] in "ps" else "right")
                rows = []
                for projection in projections:
                    applied, state, lag = await _position(conn, queries, projection)
                    now = time.monotonic()
                    then, before = previous.get(projection.name, (now, applied))
                    rate = (applied - before) / (now - then) if now > then else 0.0
                    previous[projection.name] = (now, applied)
                    rows.append((projection.name, state, str(applied), str(lag), f"{rate:.0f}"))
                    table.add_row(*rows[-1])
                if live is not None:
                    live.update(Group(Text(title), table), refresh=True)
                elif now - last_print >= 2.0:
                    print(" | ".join([title, *(" ".join(row) for row in rows)]), flush=True)
                    last_print = now
                await anyio.sleep(0.5)


async def _position(conn: Any, queries: Queries, projection: Projection) -> tuple[int, str, int]:
    stored = await CheckpointStore(queries).read(conn, projection.name)
    if stored is None:
        return 0, "starting", 0
    txid, position = stored.checkpoint
    cur = await conn.execute(
        queries["count_unapplied"],
        {"txid": str(txid), "position": position, "types": list(projection.event_types)},
    )
    lag = await cur.fetchone()
    return stored.applied_total, stored.state, int(lag[0]) if lag else 0


FOLD_CHECKS = {
    "balances": """
        SELECT count(*) FROM (
            SELECT aggregate_id AS id, tenant_id,
                   sum(CASE type WHEN 'Deposited' THEN (payload->>'amount')::bigint
                                 ELSE -(payload->>'amount')::bigint END) AS balance,
                   count(*) AS events
            FROM {schema}.events WHERE type IN ('Deposited', 'Withdrawn')
            GROUP BY aggregate_id, tenant_id
        ) fold
        FULL JOIN balances b USING (id)
        WHERE fold.balance IS DISTINCT FROM b.balance OR fold.events IS DISTINCT FROM b.events
    """,
    "activity": """
        SELECT count(*) FROM (
            SELECT tenant_id, count(*) AS events FROM {schema}.events
            WHERE type IN ('Deposited', 'Withdrawn', 'Noted') GROUP BY tenant_id
        ) fold
        FULL JOIN tenant_activity a USING (tenant_id)
        WHERE fold.events IS DISTINCT FROM a.events
    """,
}


async def _verify(dsn: str, queries: Queries, projections: Sequence[Projection]) -> bool:
    """Wait for the daemon to catch up, then compare each read model with a fold of the events."""
    conn = await connect(dsn, autocommit=True)
    async with conn:
        caught_up = await wait_for_projections(conn, queries, projections, timeout=120)
        total = await (await conn.execute(queries["count_events"])).fetchone()
        print(
            f"caught up: {'yes' if caught_up else 'NO (timed out)'}; "
            f"{total[0] if total else 0} events committed"
        )
        ok = caught_up
        schema = queries.schema_sql
        for projection in projections:
            cur = await conn.execute(FOLD_CHECKS[projection.name].replace("{schema}", schema))
            row = await cur.fetchone()
            mismatches = int(row[0]) if row else -1
            verdict = (
                "equals the fold of the events"
                if mismatches == 0
                else (f"DIFFERS from the fold in {mismatches} rows")
            )
            print(f"  {projection.name}: {verdict}")
            ok = ok and mismatches == 0
    print(f"verdict: {'OK' if ok else 'FAILED'}", flush=True)
    return ok
