"""Projections for the batch-bound tests (tests/integration/test_batch_bounds.py).

`PacedLedger` is the additive `Ledger` with a short pause per batch, so that a catch-up lasts
long enough for a reload to land in the middle of it. `Documents` is a last-value projection
that also records which batch transaction applied each event and how large the event was, so a
test can check what each batch held.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import anyio
from psycopg import AsyncConnection

from projectord import Event, Projection, Table
from tests.support.projections import Ledger

BATCH_PAUSE = 0.005  # seconds per batch: 20,000 events in batches of 50-200 take a few seconds


class PacedLedger(Ledger):
    async def handle(self, events: Sequence[Event], conn: AsyncConnection[Any]) -> None:
        await super().handle(events, conn)
        await anyio.sleep(BATCH_PAUSE)


class Documents(Projection):
    """The last version of each document, and a log of every apply with the transaction id of
    its batch (one transaction per batch), so a test can see which events went together."""

    name = "documents"
    event_types = ("Documented",)
    tables = {
        "documents": Table(
            {"id": "uuid PRIMARY KEY", "version": "integer NOT NULL", "body": "text NOT NULL"}
        ),
        "document_applies": Table(
            {
                "event_id": "uuid NOT NULL",
                "batch_xid": "xid8 NOT NULL DEFAULT pg_current_xact_id()",
            }
        ),
    }

    async def handle(self, events: Sequence[Event], conn: AsyncConnection[Any]) -> None:
        last: dict[Any, Event] = {}
        for event in events:
            last[event.aggregate_id] = event  # commit order: the last one wins
        await conn.execute(
            "INSERT INTO documents AS d (id, version, body)"
            " SELECT * FROM unnest(%s::uuid[], %s::int[], %s::text[])"
            " ON CONFLICT (id) DO UPDATE SET version = excluded.version, body = excluded.body",
            (
                list(last),
                [e.version for e in last.values()],
                [e.payload["body"] for e in last.values()],
            ),
        )
        await conn.execute(
            "INSERT INTO document_applies (event_id) SELECT unnest(%s::uuid[])",
            ([e.event_id for e in events],),
        )


def paced_ledger() -> list[Projection]:
    return [PacedLedger()]


def documents() -> list[Projection]:
    return [Documents()]
