"""Review of the catch-up optimisations (fetch of recorded_at / transaction id as integers, the
event id as 16 bytes decoded lazily, the upcasting shortcut, the read-ahead asked for before the
fold, the Balances fold): attacks against a real PostgreSQL.

Each test asserts what must hold whatever the optimisation: every event applied once, in commit
order, with the stored values; a test marked xfail(strict) shows a bug the review found."""

from __future__ import annotations

import copy
import json
import pickle
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import orjson
import psycopg
import pytest
from psycopg import AsyncConnection
from psycopg.types.json import Jsonb

from projectord import Event, Projection, Table
from projectord.checkpoint import Checkpoint
from projectord.database import configure_json, connect, make_pool
from projectord.event_store import EventStore
from projectord.fetcher import Fetcher, _fetch_cursor
from projectord.queries import Queries
from projectord.runner.dead_letters import DeadLetterRetry
from projectord.runner.error_policy import ErrorPolicy
from projectord.runner.loop import ProjectionRunner
from projectord.samples import DEPOSITED, fold_balances
from projectord.upcasting import (
    SchemaVersionTooNew,
    Upcasters,
    decode_payload,
    installed,
    installing,
)
from tests.support.harness import TENANT, TestDatabase, append_sql

QUERIES = Queries("projectord")

# Timestamps a legacy import or a clock may have stored: around both epochs (1970, 2000), before
# 2000 (negative binary values), the ends of Python's range, odd historical offsets.
RECORDED = [
    "0001-01-01 00:00:00+00",
    "1900-01-01 00:00:00+01:30",
    "1969-12-31 23:59:59.999999+00",
    "1970-01-01 00:00:00+00",
    "1999-12-31 23:59:59.999999+00",
    "2000-01-01 00:00:00+00",
    "2000-01-01 00:00:00.000001+00",
    "2000-01-01 00:00:00+14",
    "2038-01-19 03:14:08+00",
    "9999-12-31 23:59:59.999999+00",
]

RECORDER_TABLE = Table(
    {
        "seq": "bigserial PRIMARY KEY",
        "global_position": "bigint NOT NULL",
        "event_id": "uuid NOT NULL",
        "recorded_at": "timestamptz NOT NULL",
        "txid": "bigint NOT NULL",
        "payload": "jsonb NOT NULL",
        "metadata": "jsonb NOT NULL",
    }
)

KEPT: list[Event] = []  # events a handler keeps beyond its batch


class Recorder(Projection):
    """Records every field of every event it applies, in apply order; raises on a payload that
    says `poison`, and keeps every event object it is handed."""

    name = "recorder"
    event_types = ("Noted", "Credited")
    tables = {"recorded": RECORDER_TABLE}

    async def handle(self, events: Sequence[Event], conn: AsyncConnection[Any]) -> None:
        for event in events:
            if event.payload.get("poison"):
                raise ValueError(f"poison {event.event_id}")
        KEPT.extend(events)
        await conn.execute(
            "INSERT INTO recorded (global_position, event_id, recorded_at, txid, payload, metadata)"
            " SELECT * FROM unnest(%s::bigint[], %s::uuid[], %s::timestamptz[], %s::bigint[],"
            " %s::jsonb[], %s::jsonb[])",
            (
                [e.global_position for e in events],
                [e.event_id for e in events],
                [e.recorded_at for e in events],
                [e.transaction_id for e in events],
                [Jsonb(e.payload) for e in events],
                [Jsonb(e.metadata) for e in events],
            ),
        )


def recorders() -> list[Projection]:
    return [Recorder()]


def peekers() -> list[Projection]:
    return [Peeker()]


PEEKED: list[tuple[Any, ...]] = []


class Peeker(Projection):
    """Reads timestamps and transaction ids on the connection the batch was fetched on."""

    name = "peeker"
    event_types = ("Credited",)
    tables = {"peeked": Table({"n": "bigint"})}

    async def handle(self, events: Sequence[Event], conn: AsyncConnection[Any]) -> None:
        for binary in (False, True):
            cur = conn.cursor(binary=binary)
            await cur.execute(
                "SELECT e.recorded_at, now(), e.transaction_id::text FROM projectord.events e"
                " WHERE e.global_position = %s",
                (events[0].global_position,),
            )
            PEEKED.append(await cur.fetchone())  # type: ignore[arg-type]


def insert_event(conn: psycopg.Connection[Any], recorded_at: str, payload: dict[str, Any]) -> None:
    conn.execute(
        "INSERT INTO projectord.events"
        " (tenant_id, aggregate_id, version, type, payload, metadata, recorded_at)"
        " VALUES (%s, %s, 1, 'Noted', %s, %s, %s)",
        (TENANT, uuid.uuid4(), Jsonb(payload), Jsonb({"at": recorded_at}), recorded_at),
    )


# The recorded rows that match the stored event in every field, compared by the server.
MATCHING = """
SELECT count(*) FROM recorded r JOIN projectord.events e USING (global_position)
WHERE r.event_id = e.event_id AND r.recorded_at = e.recorded_at
  AND r.txid = e.transaction_id::text::bigint AND r.payload = e.payload
  AND r.metadata = e.metadata
"""


def test_catch_up_across_held_back_transaction_and_dead_letter_applies_each_event_once_in_order(
    db: TestDatabase,
) -> None:
    """A catch-up with read-ahead (batches of 5) over events with extreme timestamps, one event
    held back by an open transaction while later ones commit, and a poison event that fails its
    batch (the read-ahead is in flight), is bisected and dead-lettered. Every other event must be
    applied exactly once, in commit order, with every field as stored; events kept by the handler
    beyond their batch must still decode to the stored values."""
    db.init("tests.integration.test_catch_up_review:recorders")
    KEPT.clear()
    with db.connect(autocommit=True) as conn:
        conn.execute("SET TimeZone = 'America/St_Johns'")  # a writer in a half-hour zone
        for at in RECORDED:
            insert_event(conn, at, {"at": at})
        for n in range(23):
            append_sql(
                conn,
                "Credited",
                {"account": n % 3, "amount": n, **({"poison": True} if n == 17 else {})},
            )
    early = db.scalar("SELECT count(*) FROM projectord.events")
    holder = db.connect()  # not autocommit: holds its transaction (and its id) open
    insert_event(holder, "1999-06-30 12:00:00+00", {"held": True})
    with db.connect(autocommit=True) as conn:
        for n in range(31):
            append_sql(conn, "Credited", {"account": n % 3, "amount": 100 + n})
    total = db.scalar("SELECT count(*) FROM projectord.events") + 1  # and the held one

    async def main() -> ProjectionRunner:
        pool = make_pool(db.url, max_size=3, read_model_schema="public")
        await pool.open(wait=True)
        runner = ProjectionRunner(
            Recorder(),
            pool,
            QUERIES,
            batch_size=5,
            poll_interval=0.05,
            policy=ErrorPolicy(on_error="skip", max_attempts=2),
        )
        try:
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(runner.run)
                with anyio.fail_after(60):
                    # Everything before the open transaction, but the dead letter.
                    while db.scalar("SELECT count(*) FROM recorded") < early - 1:  # noqa: ASYNC110
                        await anyio.sleep(0.02)
                    holder.commit()
                    while db.scalar("SELECT count(*) FROM recorded") < total - 1:  # noqa: ASYNC110
                        await anyio.sleep(0.02)
                runner.request_stop()
        finally:
            await pool.close()
            holder.close()
        return runner

    runner = anyio.run(main)
    assert runner._read_ahead.used >= 2, "the catch-up never used a batch read ahead"
    applied = db.rows("SELECT global_position FROM recorded ORDER BY seq")
    poison = db.scalar("SELECT global_position FROM projectord.events WHERE payload ? 'poison'")
    in_commit_order = db.rows(
        "SELECT global_position FROM projectord.events WHERE global_position <> %s"
        " ORDER BY transaction_id, global_position",
        (poison,),
    )
    assert applied == in_commit_order  # none lost, doubled or reordered
    assert db.scalar(MATCHING) == total - 1
    letter = db.rows(
        "SELECT d.event_id = e.event_id, d.transaction_id = e.transaction_id"
        " FROM projectord.dead_letters d JOIN projectord.events e USING (global_position)"
    )
    assert letter == [(True, True)]
    stored = {
        row[0]: row[1:]
        for row in db.rows(
            "SELECT global_position, event_id, transaction_id::text::bigint, payload, metadata"
            " FROM projectord.events"
        )
    }
    kept = {e.global_position: (e.event_id, e.transaction_id, e.payload, e.metadata) for e in KEPT}
    assert len(kept) == total - 1 and all(kept[p] == stored[p] for p in kept)

    # The dead letter, repaired and retried: the retry's event (read by a plain cursor) records
    # the same fields as the fetch's events did.
    db.rows("UPDATE projectord.events SET payload = payload - 'poison' RETURNING 1")

    async def retry() -> None:
        conn = await connect(db.url, autocommit=True)
        async with conn:
            configure_json(conn)
            (letter,) = await (
                await conn.execute("SELECT id FROM projectord.dead_letters")
            ).fetchall()
            await DeadLetterRetry(conn, QUERIES, {"recorder": Recorder()}, ErrorPolicy()).retry(
                letter[0]
            )

    anyio.run(retry)
    assert db.scalar("SELECT count(*) FROM recorded") == total
    assert db.scalar(MATCHING) == total


def test_recorded_at_fetches_as_stored_whatever_the_time_zones(db: TestDatabase) -> None:
    """recorded_at arrives as microseconds since 2000-01-01 (negative before it); the event must
    decode to the stored instant, in UTC, whatever the writer's and the reader's time zones."""
    with db.connect(autocommit=True) as conn:
        conn.execute("SET TimeZone = 'Asia/Kathmandu'")
        for at in RECORDED:
            insert_event(conn, at, {"at": at})
    expected = [
        datetime.fromisoformat(at.replace(" ", "T") + ("" if at[-3] == ":" else ":00")).astimezone(
            UTC
        )
        for at in RECORDED
    ]

    async def fetch() -> list[Event]:
        conn = await connect(db.url, autocommit=True)
        async with conn:
            await conn.execute("SET TimeZone = 'Pacific/Chatham'")
            batch = await Fetcher(QUERIES, ["Noted"]).fetch(conn, Checkpoint(0, 0), 100)
            return batch.events

    events = anyio.run(fetch)
    assert [e.recorded_at for e in events] == expected
    assert all(e.recorded_at.utcoffset() == timedelta(0) for e in events)


@pytest.mark.parametrize("value", ["4294967295", "4294967296", "4294967301", "1099511627776777"])
def test_the_fetch_cursor_reads_xid8_beyond_32_bits_exactly(db: TestDatabase, value: str) -> None:
    """A transaction id is an xid8 (epoch << 32 | xid): past the first wraparound it exceeds
    2^32. The fetch reads its binary form with the int8 loader; it must be the same number, and
    a checkpoint there must compare in commit order and go back to the server unchanged."""

    async def read() -> tuple[int, bool]:
        conn = await connect(db.url, autocommit=True)
        async with conn:
            cur = _fetch_cursor(conn)
            await cur.execute(f"SELECT '{value}'::xid8, '{value}'::xid8 > '4294967295'::xid8")
            txid, above = await cur.fetchone()  # type: ignore[misc]
            back = await conn.execute("SELECT %s::xid8 = %s::xid8", (str(txid), value))
            assert (await back.fetchone())[0] is True  # type: ignore[index]
            return txid, above

    txid, above = anyio.run(read)
    assert txid == int(value)
    assert (Checkpoint(txid, 1) > Checkpoint(4294967295, 2**40)) == above


def test_a_lazily_decoded_event_id_behaves_as_the_uuid(db: TestDatabase) -> None:
    """The fetched event id is 16 bytes until read. Equality, hashing, pickling, copying and
    every JSON encoder the daemon uses (orjson, Jsonb through the pool's dumps, json with
    default=str for log lines) must see the UUID, and equal the event loaded by the store."""
    aggregate = uuid.uuid4()
    with db.connect(autocommit=True) as conn:
        append_sql(conn, "Noted", {"x": 1}, aggregate_id=aggregate)

    async def read() -> tuple[Event, Event, Any]:
        conn = await connect(db.url, autocommit=True)
        async with conn:
            configure_json(conn)
            (fetched,) = (
                await Fetcher(QUERIES, ["Noted"]).fetch(conn, Checkpoint(0, 0), 10)
            ).events
            pickled = pickle.loads(pickle.dumps(fetched))  # still undecoded
            (loaded,) = await EventStore().load(conn, aggregate)
            cur = await conn.execute(
                "SELECT %s::jsonb ->> 'id'", (Jsonb({"id": pickled.event_id}),)
            )
            return fetched, pickled, ((await cur.fetchone())[0], loaded)  # type: ignore[index]

    fetched, pickled, (via_jsonb, loaded) = anyio.run(read)
    stored = db.scalar("SELECT event_id FROM projectord.events")
    assert hash(fetched) == hash(loaded) and hash(pickled) == hash(loaded)
    assert fetched == loaded == pickled == copy.copy(fetched)
    assert type(fetched.event_id) is uuid.UUID and fetched.event_id == stored
    assert via_jsonb == str(stored)
    assert orjson.loads(orjson.dumps({"id": fetched.event_id})) == {"id": str(stored)}
    assert json.loads(json.dumps({"id": fetched.event_id}, default=str)) == {"id": str(stored)}
    assert str(stored) in repr(copy.deepcopy(pickled))


def test_the_upcasting_shortcut_agrees_with_the_registry_as_installed_when_decoded() -> None:
    """Version 1 of a type with no upcaster skips `upcast`. The registry consulted must be the
    one installed when the payload is decoded (not when the event was built), text and dict
    payloads must decode alike, and a version the code does not know is still refused."""
    fetched = Event(1, b"\x00" * 16, TENANT, TENANT, "", 1, "Noted", '{"a": 1}', "{}", 0)
    before = decode_payload("Noted", 1, '{"a": 1}')
    registry = Upcasters()
    registry.add("Noted", 1, lambda p: {**p, "b": 2})
    with installing(registry):
        assert fetched.payload == {"a": 1, "b": 2}
        assert decode_payload("Noted", 1, '{"a": 1}') == decode_payload("Noted", 1, {"a": 1})
        assert decode_payload("Other", 1, '{"a": 1}') == {"a": 1}
        with pytest.raises(SchemaVersionTooNew):
            decode_payload("Noted", 3, '{"a": 1}')
    assert before == {"a": 1} and not installed()
    with pytest.raises(SchemaVersionTooNew):
        decode_payload("Noted", 2, '{"a": 1}')
    assert decode_payload("Noted", 1, "[1, 2]") == [1, 2]  # type: ignore[comparison-overlap]


def reference_fold(events: Sequence[Event]) -> list[dict[str, Any]]:
    """The Balances fold before the change (2ef0b8c)."""
    rows: dict[uuid.UUID, dict[str, Any]] = {}
    for event in events:
        amount = int(event.payload["amount"])
        row = rows.get(event.aggregate_id)
        if row is None:
            row = rows[event.aggregate_id] = {
                "id": event.aggregate_id,
                "tenant_id": event.tenant_id,
                "balance": 0,
                "events": 0,
            }
        row["balance"] += amount if event.type == DEPOSITED else -amount
        row["events"] += 1
    return list(rows.values())


def test_the_balances_fold_matches_the_fold_it_replaced() -> None:
    accounts = [uuid.uuid4() for _ in range(4)]
    tenants = [uuid.uuid4() for _ in range(3)]
    events = [
        Event(
            n,
            uuid.uuid4().bytes,
            tenants[n % 3],  # an account's events under several tenants: the first one wins
            accounts[n * 7 % 4],
            "account",
            n,
            DEPOSITED if n % 5 else "Withdrawn",
            json.dumps({"amount": str(n * 3 - 40)}),
            "{}",
            n,
        )
        for n in range(1, 60)
    ]
    assert fold_balances(events) == reference_fold(events)
    assert fold_balances([]) == []


def test_a_read_ahead_is_not_used_after_an_operator_rebuild(db: TestDatabase) -> None:
    """A rebuild between batches (the read-ahead of the last one is held) must start over from
    the beginning: every event applied once before it and once after, in commit order."""
    db.init("tests.integration.test_catch_up_review:recorders")
    with db.connect(autocommit=True) as conn:
        for n in range(47):
            append_sql(conn, "Credited", {"account": n % 3, "amount": n})

    async def main() -> ProjectionRunner:
        pool = make_pool(db.url, max_size=3, read_model_schema="public")
        await pool.open(wait=True)
        runner = ProjectionRunner(Recorder(), pool, QUERIES, batch_size=5, poll_interval=0.05)
        try:
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(runner.run)
                with anyio.fail_after(60):
                    while runner.status.applied_total < 20:  # noqa: ASYNC110
                        await anyio.sleep(0.005)
                    await runner.rebuild(timeout=30)
                    while db.scalar("SELECT count(*) FROM recorded") < 47:  # noqa: ASYNC110
                        await anyio.sleep(0.02)
                runner.request_stop()
        finally:
            await pool.close()
        return runner

    anyio.run(main)
    applied = db.rows("SELECT global_position FROM recorded ORDER BY seq")
    assert applied == db.rows(
        "SELECT global_position FROM projectord.events ORDER BY transaction_id, global_position"
    )
    assert db.scalar(MATCHING) == 47


def test_an_infinite_recorded_at_is_refused_when_read_never_made_up(db: TestDatabase) -> None:
    """'infinity' and '-infinity' are valid timestamptz values (a legacy import may hold them):
    in binary they are the int64 extremes. The fetch must still return the batch (before the
    change the server's epoch arithmetic failed it), the other events must decode right, and
    reading the infinite ones must raise rather than yield some finite date."""
    with db.connect(autocommit=True) as conn:
        for at in ("2024-01-01 00:00:00+00", "infinity", "-infinity", "1999-01-01 00:00:00+00"):
            insert_event(conn, at, {"at": at})

    async def fetch() -> list[Event]:
        conn = await connect(db.url, autocommit=True)
        async with conn:
            return (await Fetcher(QUERIES, ["Noted"]).fetch(conn, Checkpoint(0, 0), 10)).events

    first, plus, minus, last = anyio.run(fetch)
    assert first.recorded_at == datetime(2024, 1, 1, tzinfo=UTC)
    assert last.recorded_at == datetime(1999, 1, 1, tzinfo=UTC)
    for event in (plus, minus):
        with pytest.raises(OverflowError):
            event.recorded_at  # noqa: B018
        assert event.payload["at"].endswith("infinity")


def test_an_online_rebuild_records_every_event_as_stored(db: TestDatabase) -> None:
    """The online rebuild's shadow runner fetches the same way (read-ahead, lazy fields): its
    tables, swapped in, must hold every event once, in commit order, as stored."""
    from projectord.config import load_settings
    from projectord.schema.online_rebuild import rebuild_online

    db.init("tests.integration.test_catch_up_review:recorders")
    with db.connect(autocommit=True) as conn:
        for at in RECORDED:
            insert_event(conn, at, {"at": at})
        for n in range(41):
            append_sql(conn, "Credited", {"account": n % 3, "amount": n})
    settings = load_settings(None, database_url=db.url, batch_size=5, poll_interval=0.05)
    anyio.run(rebuild_online, db.url, settings, Recorder())
    total = db.scalar("SELECT count(*) FROM projectord.events")
    assert db.rows("SELECT global_position FROM recorded ORDER BY seq") == db.rows(
        "SELECT global_position FROM projectord.events ORDER BY transaction_id, global_position"
    )
    assert db.scalar(MATCHING) == total


def test_catch_up_alongside_writers_holding_transactions_open_applies_in_commit_order(
    db: TestDatabase,
) -> None:
    """Writers that hold their transactions open between two appends commit out of the order
    their ids were taken in, so events keep being held back behind an open transaction while
    the runner reads ahead (batches of 7). Each event must still be applied once, in commit
    order (transaction id, then position), as stored."""
    import random
    import threading

    db.init("tests.integration.test_catch_up_review:recorders")
    KEPT.clear()

    def write(seed: int) -> None:
        rng = random.Random(seed)
        with psycopg.connect(db.url) as conn:
            for n in range(40):
                append_sql(conn, "Credited", {"account": seed, "amount": n})
                threading.Event().wait(rng.uniform(0, 0.01))  # the transaction stays open
                append_sql(conn, "Credited", {"account": seed, "amount": -n})
                conn.commit()

    with db.connect(autocommit=True) as conn:  # a backlog: the catch-up reads ahead
        for n in range(60):
            append_sql(conn, "Credited", {"account": 9, "amount": n})
    writers = [threading.Thread(target=write, args=(n,)) for n in range(4)]
    total = 60 + 4 * 40 * 2

    async def main() -> ProjectionRunner:
        pool = make_pool(db.url, max_size=4, read_model_schema="public")
        await pool.open(wait=True)
        runner = ProjectionRunner(Recorder(), pool, QUERIES, batch_size=7, poll_interval=0.05)
        try:
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(runner.run)
                for writer in writers:
                    writer.start()
                with anyio.fail_after(120):
                    while db.scalar("SELECT count(*) FROM recorded") < total:  # noqa: ASYNC110
                        await anyio.sleep(0.02)
                runner.request_stop()
        finally:
            await pool.close()
            for writer in writers:
                writer.join()
        return runner

    runner = anyio.run(main)
    assert db.rows("SELECT global_position FROM recorded ORDER BY seq") == db.rows(
        "SELECT global_position FROM projectord.events ORDER BY transaction_id, global_position"
    )
    assert db.scalar(MATCHING) == total
    assert runner.status.applied_total == total
    assert runner._read_ahead.used >= 3, "the catch-up never used a batch read ahead"


def test_a_handler_on_the_fetch_connection_gets_datetimes_after_the_fetch_is_prepared(
    db: TestDatabase,
) -> None:
    """The runner fetches and applies on one connection; the fetch's integer loaders (its own
    cursor's) must never reach the handler's cursors, text or binary, also once the fetch has
    run often enough to be a prepared statement."""
    db.init("tests.integration.test_catch_up_review:peekers")
    PEEKED.clear()
    with db.connect(autocommit=True) as conn:
        for n in range(40):
            append_sql(conn, "Credited", {"account": 1, "amount": n})

    async def main() -> None:
        pool = make_pool(db.url, max_size=1, read_model_schema="public")  # one connection
        await pool.open(wait=True)
        runner = ProjectionRunner(Peeker(), pool, QUERIES, batch_size=3, poll_interval=0.05)
        try:
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(runner.run)
                with anyio.fail_after(60):
                    while runner.status.applied_total < 40:  # noqa: ASYNC110
                        await anyio.sleep(0.02)
                runner.request_stop()
        finally:
            await pool.close()

    anyio.run(main)
    assert len(PEEKED) == 2 * 14
    for recorded_at, now, txid in PEEKED:
        assert isinstance(recorded_at, datetime) and isinstance(now, datetime)
        assert isinstance(txid, str)


def set_state(db: TestDatabase, state: str) -> None:
    db.rows(
        "UPDATE projectord.projection_positions SET state = %s, updated_at = now()"
        " WHERE name = 'recorder' RETURNING state",
        (state,),
    )


def test_a_batch_read_ahead_before_a_pause_is_not_applied_after_the_events_were_repaired(
    db: TestDatabase,
) -> None:
    """Found by review (it failed before the runner dropped its read-ahead on a pause: events
    11-15 applied as read before it). An operator pauses a projection (the batch after the one
    just applied has been read
    ahead), repairs events it has not applied yet (the workflow test_fetcher's failed-batch test
    relies on: UPDATE the payload, then resume) and resumes. The runner must apply the events as
    they are stored now, not as a read-ahead held in memory across the pause saw them."""
    db.init("tests.integration.test_catch_up_review:recorders")
    with db.connect(autocommit=True) as conn:
        for n in range(1, 31):
            append_sql(conn, "Credited", {"account": n % 3, "amount": n})
    batches = 0

    def after_batch(name: str, count: int, duration: float) -> None:
        nonlocal batches
        batches += 1
        if batches == 2:  # the next batch is being read ahead now
            set_state(db, "paused")
            runner.nudge()

    async def main() -> ProjectionRunner:
        nonlocal runner
        pool = make_pool(db.url, max_size=3, read_model_schema="public")
        await pool.open(wait=True)
        runner = ProjectionRunner(
            Recorder(), pool, QUERIES, batch_size=5, poll_interval=0.05, on_batch=after_batch
        )
        try:
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(runner.run)
                with anyio.fail_after(60):
                    while runner.status.state != "paused":  # noqa: ASYNC110
                        await anyio.sleep(0.01)
                    db.rows(
                        "UPDATE projectord.events"
                        " SET payload = payload || jsonb_build_object('repaired', true)"
                        " WHERE global_position > 10 RETURNING 1"
                    )
                    set_state(db, "running")
                    runner.nudge()
                    while db.scalar("SELECT count(*) FROM recorded") < 30:  # noqa: ASYNC110
                        await anyio.sleep(0.02)
                runner.request_stop()
        finally:
            await pool.close()
        return runner

    runner: ProjectionRunner = None  # type: ignore[assignment]
    anyio.run(main)
    assert db.rows("SELECT global_position FROM recorded ORDER BY seq") == [
        (n,) for n in range(1, 31)
    ]
    stale = db.rows(
        "SELECT r.global_position FROM recorded r JOIN projectord.events e USING (global_position)"
        " WHERE r.payload <> e.payload ORDER BY 1"
    )
    assert stale == []


def test_a_catch_up_bounded_by_bytes_records_every_event_as_stored(db: TestDatabase) -> None:
    """Events large enough for the byte bound: the fetch by running sum and the read-ahead's
    smaller bound both carry the new column forms (16-byte id, integer instant and xid8)."""
    db.init("tests.integration.test_catch_up_review:recorders")
    with db.connect(autocommit=True) as conn:
        for n in range(60):
            insert_event(conn, RECORDED[n % len(RECORDED)], {"n": n, "pad": "x" * (n % 7) * 900})
    total = 60
    reads: list[bool] = []

    async def main() -> ProjectionRunner:
        pool = make_pool(db.url, max_size=3, read_model_schema="public")
        await pool.open(wait=True)
        runner = ProjectionRunner(
            Recorder(), pool, QUERIES, batch_size=10, poll_interval=0.05, batch_max_bytes=16_000
        )
        by_bytes = runner.fetcher._fetch_by_bytes

        async def counted(*args: Any) -> Any:
            reads.append(args[-1])  # `alone`: False for a read-ahead
            return await by_bytes(*args)

        runner.fetcher._fetch_by_bytes = counted  # type: ignore[method-assign]
        try:
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(runner.run)
                with anyio.fail_after(60):
                    while db.scalar("SELECT count(*) FROM recorded") < total:  # noqa: ASYNC110
                        await anyio.sleep(0.02)
                runner.request_stop()
        finally:
            await pool.close()
        return runner

    anyio.run(main)
    assert db.rows("SELECT global_position FROM recorded ORDER BY seq") == [
        (n,) for n in range(1, total + 1)
    ]
    assert db.scalar(MATCHING) == total
    assert True in reads, "no read by bytes"
    # Whether the runner's own read-ahead read by bytes depends on a spare connection in time
    # (the gate's loaded machine once had none): read as it reads, `alone=False`, directly.
    stored = {
        row[0]: row[1:]
        for row in db.rows(
            "SELECT global_position, event_id, transaction_id::text::bigint, recorded_at"
            " FROM projectord.events"
        )
    }

    async def read_ahead_by_bytes() -> list[Event]:
        conn = await connect(db.url, autocommit=True)
        async with conn:
            fetcher = Fetcher(QUERIES, list(Recorder.event_types))
            batch = await fetcher._fetch_by_bytes(conn, Checkpoint(0, 0), 10, 16_000, False)
            return batch.events

    events = anyio.run(read_ahead_by_bytes)
    assert events, "the read by bytes found nothing"
    for event in events:
        assert (event.event_id, event.transaction_id, event.recorded_at) == stored[
            event.global_position
        ]
