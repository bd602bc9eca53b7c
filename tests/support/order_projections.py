"""A last-value projection for the ordering tests: it keeps each aggregate's latest amount and
logs the order in which it applied each aggregate's versions.

Last value wins, so unlike a sum it shows an aggregate's events applied out of version order: the
final state would then be an older version's, and the log would show the inversion.
"""

from __future__ import annotations

from typing import Any

from psycopg import AsyncConnection

from projectord import Event, Projection, Table

# Each aggregate's latest version and amount: where a fold of its events in version order ends.
LATEST = Table(
    {"aggregate_id": "uuid PRIMARY KEY", "version": "integer NOT NULL", "amount": "bigint NOT NULL"}
)
# Every (aggregate, version) in the order the projection applied them.
APPLY_ORDER = Table(
    {
        "seq": "bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY",
        "aggregate_id": "uuid NOT NULL",
        "version": "integer NOT NULL",
    }
)


class LastAmount(Projection):
    name = "last_amount"
    event_types = ("Deposited",)
    tables = {"last_amount": LATEST, "apply_order": APPLY_ORDER}

    async def on(self, event: Event, conn: AsyncConnection[Any]) -> None:
        await conn.execute(
            "INSERT INTO apply_order (aggregate_id, version) VALUES (%s, %s)",
            (event.aggregate_id, event.version),
        )
        await conn.execute(
            "INSERT INTO last_amount (aggregate_id, version, amount) VALUES (%s, %s, %s)"
            " ON CONFLICT (aggregate_id) DO UPDATE"
            " SET version = excluded.version, amount = excluded.amount",
            (event.aggregate_id, event.version, int(event.payload["amount"])),
        )


last_amount = [LastAmount]
