"""A batch's transaction is pipelined: the handler's statements, the checkpoint's compare-and-set
and COMMIT travel together. These tests make each way it could go wrong happen for real: a
checkpoint moved under the runner, a handler statement that fails, a handler that uses COPY (which
pipeline mode cannot run), and a fetch plan that must not go stale as the table grows."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import anyio
import psycopg
import pytest
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from projectord import Event, Projection, Table
from projectord.database import connect, make_pool
from projectord.fetcher import Fetcher
from projectord.queries import Queries
from projectord.runner.batch import BatchFailed
from projectord.runner.checkpoint_store import CheckpointMoved
from projectord.runner.loop import ProjectionRunner
from tests.support.harness import TENANT, TestDatabase, credits
from tests.support.projections import Ledger

QUERIES = Queries("projectord")
GROW = """
INSERT INTO projectord.events (tenant_id, aggregate_id, version, type, payload)
SELECT %s, gen_random_uuid(), 1, 'Credited', jsonb_build_object('account', g %% 3, 'amount', 1)
FROM generate_series(1, 5000) g
"""
T = TypeVar("T")


class CopiedCredits(Projection):
    """A set-based handler that loads its rows with COPY."""

    name = "copied_credits"
    event_types = ("Credited",)
    tables = {"copied_credits": Table({"position": "bigint PRIMARY KEY", "amount": "int"})}

    async def handle(self, events: Sequence[Event], conn: AsyncConnection[Any]) -> None:
        async with conn.cursor().copy("COPY copied_credits (position, amount) FROM STDIN") as copy:
            for event in events:
                await copy.write_row((event.global_position, event.payload["amount"]))


class InsertedCredits(Projection):
    """A handler that is not idempotent: applying an event twice fails on the primary key."""

    name = "inserted_credits"
    event_types = ("Credited",)
    tables = {"inserted_credits": Table({"position": "bigint PRIMARY KEY", "amount": "int"})}

    async def handle(self, events: Sequence[Event], conn: AsyncConnection[Any]) -> None:
        await conn.execute(
            "INSERT INTO inserted_credits SELECT * FROM unnest(%s::bigint[], %s::int[])",
            ([e.global_position for e in events], [e.payload["amount"] for e in events]),
        )


class FailsOnSecondStatement(Ledger):
    """Writes the ledger, then runs a statement that fails: the first write must not commit."""

    async def handle(self, events: Sequence[Event], conn: AsyncConnection[Any]) -> None:
        await super().handle(events, conn)
        await conn.execute("SELECT 1 / 0")


def with_runner(
    db: TestDatabase,
    projection: Projection,
    body: Callable[[ProjectionRunner, AsyncConnectionPool], Awaitable[T]],
) -> T:
    async def main() -> T:
        pool = make_pool(db.url, max_size=3, read_model_schema="public")
        await pool.open(wait=True)
        try:
            runner = ProjectionRunner(projection, pool, QUERIES, batch_size=100, poll_interval=60)
            return await body(runner, pool)
        finally:
            await pool.close()

    return anyio.run(main)


def stored(db: TestDatabase, name: str, column: str) -> int:
    """A column of the projection's positions row (`global_position`, `applied_total`)."""
    query = f"SELECT {column} FROM projectord.projection_positions WHERE name = %s"
    return int(db.scalar(query, (name,)))


def test_a_moved_checkpoint_rolls_back_the_pipelined_batch(db: TestDatabase) -> None:
    """COMMIT is sent with the compare-and-set; only its error keeps the batch from committing."""
    db.init("tests.support.projections:ledger_only")
    credits(db, 5)

    async def body(runner: ProjectionRunner, pool: AsyncConnectionPool) -> None:
        await runner._load_checkpoint()
        with db.connect(autocommit=True) as other:  # another writer moves the checkpoint
            other.execute(
                "UPDATE projectord.projection_positions SET global_position = 1"
                " WHERE name = 'ledger'"
            )
        with pytest.raises(CheckpointMoved):
            await runner.step()
        async with pool.connection() as conn:  # the connection went back clean
            assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE

    with_runner(db, Ledger(), body)
    assert db.scalar("SELECT count(*) FROM ledger") == 0
    assert db.scalar("SELECT count(*) FROM applied_log") == 0
    assert stored(db, "ledger", "global_position") == 1


@pytest.mark.parametrize("pipeline", [True, False])
def test_a_stale_runner_sees_its_checkpoint_moved_before_its_handler_fails(
    db: TestDatabase, pipeline: bool
) -> None:
    """A runner whose batch committed although it saw an error (the answer to COMMIT lost with
    its connection) retries from its old checkpoint. The compare-and-set must stop that retry
    before the handler runs: found by the soak benchmark, where the retry's duplicate key was
    taken for a poison event and stopped the projection for good."""
    with db.connect(autocommit=True) as conn:
        conn.execute("CREATE TABLE inserted_credits (position bigint PRIMARY KEY, amount int)")
    credits(db, 5)
    projection = InsertedCredits()
    projection.pipeline = pipeline

    async def body(stale: ProjectionRunner, pool: AsyncConnectionPool) -> None:
        await stale._load_checkpoint()
        current = ProjectionRunner(projection, pool, QUERIES, batch_size=100, poll_interval=60)
        await current._load_checkpoint()
        await current.step()  # the batch commits; `stale` still holds the checkpoint before it
        with pytest.raises(CheckpointMoved):
            await stale.step()

    with_runner(db, projection, body)
    assert db.scalar("SELECT count(*) FROM inserted_credits") == 5


def test_a_failing_statement_commits_nothing_of_its_batch(db: TestDatabase) -> None:
    db.init("tests.support.projections:ledger_only")
    credits(db, 5)

    async def body(runner: ProjectionRunner, pool: AsyncConnectionPool) -> None:
        await runner._load_checkpoint()
        with pytest.raises(BatchFailed) as failed:
            await runner.step()
        assert isinstance(failed.value.error, psycopg.errors.DivisionByZero)
        async with pool.connection() as conn:
            assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE

    with_runner(db, FailsOnSecondStatement(), body)
    assert db.scalar("SELECT count(*) FROM ledger") == 0
    assert stored(db, "ledger", "global_position") == 0


def test_a_handler_using_copy_runs_without_the_pipeline(db: TestDatabase) -> None:
    with db.connect(autocommit=True) as conn:
        conn.execute("CREATE TABLE copied_credits (position bigint PRIMARY KEY, amount int)")
    credits(db, 7)

    async def body(runner: ProjectionRunner, pool: AsyncConnectionPool) -> bool:
        await runner._load_checkpoint()
        first = await runner.step()
        credits(db, 3)
        second = await runner.step()
        assert len(first.events) == 7 and len(second.events) == 3
        return runner.batches.pipelined

    assert with_runner(db, CopiedCredits(), body) is False
    # amounts 1..7, then 1..3
    assert db.rows("SELECT count(*), sum(amount) FROM copied_credits") == [(10, 34)]
    assert stored(db, "copied_credits", "applied_total") == 10


def test_the_fetch_plan_does_not_go_stale_as_the_table_grows(db: TestDatabase) -> None:
    """A fetch prepared while the table was tiny (a sequential scan is right then) must not keep
    that plan once it holds many events: each fetch would read the whole table. The first fetch
    that sees the table grown may still run on it; none after that."""
    with db.connect(autocommit=True) as conn:
        conn.execute("ALTER TABLE projectord.events SET (autovacuum_enabled = false)")
        conn.execute("ANALYZE projectord.events")
    credits(db, 3)
    fetcher = Fetcher(QUERIES, ["Credited"])

    async def fetches() -> int:
        conn = await connect(db.url, autocommit=True)
        async with conn:
            for _ in range(20):  # past the prepare thresholds (psycopg 5, server 5): plan kept
                # (position: the same parameter type, int4, as below; psycopg prepares a
                # statement per query and parameter types)
                await fetcher.fetch(conn, (0, 40_000), 100)
            with db.connect(autocommit=True) as writer:
                for _ in range(10):  # many transactions; no statement that scans the table
                    writer.execute(GROW, (TENANT,))
            end = await last_position(conn)
            await fetcher.fetch(conn, end, 100)  # sees the table grown
            before = await sequential_scans(conn)
            for _ in range(10):  # the live case: the checkpoint is near the end
                batch = await fetcher.fetch(conn, end, 100)
                assert batch.events == []
            return await sequential_scans(conn) - before

    assert anyio.run(fetches) == 0


async def sequential_scans(conn: AsyncConnection[Any]) -> int:
    await conn.execute("SELECT pg_stat_force_next_flush()")
    await conn.execute("SELECT pg_stat_clear_snapshot()")
    cur = await conn.execute(
        "SELECT seq_scan FROM pg_stat_user_tables WHERE relid = 'projectord.events'::regclass"
    )
    row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def last_position(conn: AsyncConnection[Any]) -> tuple[int, int]:
    cur = await conn.execute(
        "SELECT e.transaction_id::text::bigint, e.global_position FROM projectord.events e"
        " ORDER BY e.transaction_id DESC, e.global_position DESC LIMIT 1"
    )
    row = await cur.fetchone()
    assert row is not None
    return int(row[0]), int(row[1])
