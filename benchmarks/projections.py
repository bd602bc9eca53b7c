"""Projections only the benchmarks use. The daemon imports them by `module:attr`, e.g.
`benchmarks.projections:latency_probe`, so this module must stay importable on its own."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from psycopg import AsyncConnection

from projectord import Event, Projection, Table
from projectord.samples import DEPOSITED, Balances


class NaiveBalances(Projection):
    """The reference read model written the obvious way: one `INSERT … ON CONFLICT` per event."""

    name = "naive_balances"
    event_types = Balances.event_types
    tables = Balances.tables

    async def on(self, event: Event, conn: AsyncConnection[Any]) -> None:
        amount = int(event.payload["amount"])
        await conn.execute(
            """
            INSERT INTO balances AS b (id, tenant_id, balance, events) VALUES (%s, %s, %s, 1)
            ON CONFLICT (id) DO UPDATE
            SET balance = b.balance + excluded.balance, events = b.events + 1
            """,
            (event.aggregate_id, event.tenant_id, amount if event.type == DEPOSITED else -amount),
        )


class LatencyProbe(Projection):
    """Records, for every event it applies, the writer's transaction and its own, so commit
    timestamps (or clocks, as a fallback) give the latency from one commit to the other."""

    name = "latency_probe"
    event_types = ("Pinged",)
    tables = {
        "latency_probe": Table(
            {
                "global_position": "bigint PRIMARY KEY",
                "writer_xid": "xid8 NOT NULL",
                "writer_clock": "float8 NOT NULL",  # epoch seconds at the writer's INSERT
                "applier_xid": "xid8 NOT NULL",
                "applier_clock": "timestamptz NOT NULL",
            }
        )
    }

    async def handle(self, events: Sequence[Event], conn: AsyncConnection[Any]) -> None:
        await conn.execute(
            "INSERT INTO latency_probe (global_position, writer_xid, writer_clock,"
            " applier_xid, applier_clock)"
            " SELECT p, x::xid8, c, pg_current_xact_id(), clock_timestamp()"
            " FROM unnest(%s::bigint[], %s::text[], %s::float8[]) AS u(p, x, c)",
            (
                [e.global_position for e in events],
                [str(e.transaction_id) for e in events],
                [float(e.payload.get("clock", 0.0)) for e in events],
            ),
        )


def latency_probe() -> list[Projection]:
    return [LatencyProbe()]


def soak_projections() -> list[Projection]:
    """The soak's read models: account balances (checked against a fold) and the latency probe."""
    return [Balances(), LatencyProbe()]


class Pings(Projection):
    """Counts `Pinged` events: a projection that costs the daemon as little as one can."""

    name = "pings"
    event_types = ("Pinged",)
    tables = {"pings": Table({"id": "int PRIMARY KEY", "n": "bigint NOT NULL"})}

    async def handle(self, events: Sequence[Event], conn: AsyncConnection[Any]) -> None:
        await conn.execute(
            "INSERT INTO pings AS p VALUES (1, %s) ON CONFLICT (id) DO UPDATE SET n = p.n + %s",
            (len(events), len(events)),
        )


def pings() -> list[Projection]:
    return [Pings()]


def balances_copy(number: int) -> Projection:
    """Balances under another name, into its own table `balances_NN`."""
    table = f"balances_{number:02d}"
    attributes = {"name": table, "table": table, "tables": {table: Balances.tables["balances"]}}
    return type(f"Balances{number:02d}", (Balances,), attributes)()  # type: ignore[no-any-return]


def many_balances() -> list[Projection]:
    """`BENCH_PROJECTIONS` (default 50) copies of Balances, for one daemon."""
    return [balances_copy(n) for n in range(int(os.environ.get("BENCH_PROJECTIONS", "50")))]
