"""Sample projections and the sample `Account` aggregate, used by the demo, the benchmarks and the
README.

`Balances` is the reference account-balances projection, written set-based: one upsert per batch
(`projectord.read_model.upsert_many`). `ActivityFeed` is written the obvious way, one statement per
event in `on`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from uuid import UUID

from psycopg import AsyncConnection
from pydantic import Field

from projectord.commands.aggregate import (
    Aggregate,
    Change,
    CommandPayload,
    CommandRejected,
    handles,
)
from projectord.event_store import Event
from projectord.projection import Projection, Table
from projectord.read_model import upsert_many

DEPOSITED, WITHDRAWN, NOTED = "Deposited", "Withdrawn", "Noted"


class Balances(Projection):
    name = "balances"
    event_types = (DEPOSITED, WITHDRAWN)
    tables = {
        "balances": Table(
            {
                "id": "uuid PRIMARY KEY",
                "tenant_id": "uuid NOT NULL",
                "balance": "bigint NOT NULL DEFAULT 0",
                "events": "bigint NOT NULL DEFAULT 0",
            }
        )
    }
    read_access = ("admin", "user")

    table = "balances"  # where handle() writes; copies of this projection change it

    async def handle(self, events: Sequence[Event], conn: AsyncConnection[Any]) -> None:
        await upsert_many(
            conn, self.table, fold_balances(events), key=["id"], add=["balance", "events"]
        )


def fold_balances(events: Sequence[Event]) -> list[dict[str, Any]]:
    """One row per account of the batch: its tenant, the change of its balance, its events.

    The fold keeps a short list per account and makes the rows `upsert_many` takes at the end,
    once per account rather than once per event."""
    deltas: dict[UUID, list[Any]] = {}  # account -> [tenant, balance change, events]
    for event in events:
        amount = int(event.payload["amount"])
        delta = deltas.get(event.aggregate_id)
        if delta is None:
            delta = deltas[event.aggregate_id] = [event.tenant_id, 0, 0]
        delta[1] += amount if event.type == DEPOSITED else -amount
        delta[2] += 1
    return [
        {"id": account, "tenant_id": tenant, "balance": balance, "events": count}
        for account, (tenant, balance, count) in deltas.items()
    ]


class ActivityFeed(Projection):
    name = "activity"
    event_types = (DEPOSITED, WITHDRAWN, NOTED)
    tables = {
        "tenant_activity": Table(
            {
                "tenant_id": "uuid PRIMARY KEY",
                "events": "bigint NOT NULL DEFAULT 0",
                "last_type": "text NOT NULL",
                "last_at": "timestamptz NOT NULL",
            }
        )
    }
    read_access = ("admin",)

    async def on(self, event: Event, conn: AsyncConnection[Any]) -> None:
        await conn.execute(
            """
            INSERT INTO tenant_activity AS a (tenant_id, events, last_type, last_at)
            VALUES (%s, 1, %s, %s)
            ON CONFLICT (tenant_id) DO UPDATE
            SET events = a.events + 1, last_type = excluded.last_type, last_at = excluded.last_at
            """,
            (event.tenant_id, event.type, event.recorded_at),
        )


def demo_projections() -> list[Projection]:
    return [Balances(), ActivityFeed()]


class Deposit(CommandPayload):
    """Put `amount` (whole units, > 0) into account `account_id`; opens the account if new."""

    aggregate_field = "account_id"
    account_id: UUID
    amount: int = Field(gt=0, le=10**12, strict=True)


class Withdraw(CommandPayload):
    """Take `amount` out of account `account_id`; refused if the balance would go below zero."""

    aggregate_field = "account_id"
    account_id: UUID
    amount: int = Field(gt=0, le=10**12, strict=True)


class Account(Aggregate):
    """The write side of `Balances`: its events are the `Deposited`/`Withdrawn` that projection
    folds, payload `{"amount": int}`, keyed by the account's aggregate id."""

    aggregate_type = "account"

    def __init__(self, aggregate_id: UUID, tenant_id: UUID) -> None:
        super().__init__(aggregate_id, tenant_id)
        self.balance = 0

    @handles(Deposit)
    def deposit(self, command: Deposit) -> list[Change]:
        return [Change(DEPOSITED, {"amount": command.amount})]

    @handles(Withdraw)
    def withdraw(self, command: Withdraw) -> list[Change]:
        if command.amount > self.balance:
            raise CommandRejected(
                f"insufficient funds: account {self.id} holds {self.balance},"
                f" cannot withdraw {command.amount}"
            )
        return [Change(WITHDRAWN, {"amount": command.amount})]

    def apply(self, event: Event) -> None:
        if event.type == DEPOSITED:
            self.balance += int(event.payload["amount"])
        elif event.type == WITHDRAWN:
            self.balance -= int(event.payload["amount"])


def demo_aggregates() -> list[type[Aggregate]]:
    return [Account]
