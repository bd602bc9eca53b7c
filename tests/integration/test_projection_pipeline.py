"""The default `handle` runs `on` in pipeline mode: statements keep their order, and a statement
that fails still fails the whole batch, which rolls back."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import anyio
import psycopg
import pytest
from psycopg import AsyncConnection

from projectord import Event, Projection, Table
from projectord.database import connect
from tests.support.harness import TENANT, TestDatabase


class Steps(Projection):
    """Each event inserts a row, then updates it: order matters. `dup` inserts a duplicate."""

    name = "steps"
    event_types = ("Step",)
    tables = {"steps": Table({"n": "int PRIMARY KEY", "state": "text NOT NULL"})}

    async def on(self, event: Event, conn: AsyncConnection[Any]) -> None:
        n = event.payload["n"]
        await conn.execute("INSERT INTO steps VALUES (%s, 'inserted')", (n,))
        await conn.execute("UPDATE steps SET state = 'updated' WHERE n = %s", (n,))


class UnpipelinedSteps(Steps):
    pipeline = False


def events(*numbers: int) -> list[Event]:
    now = datetime.now(UTC)
    return [
        Event(i + 1, uuid.uuid4(), TENANT, uuid.uuid4(), "", 1, "Step", {"n": n}, {}, now, 1)
        for i, n in enumerate(numbers)
    ]


def apply(db: TestDatabase, projection: Projection, batch: list[Event]) -> None:
    async def run() -> None:
        conn = await connect(db.url, autocommit=True)
        async with conn:
            await conn.execute("CREATE TABLE IF NOT EXISTS steps (n int PRIMARY KEY, state text)")
            async with conn.transaction():
                await projection.handle(batch, conn)

    anyio.run(run)


@pytest.mark.parametrize("projection", [Steps(), UnpipelinedSteps()], ids=["pipeline", "plain"])
def test_statements_apply_in_order(db: TestDatabase, projection: Projection) -> None:
    apply(db, projection, events(*range(200)))
    assert db.rows("SELECT state, count(*) FROM steps GROUP BY state") == [("updated", 200)]


@pytest.mark.parametrize("projection", [Steps(), UnpipelinedSteps()], ids=["pipeline", "plain"])
def test_a_failing_statement_rolls_the_whole_batch_back(
    db: TestDatabase, projection: Projection
) -> None:
    with pytest.raises(psycopg.errors.UniqueViolation):
        apply(db, projection, events(1, 2, 3, 2, 5))  # the second 2 fails, mid-batch
    assert db.scalar("SELECT count(*) FROM steps") == 0
