"""Projections of the rebuild tests: each is correct while applied live, and a rebuild that does
not know what it writes would corrupt or double its read model.

- `Qualified` writes its declared table by its schema-qualified name (`upsert_many` allows it),
  which an online rebuild's search_path does not redirect.
- `Audited` also adds every amount into `audit_sums`, a table it does not declare (its owner
  created it), which an offline rebuild does not empty.
- `Skippy` raises on an event with `{"poison": true}` (it is `Picky`) and overrides the error
  policy: skip it, and never pipeline (its handler timeout is its own too).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from psycopg import AsyncConnection

from projectord import Event, Projection, Table
from projectord.read_model import upsert_many
from tests.support.projections import Picky

TOTALS = {"account": "bigint PRIMARY KEY", "total": "bigint NOT NULL"}


def fold(events: Sequence[Event]) -> list[dict[str, int]]:
    totals: dict[int, int] = defaultdict(int)
    for event in events:
        totals[int(event.payload["account"])] += int(event.payload["amount"])
    return [{"account": a, "total": t} for a, t in totals.items()]


class Totals(Projection):
    """Adds each account's amounts into every table of `writes`, by the names given there."""

    event_types = ("Credited",)
    writes: tuple[str, ...] = ()

    async def handle(self, events: Sequence[Event], conn: AsyncConnection[Any]) -> None:
        rows = fold(events)
        for table in self.writes:
            await upsert_many(conn, table, rows, key=["account"], add=["total"])


class Qualified(Totals):
    name = "qualified"
    tables = {"qualified_totals": Table(TOTALS)}
    writes = ("public.qualified_totals",)


class Audited(Totals):
    name = "audited"
    tables = {"audited_totals": Table(TOTALS)}
    writes = ("audited_totals", "audit_sums")


class Skippy(Picky):
    """`Picky` (applies every event but a poison one) with a policy of its own."""

    name = "skippy"
    on_error = "skip"
    handler_timeout = 7.0
    pipeline = False


qualified = [Qualified]
audited = [Audited]
skippy = [Skippy]
