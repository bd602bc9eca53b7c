"""The event store: schema, idempotent init, appends with optimistic concurrency, notifications."""

from __future__ import annotations

import uuid
from typing import Any

import anyio
import psycopg
import pytest

from projectord import ConcurrencyError, EventStore, NewEvent
from projectord.database import connect
from tests.support.harness import TENANT, TestDatabase, append_sql, arm_wakeups

CATALOG_SNAPSHOT = """
SELECT string_agg(
    format('%s %s %s', c.relname, c.relkind,
           a.attname || ':' || format_type(a.atttypid, a.atttypmod)),
    ',' ORDER BY c.relname, a.attnum)
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
WHERE n.nspname IN ('projectord', 'public')
"""


def test_init_twice_changes_nothing(db: TestDatabase) -> None:
    db.init("tests.support.projections:ledger_and_counter")
    before = (db.scalar(CATALOG_SNAPSHOT), db.scalar("SELECT count(*) FROM pg_trigger"))
    assert db.init("tests.support.projections:ledger_and_counter") == []
    after = (db.scalar(CATALOG_SNAPSHOT), db.scalar("SELECT count(*) FROM pg_trigger"))
    assert before == after
    assert db.scalar("SELECT count(*) FROM projectord.schema_migrations") >= 1


def test_events_table_matches_the_contract(db: TestDatabase) -> None:
    columns = dict(
        db.rows(
            "SELECT column_name, data_type FROM information_schema.columns"
            " WHERE table_schema = 'projectord' AND table_name = 'events'"
        )
    )
    assert columns == {
        "global_position": "bigint",
        "event_id": "uuid",
        "tenant_id": "uuid",
        "aggregate_id": "uuid",
        "aggregate_type": "text",
        "version": "integer",
        "type": "text",
        "payload": "jsonb",
        "metadata": "jsonb",
        "recorded_at": "timestamp with time zone",
        "transaction_id": "xid8",
        "schema_version": "integer",  # the payload's shape (migration 0017, docs/upcasting.md)
    }


def test_plain_sql_insert_is_a_valid_append(db: TestDatabase) -> None:
    with db.connect() as conn:
        append_sql(conn, "Credited", {"account": 1, "amount": 5})
    row = db.rows(
        "SELECT event_id IS NOT NULL, aggregate_type, metadata, transaction_id > '0'"
        " FROM projectord.events"
    )
    assert row == [(True, "", {}, True)]


def test_append_detects_a_concurrent_writer(db: TestDatabase) -> None:
    store = EventStore()
    aggregate = uuid.uuid4()

    def event(version: int, kind: str = "Credited") -> NewEvent:
        return NewEvent(TENANT, aggregate, version, kind, {"account": 1, "amount": 1})

    async def scenario() -> None:
        conn = await connect(db.url, autocommit=True)
        async with conn:
            await store.append(conn, [event(1), event(2)])
            with pytest.raises(ConcurrencyError) as caught:
                await store.append(conn, [event(3), event(2, "Other")])
            assert caught.value.version == 2
            assert "already has version 2" in str(caught.value)
            assert await store.aggregate_version(conn, aggregate) == 2
            loaded = await store.load(conn, aggregate)
            assert [(e.version, e.type) for e in loaded] == [(1, "Credited"), (2, "Credited")]

    anyio.run(scenario)
    # The failed append wrote nothing, not even its first event.
    assert db.scalar("SELECT count(*) FROM projectord.events") == 2


def test_one_notification_per_inserting_transaction(db: TestDatabase) -> None:
    with db.connect(autocommit=True) as listener, db.connect() as writer:
        listener.execute('LISTEN "projectord_projectord"')
        arm(listener)  # appends notify only while a listener is armed (test_wakeup_arming.py)
        for _ in range(3):
            append_sql(writer, "Credited", {"account": 1, "amount": 1})
        writer.execute(
            "INSERT INTO projectord.events (tenant_id, aggregate_id, version, type)"
            " SELECT %s, gen_random_uuid(), 1, 'Noted' FROM generate_series(1, 50)",
            (TENANT,),
        )
        writer.commit()
        received = list(listener.notifies(timeout=1.0))
    assert len(received) == 1
    assert received[0].payload == ""  # never the event body


def arm(listener: psycopg.Connection[Any]) -> None:
    arm_wakeups(listener)


def test_rolled_back_append_notifies_nothing(db: TestDatabase) -> None:
    with db.connect(autocommit=True) as listener, db.connect() as writer:
        listener.execute('LISTEN "projectord_projectord"')
        arm(listener)
        append_sql(writer, "Credited", {"account": 1, "amount": 1})
        writer.rollback()
        assert list(listener.notifies(timeout=0.5)) == []


def test_version_clash_from_plain_sql_is_rejected(db: TestDatabase) -> None:
    aggregate = uuid.uuid4()
    with db.connect() as conn:
        append_sql(conn, "Credited", {"account": 1, "amount": 1}, aggregate_id=aggregate)
        conn.commit()
        with pytest.raises(psycopg.errors.UniqueViolation):
            append_sql(conn, "Credited", {"account": 1, "amount": 1}, aggregate_id=aggregate)
