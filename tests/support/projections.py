"""Projections the tests run in the real daemon.

`Ledger` is additive (a double apply shows in the totals) and logs every event it applies, with
the instance that applied it and when, so a test can prove each event was applied exactly once,
and by one instance at a time.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from psycopg import AsyncConnection

from projectord import Event, Projection, Table
from projectord.queries import quote_ident

APPLIED_LOG = Table(
    {
        "projection": "text NOT NULL",
        "event_id": "uuid NOT NULL",
        "global_position": "bigint NOT NULL",
        "instance": "text NOT NULL",
        "applied_at": "timestamptz NOT NULL DEFAULT clock_timestamp()",
    }
)


async def log_applied(conn: AsyncConnection[Any], name: str, events: Sequence[Event]) -> None:
    instance = os.environ.get("TEST_INSTANCE", str(os.getpid()))
    await conn.execute(
        "INSERT INTO applied_log (projection, event_id, global_position, instance)"
        " SELECT %s, e, p, %s FROM unnest(%s::uuid[], %s::bigint[]) AS u(e, p)",
        (name, instance, [e.event_id for e in events], [e.global_position for e in events]),
    )


LEDGER_TABLE = Table(
    {"account": "bigint PRIMARY KEY", "total": "bigint NOT NULL", "events": "bigint NOT NULL"}
)


class Ledger(Projection):
    name = "ledger"
    event_types = ("Credited",)
    totals = "ledger"  # the table of totals per account
    tables = {"ledger": LEDGER_TABLE, "applied_log": APPLIED_LOG}

    async def handle(self, events: Sequence[Event], conn: AsyncConnection[Any]) -> None:
        totals: dict[int, list[int]] = defaultdict(lambda: [0, 0])
        for event in events:
            row = totals[int(event.payload["account"])]
            row[0] += int(event.payload["amount"])
            row[1] += 1
        accounts = list(totals)
        await conn.execute(
            f"""
            INSERT INTO {quote_ident(self.totals)} AS l (account, total, events)
            SELECT * FROM unnest(%s::bigint[], %s::bigint[], %s::bigint[])
            ON CONFLICT (account) DO UPDATE
            SET total = l.total + excluded.total, events = l.events + excluded.events
            """,
            (accounts, [totals[a][0] for a in accounts], [totals[a][1] for a in accounts]),
        )
        await log_applied(conn, self.name, events)


class Counter(Projection):
    """Counts every `Credited` and `Noted` event, one statement per event (the naive style)."""

    name = "counter"
    event_types = ("Credited", "Noted")
    tables = {"counts": Table({"type": "text PRIMARY KEY", "n": "bigint NOT NULL"})}

    async def on(self, event: Event, conn: AsyncConnection[Any]) -> None:
        await conn.execute(
            "INSERT INTO counts AS c (type, n) VALUES (%s, 1)"
            " ON CONFLICT (type) DO UPDATE SET n = c.n + 1",
            (event.type,),
        )


class Picky(Projection):
    """Raises on any event whose payload says `poison`; applies the others."""

    name = "picky"
    event_types = ("Credited", "Noted")
    tables = {"picky_seen": Table({"event_id": "uuid PRIMARY KEY"})}

    async def on(self, event: Event, conn: AsyncConnection[Any]) -> None:
        if event.payload.get("poison"):
            raise ValueError(f"cannot handle event {event.event_id}")
        await conn.execute("INSERT INTO picky_seen VALUES (%s)", (event.event_id,))


class Rare(Projection):
    """Wants only `Rare` events, which almost never occur."""

    name = "rare"
    event_types = ("Rare",)
    tables = {"rare_seen": Table({"event_id": "uuid PRIMARY KEY"})}

    async def on(self, event: Event, conn: AsyncConnection[Any]) -> None:
        await conn.execute("INSERT INTO rare_seen VALUES (%s)", (event.event_id,))


def ledger_only() -> list[Projection]:
    return [Ledger()]


def ledger_and_counter() -> list[Projection]:
    return [Ledger(), Counter()]


def with_picky() -> list[Projection]:
    return [Ledger(), Picky()]


class NoName(Projection):
    event_types = ("Credited",)

    async def on(self, event: Event, conn: AsyncConnection[Any]) -> None: ...


class NoTypes(Projection):
    name = "no_types"

    async def on(self, event: Event, conn: AsyncConnection[Any]) -> None: ...


no_name = [NoName]
no_types = [NoTypes]
