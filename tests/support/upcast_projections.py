"""What the upcasting tests run: three shapes of one event type, their upcasters, and projections
and an aggregate written for the current shape only.

`Priced` payloads, as they evolved:
- v1: `{"amount": 5}` (whole euros);
- v2: `{"amount_cents": 500}`;
- v3: `{"money": {"cents": 500, "currency": "EUR"}}` (current).

The handlers below read `payload["money"]["cents"]` and nothing else: an older shape reaching them
fails with a KeyError, and `ShapesSeen` records every payload exactly as its `on` received it.
"""

from __future__ import annotations

import os
import uuid
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from psycopg import AsyncConnection
from psycopg.types.json import Jsonb

from projectord import Event, Projection, Table, Upcasters
from projectord.commands.aggregate import (
    Aggregate,
    Change,
    CommandPayload,
    CommandRejected,
    handles,
)
from tests.support.projections import Ledger

PRICED = "Priced"
CURRENT = 3

upcasters = Upcasters()
calls = defaultdict(int)  # (type, from_version) -> calls, in this process


@upcasters.register(PRICED, from_version=1)
def euros_to_cents(payload: dict[str, Any]) -> dict[str, Any]:
    """v1 → v2. Raises on a payload marked `explode`: the test of a failing upcaster."""
    calls[(PRICED, 1)] += 1
    if payload.get("explode"):
        raise ValueError("this payload cannot be upcast")
    return {"amount_cents": payload["amount"] * 100}


@upcasters.register(PRICED, from_version=2)
def cents_to_money(payload: dict[str, Any]) -> dict[str, Any]:
    """v2 → v3."""
    calls[(PRICED, 2)] += 1
    return {"money": {"cents": payload["amount_cents"], "currency": "EUR"}}


def v3(cents: int) -> dict[str, Any]:
    return {"money": {"cents": cents, "currency": "EUR"}}


def shapes(cents: int) -> dict[int, dict[str, Any]]:
    """The same price in each version's shape (whole euros only, so v1 can say it)."""
    assert cents % 100 == 0
    return {1: {"amount": cents // 100}, 2: {"amount_cents": cents}, 3: v3(cents)}


class ShapesSeen(Projection):
    """One event at a time (`on`): records the payload as the handler saw it."""

    name = "shapes_seen"
    event_types = (PRICED,)
    tables = {
        "shapes_seen": Table(
            {"event_id": "uuid PRIMARY KEY", "schema_version": "int NOT NULL", "payload": "jsonb"}
        )
    }

    async def on(self, event: Event, conn: AsyncConnection[Any]) -> None:
        cents = event.payload["money"]["cents"]  # the current shape, or a KeyError
        if str(cents) == os.environ.get("UPCAST_TEST_POISON_CENTS"):
            raise RuntimeError(f"poison price {cents}")
        await conn.execute(
            "INSERT INTO shapes_seen VALUES (%s, %s, %s)",
            (event.event_id, event.schema_version, Jsonb(event.payload)),
        )


class PriceTotals(Projection):
    """A whole batch at a time (`handle`): the sum of cents per aggregate."""

    name = "price_totals"
    event_types = (PRICED,)
    tables = {
        "price_totals": Table(
            {"aggregate_id": "uuid PRIMARY KEY", "cents": "bigint NOT NULL", "n": "int NOT NULL"}
        )
    }

    async def handle(self, events: Sequence[Event], conn: AsyncConnection[Any]) -> None:
        totals: dict[Any, list[int]] = defaultdict(lambda: [0, 0])
        for event in events:
            row = totals[event.aggregate_id]
            row[0] += event.payload["money"]["cents"]
            row[1] += 1
        ids = list(totals)
        await conn.execute(
            "INSERT INTO price_totals AS t SELECT * FROM unnest(%s::uuid[], %s::bigint[],"
            " %s::int[]) ON CONFLICT (aggregate_id) DO UPDATE"
            " SET cents = t.cents + excluded.cents, n = t.n + excluded.n",
            (ids, [totals[i][0] for i in ids], [totals[i][1] for i in ids]),
        )


class PricedCount(Projection):
    """Counts `Priced` events and never reads a payload: the shape is none of its business."""

    name = "priced_count"
    event_types = (PRICED,)
    tables = {"priced_count": Table({"event_id": "uuid PRIMARY KEY"})}

    async def handle(self, events: Sequence[Event], conn: AsyncConnection[Any]) -> None:
        await conn.execute(
            "INSERT INTO priced_count SELECT unnest(%s::uuid[])", ([e.event_id for e in events],)
        )


def shapes_and_totals() -> list[Projection]:
    return [ShapesSeen(), PriceTotals()]


def priced_and_ledger() -> list[Projection]:
    return [ShapesSeen(), PriceTotals(), PricedCount(), Ledger()]


def shapes_only() -> list[Projection]:
    return [ShapesSeen()]


# The command side: an aggregate whose `apply` knows only v3.


class Charge(CommandPayload):
    aggregate_id: uuid.UUID
    cents: int


class Till(Aggregate):
    """Refuses a charge that would take its total over a limit: deciding needs the folded total."""

    aggregate_type = "till"
    limit = 100_000
    applied: list[dict[str, Any]] = []  # every payload `apply` was given, in this process

    def __init__(self, aggregate_id: uuid.UUID, tenant_id: uuid.UUID) -> None:
        super().__init__(aggregate_id, tenant_id)
        self.cents = 0

    @handles(Charge)
    def charge(self, command: Charge) -> list[Change]:
        if self.cents + command.cents > self.limit:
            raise CommandRejected(f"over the limit: {self.cents} + {command.cents}")
        return [Change(PRICED, v3(command.cents))]

    def apply(self, event: Event) -> None:
        self.applied.append(event.payload)
        self.cents += event.payload["money"]["cents"]
