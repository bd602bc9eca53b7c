"""The fetch path: events decoded lazily to the stored values, and the batch read ahead during a
catch-up, used only from the position it was read from."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import anyio
from psycopg import AsyncConnection
from psycopg.types.json import Jsonb

from projectord.database import connect, make_pool
from projectord.event_store import Event
from projectord.fetcher import Batch, Fetcher, ReadAhead
from projectord.queries import Queries
from projectord.runner.loop import ProjectionRunner
from tests.support.harness import TENANT, TestDatabase, append_sql, credits
from tests.support.projections import Ledger, Picky

QUERIES = Queries("projectord")


def test_fetched_events_decode_to_the_stored_values(db: TestDatabase) -> None:
    with db.connect() as conn:
        conn.execute(
            "INSERT INTO projectord.events"
            " (tenant_id, aggregate_id, version, type, payload, metadata, recorded_at)"
            " VALUES (%s, %s, 1, 'Noted', %s, %s, '2024-02-29 12:34:56.123456+02')",
            (TENANT, uuid.uuid4(), Jsonb({"text": "é", "n": [1, 2.5]}), Jsonb({"by": "me"})),
        )
        append_sql(conn, "Credited", {"account": 1, "amount": 3})
    stored = db.rows(
        "SELECT global_position, event_id, tenant_id, aggregate_id, aggregate_type, version,"
        " type, payload, metadata, recorded_at, transaction_id::text::bigint"
        " FROM projectord.events ORDER BY global_position"
    )

    async def fetch(max_bytes: int) -> Batch:
        conn = await connect(db.url, autocommit=True)
        async with conn:
            batch = await Fetcher(QUERIES, ["Noted", "Credited"]).fetch(conn, (0, 0), 10, max_bytes)
            # The fetch reads timestamptz as an integer on its own cursor only; a handler on the
            # same connection still gets datetimes.
            cur = await conn.execute("SELECT recorded_at FROM projectord.events LIMIT 1")
            assert isinstance((await cur.fetchone())[0], datetime)  # type: ignore[index]
            return batch

    def fields(e: Event) -> tuple[Any, ...]:
        return (
            e.global_position,
            e.event_id,
            e.tenant_id,
            e.aggregate_id,
            e.aggregate_type,
            e.version,
            e.type,
            e.payload,
            e.metadata,
            e.recorded_at,
            e.transaction_id,
        )

    # Both reads: the cheap one, and the running sum a byte bound this small takes (its first
    # event comes alone).
    by_bytes = anyio.run(fetch, 1)
    assert [fields(e) for e in by_bytes.events] == stored[:1]
    batch = anyio.run(fetch, 2**20)
    assert [fields(e) for e in batch.events] == stored
    noted = batch.events[0]
    assert noted.recorded_at == datetime(2024, 2, 29, 10, 34, 56, 123456, tzinfo=UTC)
    assert noted.payload is noted.payload  # decoded once, then kept
    assert noted.event_id is noted.event_id
    assert batch.horizon > batch.events[-1].transaction_id and not batch.held_back


def test_read_ahead_is_only_taken_from_its_own_position() -> None:
    read_ahead = ReadAhead(Fetcher(QUERIES, ["Credited"]), pool=None)  # type: ignore[arg-type]
    batch = Batch([], 10, False, limit=5)
    read_ahead._after, read_ahead._batch = (5, 50), batch
    assert read_ahead.take((5, 49)) is None
    assert read_ahead.take((5, 50)) is None, "a batch that did not match must be thrown away"
    read_ahead._after, read_ahead._batch = (5, 50), batch
    assert read_ahead.take((5, 50)) is batch and read_ahead.used == 1


def run_runner(
    db: TestDatabase,
    runner_for: Callable[[Any], ProjectionRunner],
    until: Callable[[ProjectionRunner], Awaitable[bool]],
) -> ProjectionRunner:
    async def main() -> ProjectionRunner:
        pool = make_pool(db.url, max_size=3, read_model_schema="public")
        await pool.open(wait=True)
        runner = runner_for(pool)
        try:
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(runner.run)
                with anyio.fail_after(60):
                    while not await until(runner):  # noqa: ASYNC110 - polls the database
                        await anyio.sleep(0.02)
                runner.request_stop()
        finally:
            await pool.close()
        return runner

    return anyio.run(main)


def test_catch_up_with_read_ahead_applies_every_event_once(db: TestDatabase) -> None:
    db.init("tests.support.projections:ledger_only")
    credits(db, 103)

    async def done(runner: ProjectionRunner) -> bool:
        return runner.status.applied_total >= 103

    runner = run_runner(
        db,
        lambda pool: ProjectionRunner(Ledger(), pool, QUERIES, batch_size=10, poll_interval=60),
        done,
    )
    assert runner._read_ahead.used >= 5, "the catch-up never used a batch read ahead"
    assert db.scalar("SELECT count(DISTINCT event_id) FROM applied_log") == 103
    assert db.scalar("SELECT count(*) FROM applied_log") == 103
    assert db.scalar("SELECT sum(total) FROM ledger") == sum(range(1, 104))


def test_the_next_batch_is_asked_for_before_the_handler_folds(db: TestDatabase) -> None:
    """The read-ahead's query goes out before the batch's handler runs, so the server reads the
    next batch while the handler folds this one."""
    db.init("tests.support.projections:ledger_only")
    credits(db, 30)
    order: list[str] = []

    class RecordingLedger(Ledger):
        async def handle(self, events: Sequence[Event], conn: AsyncConnection[Any]) -> None:
            order.append("handle")
            await super().handle(events, conn)

    def runner_for(pool: Any) -> ProjectionRunner:
        runner = ProjectionRunner(RecordingLedger(), pool, QUERIES, batch_size=10, poll_interval=60)
        fetch = runner.fetcher.fetch

        async def recording_fetch(*args: Any, alone: bool = True) -> Batch:
            if not alone:  # the read-ahead's
                order.append("read ahead")
            return await fetch(*args, alone=alone)

        runner.fetcher.fetch = recording_fetch  # type: ignore[method-assign]
        return runner

    async def done(runner: ProjectionRunner) -> bool:
        return runner.status.applied_total >= 30

    run_runner(db, runner_for, done)
    # Batches 11-20 and 21-30 are full: each reads the next one ahead before its handler runs.
    # (The first batch's read-ahead waits for the pool to open a second connection.)
    assert order[-4:] == ["read ahead", "handle", "read ahead", "handle"]


def test_a_failed_batch_drops_the_batch_read_ahead(db: TestDatabase) -> None:
    """Batch 6-10 holds a poison event and fails while 11-15 is read ahead. Once the data is
    repaired the retry must read 6-10 again: reusing what was read before would fail forever,
    and reusing 11-15 would skip 6-10."""
    db.init("tests.support.projections:with_picky")
    credits(db, 20, poison_at=8)
    repaired = False

    async def done(runner: ProjectionRunner) -> bool:
        nonlocal repaired
        if runner.status.last_error and not repaired:
            assert runner.status.applied_total == 5
            conn = await connect(db.url, autocommit=True)
            async with conn:
                await conn.execute("UPDATE projectord.events SET payload = payload - 'poison'")
            repaired = True
        return runner.status.applied_total >= 20

    run_runner(
        db,
        lambda pool: ProjectionRunner(Picky(), pool, QUERIES, batch_size=5, poll_interval=60),
        done,
    )
    assert repaired
    assert db.scalar("SELECT count(*) FROM picky_seen") == 20
