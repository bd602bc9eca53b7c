"""Projections of the rebuild tests: each is correct while applied live, and a rebuild that does
not know what it writes would corrupt or double its read model.

- `Qualified` writes its declared table by its schema-qualified name (`upsert_many` allows it),
  which an online rebuild's search_path does not redirect.
- `Audited` also adds every amount into `audit_sums`, a table it does not declare (its owner
  created it), which an offline rebuild does not empty.
- `Skippy` raises on an event with `{"poison": true}` and overrides the error policy: skip it,
  and never pipeline (its handler timeout is its own too).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from psycopg import AsyncConnection

from projectord import Event, Projection, Table
from projectord.read_model import upsert_many

TOTALS = {"account": "bigint PRIMARY KEY", "total": "bigint NOT NULL"}


def fold(events: Sequence[Event]) -> list[dict[str, int]]:
    totals: dict[int, int] = defaultdict(int)
    for event in events:
        totals[int(event.payload["account"])] += int(event.payload["amount"])
    return [{"account": a, "total": t} for a, t in totals.items()]


class Qualified(Projection):
    name = "qualified"
    event_types = ("Credited",)
    tables = {"qualified_totals": Table(TOTALS)}

    async def handle(self, events: Sequence[Event], conn: AsyncConnection[Any]) -> None:
        rows = fold(events)
        await upsert_many(conn, "public.qualified_totals", rows, key=["account"], add=["total"])


class Audited(Projection):
    name = "audited"
    event_types = ("Credited",)
    tables = {"audited_totals": Table(TOTALS)}

    async def handle(self, events: Sequence[Event], conn: AsyncConnection[Any]) -> None:
        rows = fold(events)
        await upsert_many(conn, "audited_totals", rows, key=["account"], add=["total"])
        await upsert_many(conn, "audit_sums", rows, key=["account"], add=["total"])


class Skippy(Projection):
    name = "skippy"
    event_types = ("Credited",)
    tables = {"skippy_seen": Table({"event_id": "uuid PRIMARY KEY"})}
    on_error = "skip"
    handler_timeout = 7.0
    pipeline = False

    async def on(self, event: Event, conn: AsyncConnection[Any]) -> None:
        if event.payload.get("poison"):
            raise ValueError(f"cannot handle event {event.event_id}")
        await conn.execute("INSERT INTO skippy_seen VALUES (%s)", (event.event_id,))


qualified = [Qualified]
audited = [Audited]
skippy = [Skippy]
