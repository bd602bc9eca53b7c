"""Projections for the drift, security and online-rebuild tests.

Reader roles are cluster-wide, so each test names its own: the secured projections take their
`read_access` from the PROJECTORD_TEST_READERS environment variable (comma-separated), which a
test sets for the daemon or CLI process it starts, or from an argument in-process.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from psycopg import AsyncConnection

from projectord import Event, Projection, Table

READERS_ENV = "PROJECTORD_TEST_READERS"

ACCOUNTS = Table(
    {
        "id": "uuid PRIMARY KEY",
        "tenant_id": "uuid NOT NULL",
        "owner": "text NOT NULL DEFAULT ''",
        "balance": "int8 NOT NULL DEFAULT 0",
        "note": "varchar(40)",
        "opened_at": "timestamptz NOT NULL",
    },
    indexes=[("tenant_id", "owner")],
)


class Accounts(Projection):
    """One row per account, per tenant; `Opened` creates it, `Credited` adds to its balance."""

    name = "accounts"
    event_types = ("Opened", "Credited")
    tables = {"accounts": ACCOUNTS}

    def __init__(self, readers: Sequence[str] = ()) -> None:
        self.read_access = tuple(readers)

    async def handle(self, events: Sequence[Event], conn: AsyncConnection[Any]) -> None:
        for event in events:
            amount = int(event.payload.get("amount", 0))
            await conn.execute(
                "INSERT INTO accounts AS a (id, tenant_id, owner, balance, opened_at)"
                " VALUES (%s, %s, %s, %s, %s)"
                " ON CONFLICT (id) DO UPDATE SET balance = a.balance + excluded.balance",
                (
                    event.aggregate_id,
                    event.tenant_id,
                    event.payload.get("owner", ""),
                    amount,
                    event.recorded_at,
                ),
            )


def readers_from_env() -> tuple[str, ...]:
    return tuple(r for r in os.environ.get(READERS_ENV, "").split(",") if r)


def accounts() -> list[Projection]:
    return [Accounts(readers_from_env())]


class Untenanted(Projection):
    """Declares readers but has no tenant_id to scope them by: a declaration drift refuses."""

    name = "untenanted"
    event_types = ("Noted",)
    tables = {"untenanted": Table({"id": "uuid PRIMARY KEY"})}
    read_access = ("someone",)

    async def on(self, event: Event, conn: AsyncConnection[Any]) -> None: ...


no_tenant = [Untenanted]


class Savings(Accounts):
    """A second secured projection with a table of its own, so two projections can declare
    different readers."""

    name = "savings"
    tables = {"savings": ACCOUNTS}
