"""Upcasting (issue 16, part 1): a store holding three shapes of `Priced` (v1, v2, v3, written by
plain SQL as a foreign writer would), upcasters v1→v2→v3, and handlers written for v3 only.

Projections (`handle` and `on`), aggregates and dead-letter retries see only v3; the stored rows
stay as written; an upcaster that raises is a poison event (bisected, paused, skipped); an event
newer than the code stops its projection with the reason in status and health while the others
run on; and a store from before migration 0017 upgrades in place while writers append.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import psycopg
import pytest
from psycopg.conninfo import make_conninfo
from psycopg.types.json import Jsonb

from projectord.commands.aggregate import CommandRegistry
from projectord.commands.dispatch import Dispatcher
from projectord.commands.store import Command, CommandStatus
from projectord.database import connect
from projectord.event_store import Event, EventStore
from projectord.schema.migrations import create_projection_tables
from projectord.upcasting import (
    SchemaVersionTooNew,
    Upcasters,
    UpcastingError,
    installing,
    load_upcasters,
)
from tests.support import upcast_projections as up
from tests.support.harness import (
    TENANT,
    DaemonProcess,
    TestDatabase,
    Writers,
    append_sql,
    apply_migrations_up_to,
    as_daemon_role,
    prepare_for_daemon_role,
    run_cli,
    temporary_database,
    wait_until,
)
from tests.support.ops_support import cli, cli_json

UPCASTERS = "tests.support.upcast_projections:upcasters"
SHAPES_AND_TOTALS = "tests.support.upcast_projections:shapes_and_totals"
PRICED_AND_LEDGER = "tests.support.upcast_projections:priced_and_ledger"
SHAPES_ONLY = "tests.support.upcast_projections:shapes_only"
STORED = (
    "SELECT global_position, event_id, schema_version, payload::text, metadata::text,"
    " transaction_id::text FROM projectord.events ORDER BY global_position"
)


def insert_priced(
    conn: psycopg.Connection[Any],
    payload: dict[str, Any],
    schema_version: int | None,
    *,
    aggregate_id: uuid.UUID | None = None,
    version: int = 1,
) -> uuid.UUID:
    """A plain SQL append of a `Priced` event. Without `schema_version` the column is not named,
    as by a writer that predates it: the store's default (1) applies."""
    columns, values = "tenant_id, aggregate_id, version, type, payload", "%s, %s, %s, %s, %s"
    params: list[Any] = [TENANT, aggregate_id or uuid.uuid4(), version, up.PRICED, Jsonb(payload)]
    if schema_version is not None:
        columns, values = columns + ", schema_version", values + ", %s"
        params.append(schema_version)
    row = conn.execute(
        f"INSERT INTO projectord.events ({columns}) VALUES ({values}) RETURNING event_id", params
    ).fetchone()
    assert row is not None
    return row[0]  # type: ignore[no-any-return]


def mixed_history(db: TestDatabase, aggregates: int = 5, per_aggregate: int = 6) -> dict[Any, int]:
    """Each aggregate's events cycle through the three shapes (v1 by a writer that does not name
    the column), one transaction each, aggregates interleaved; returns event id -> cents."""
    ids = [uuid.uuid4() for _ in range(aggregates)]
    cents: dict[Any, int] = {}
    with db.connect(autocommit=True) as conn:
        for version in range(1, per_aggregate + 1):
            for n, aggregate_id in enumerate(ids):
                shape = (version + n) % 3 + 1
                price = 100 * (version * 10 + n + 1)
                event_id = insert_priced(
                    conn,
                    up.shapes(price)[shape],
                    None if shape == 1 else shape,
                    aggregate_id=aggregate_id,
                    version=version,
                )
                cents[event_id] = price
    return cents


def env(**extra: str) -> dict[str, str]:
    return {"PROJECTORD_UPCASTERS": UPCASTERS, **extra}


def state_of(db: TestDatabase, name: str) -> tuple[str, dict[str, Any] | None]:
    row = db.rows(
        "SELECT state, last_error FROM projectord.projection_positions WHERE name = %s", (name,)
    )
    return (row[0][0], row[0][1]) if row else ("", None)


# -- projections -------------------------------------------------------------------------------


def test_projections_see_only_the_current_shape_and_stored_rows_stay_as_written(
    db: TestDatabase, state_dir: Path
) -> None:
    db.init(SHAPES_AND_TOTALS)
    cents = mixed_history(db)
    stored = db.rows(STORED)
    assert {row[2] for row in stored} == {1, 2, 3}  # all three shapes are in the store
    with DaemonProcess(
        db.url, SHAPES_AND_TOTALS, state_dir, extra_env=env(PROJECTORD_BATCH_SIZE="7")
    ):
        wait_until(
            lambda: (
                db.scalar("SELECT count(*) FROM shapes_seen") == len(cents)
                and db.scalar("SELECT coalesce(sum(n), 0) FROM price_totals") == len(cents)
            ),
            timeout=30,
        )
    # `on` saw v3 only, each with its price, and the version the event was stored in.
    seen = {row[0]: (row[1], row[2]) for row in db.rows("SELECT * FROM shapes_seen")}
    stored_versions = {row[1]: row[2] for row in stored}
    assert seen == {eid: (stored_versions[eid], up.v3(price)) for eid, price in cents.items()}
    # `handle` folded v3 cents: the totals are the fold of the prices.
    expected: dict[Any, int] = defaultdict(int)
    for aggregate_id, event_id in db.rows("SELECT aggregate_id, event_id FROM projectord.events"):
        expected[aggregate_id] += cents[event_id]
    assert dict(db.rows("SELECT aggregate_id, cents FROM price_totals")) == expected
    # Nothing was rewritten: same rows, same versions, same payload text.
    assert db.rows(STORED) == stored


# -- aggregates --------------------------------------------------------------------------------


def test_aggregates_apply_only_the_current_shape_and_appends_record_it(db: TestDatabase) -> None:
    till = uuid.uuid4()
    with db.connect(autocommit=True) as conn:  # 300 + 200 + 400 euros, in shapes v1, v2, v3
        for version, (shape, price) in enumerate(((1, 30_000), (2, 20_000), (3, 40_000)), 1):
            payload = up.shapes(price)[shape]
            insert_priced(conn, payload, shape, aggregate_id=till, version=version)
    registry = CommandRegistry([up.Till])

    def charge(cents: int) -> Command:
        return Command(TENANT, "Charge", {"aggregate_id": str(till), "cents": cents})

    async def run() -> tuple[Command, Command, list[Event]]:
        async with await connect(db.url, autocommit=True) as conn:
            dispatcher = Dispatcher(registry)
            over = await dispatcher.dispatch(conn, charge(20_000))  # 90_000 + 20_000 > 100_000
            fits = await dispatcher.dispatch(conn, charge(10_000))
            return over, fits, await EventStore().load(conn, till)

    up.Till.applied.clear()
    with installing(up.upcasters):
        over, fits, events = anyio.run(run)
        payloads = [e.payload for e in events]
    assert over.status is CommandStatus.FAILED
    assert over.error == "over the limit: 90000 + 20000", over.error
    assert fits.status is CommandStatus.CONSUMED, fits.error
    assert up.Till.applied == [up.v3(30_000), up.v3(20_000), up.v3(40_000)] * 2
    # The new event is stored as v3, the old ones as they were; all read as v3.
    assert [e.schema_version for e in events] == [1, 2, 3, 3]
    assert payloads == [up.v3(c) for c in (30_000, 20_000, 40_000, 10_000)]
    stored = db.rows(
        "SELECT schema_version, payload FROM projectord.events WHERE aggregate_id = %s"
        " ORDER BY version",
        (till,),
    )
    assert stored == [
        (1, {"amount": 300}),
        (2, {"amount_cents": 20_000}),
        (3, up.v3(40_000)),
        (3, up.v3(10_000)),
    ]


def test_code_without_the_upcasters_refuses_a_command_instead_of_guessing(
    db: TestDatabase,
) -> None:
    till = uuid.uuid4()
    with db.connect(autocommit=True) as conn:
        insert_priced(conn, up.v3(100), 3, aggregate_id=till)

    async def run() -> Command:
        async with await connect(db.url, autocommit=True) as conn:
            command = Command(TENANT, "Charge", {"aggregate_id": str(till), "cents": 1})
            return await Dispatcher(CommandRegistry([up.Till])).dispatch(conn, command)

    with installing(Upcasters()):  # code that knows only v1 of every type
        outcome = anyio.run(run)
    assert outcome.status is CommandStatus.FAILED
    assert "'Priced' has payload schema version 3" in (outcome.error or "")
    assert db.scalar("SELECT count(*) FROM projectord.events") == 1  # nothing appended


def test_a_payload_is_upcast_once_and_only_when_read() -> None:
    up.calls.clear()
    event = Event(1, uuid.uuid4(), TENANT, uuid.uuid4(), "", 1, up.PRICED, '{"amount": 2}', "{}", 0)
    with installing(up.upcasters):
        assert (event.type, event.schema_version, event.metadata) == (up.PRICED, 1, {})
        assert not up.calls  # nothing read the payload: nothing decoded, nothing upcast
        assert event.payload == up.v3(200)
        assert event.payload is event.payload
        assert dict(up.calls) == {(up.PRICED, 1): 1, (up.PRICED, 2): 1}
        # A mapping payload (a caller's own dict) is copied before an upcaster changes it.
        mine = {"amount_cents": 5}
        built = Event(2, uuid.uuid4(), TENANT, uuid.uuid4(), "", 1, up.PRICED, mine, {}, 0, 0, 2)
        assert built.payload == up.v3(5) and mine == {"amount_cents": 5}


# -- a failing upcaster ------------------------------------------------------------------------


def test_an_upcaster_that_raises_is_bisected_paused_and_skipped_like_a_poison_event(
    db: TestDatabase, state_dir: Path
) -> None:
    db.init(SHAPES_ONLY)
    extra = env(PROJECTORD_MAX_ATTEMPTS="2", PROJECTORD_BATCH_SIZE="100")
    with DaemonProcess(db.url, SHAPES_ONLY, state_dir, extra_env=extra) as daemon:
        with db.connect() as conn:  # one transaction: one batch
            before = insert_priced(conn, {"amount": 1}, None)
            bad = insert_priced(conn, {"amount": 2, "explode": True}, None)
            after = insert_priced(conn, {"amount_cents": 300}, 2)
        wait_until(lambda: state_of(db, "shapes_seen")[0] == "failed", timeout=30)
        # Bisected: the event before the bad one is applied, the bad one and after are not.
        assert [r[0] for r in db.rows("SELECT event_id FROM shapes_seen")] == [before]
        error = state_of(db, "shapes_seen")[1]
        assert error is not None and error["type"] == "UpcastFailed"
        assert error["event_id"] == str(bad)
        assert "euros_to_cents of 'Priced' v1→v2 raised ValueError" in error["message"]
        assert daemon.has_logged("projection.failed")
        # The operator skips it: dead-lettered with the upcaster's error; the rest applies.
        assert cli(state_dir, "skip", "shapes_seen").returncode == 0
        wait_until(lambda: db.scalar("SELECT count(*) FROM shapes_seen") == 2, timeout=30)
    letters = db.rows("SELECT event_id, error_type, resolution FROM projectord.dead_letters")
    assert letters == [(bad, "UpcastFailed", None)]
    assert db.scalar("SELECT payload FROM shapes_seen WHERE event_id = %s", (after,)) == up.v3(300)


def test_dead_letters_of_old_shapes_are_retried_in_the_current_shape(
    db: TestDatabase, state_dir: Path
) -> None:
    """on_error = skip: a handler's poison event and an upcaster's failure are dead-lettered by
    themselves; a retry (once the handler is fixed) hands the handler the v3 shape."""
    db.init(SHAPES_ONLY)
    extra = env(
        PROJECTORD_MAX_ATTEMPTS="1", PROJECTORD_ON_ERROR="skip", UPCAST_TEST_POISON_CENTS="700"
    )
    with DaemonProcess(db.url, SHAPES_ONLY, state_dir, extra_env=extra):
        with db.connect() as conn:
            poisoned = insert_priced(conn, {"amount_cents": 700}, 2)  # the handler sees 700
            exploded = insert_priced(conn, {"amount": 1, "explode": True}, None)
            fine = insert_priced(conn, up.v3(100), 3)
        wait_until(lambda: db.scalar("SELECT count(*) FROM shapes_seen") == 1, timeout=30)
        wait_until(
            lambda: db.scalar("SELECT count(*) FROM projectord.dead_letters") == 2, timeout=30
        )
    assert [r[0] for r in db.rows("SELECT event_id FROM shapes_seen")] == [fine]
    letters = dict(db.rows("SELECT event_id, error_type FROM projectord.dead_letters"))
    assert letters == {poisoned: "RuntimeError", exploded: "UpcastFailed"}
    # The retry runs the handler without the poison price, with the configured upcasters.
    retry_env = {"PROJECTORD_DATABASE_URL": db.url, "PROJECTORD_PROJECTIONS": SHAPES_ONLY, **env()}
    retried = run_cli("dead-letters", "retry", "--json", env=retry_env)
    assert retried.returncode == 1, retried.stdout + retried.stderr  # the exploding one fails
    results = {r.get("event_id") or r["id"]: r for r in json.loads(retried.stdout)["retried"]}
    assert results[str(poisoned)]["ok"]
    assert db.rows(
        "SELECT schema_version, payload FROM shapes_seen WHERE event_id = %s", (poisoned,)
    ) == [(2, up.v3(700))]
    failed = [r for r in results.values() if not r["ok"]]
    assert len(failed) == 1 and "euros_to_cents" in failed[0]["error"]


# -- an event newer than the code --------------------------------------------------------------


def test_an_event_newer_than_the_code_stops_only_the_projections_that_read_it(
    db: TestDatabase, state_dir: Path
) -> None:
    db.init(PRICED_AND_LEDGER)
    # on_error = skip, and many attempts: neither may apply to an event from newer code.
    extra = env(PROJECTORD_ON_ERROR="skip", PROJECTORD_MAX_ATTEMPTS="1000")
    with DaemonProcess(db.url, PRICED_AND_LEDGER, state_dir, extra_env=extra) as daemon:
        with db.connect() as conn:  # one transaction: one batch, bisected
            first = insert_priced(conn, {"amount": 1}, None)
            newer = insert_priced(conn, {"cents": 500, "currency": "EUR", "tax": 0}, 4)
            insert_priced(conn, up.v3(200), 3)
        for name in ("shapes_seen", "price_totals"):
            wait_until(lambda name=name: state_of(db, name)[0] == "failed", timeout=30)
        # The events before it are applied; it and what follows are not; nothing is skipped.
        assert [r[0] for r in db.rows("SELECT event_id FROM shapes_seen")] == [first]
        assert db.scalar("SELECT sum(n) FROM price_totals") == 1
        assert db.scalar("SELECT count(*) FROM projectord.dead_letters") == 0
        # The projection that never reads a payload, and the other types' one, run on.
        wait_until(lambda: db.scalar("SELECT count(*) FROM priced_count") == 3, timeout=30)
        with db.connect() as conn:
            append_sql(conn, "Credited", {"account": 1, "amount": 5})
        wait_until(lambda: db.scalar("SELECT total FROM ledger WHERE account = 1") == 5, timeout=30)
        # The reason, in status and health.
        reason = "'Priced' has payload schema version 4, but this code knows versions 1 to 3"
        status = {p["name"]: p for p in cli_json(state_dir, "status")["projections"]}
        for name in ("shapes_seen", "price_totals"):
            assert status[name]["state"] == "failed"
            error = status[name]["last_error"]
            assert error["type"] == SchemaVersionTooNew.__name__ and reason in error["message"]
            assert error["event_id"] == str(newer)
            assert error["attempts"] == 1  # stopped at once: no retry can teach old code
        assert {status[n]["state"] for n in ("priced_count", "ledger")} == {"running"}
        health = cli_json(state_dir, "health")
        assert health["status"] == "failing"
        failing = [r for r in health["reasons"] if r["code"] == "projection_failing"]
        assert {r["projection"] for r in failing} == {"shapes_seen", "price_totals"}
        assert all(reason in r["message"] for r in failing)
        assert daemon.has_logged("projection.failed")


# -- configuration -----------------------------------------------------------------------------

gap = Upcasters()
gap.add(up.PRICED, 2, up.cents_to_money)  # no step from v1


def test_bad_upcasters_configuration_exits_2_naming_the_key(db: TestDatabase) -> None:
    for spec, says in (
        (
            "tests.support.upcast_projections:nothing",
            "upcasters: 'tests.support.upcast_projections' has no",
        ),
        ("tests.support.upcast_projections:PRICED", "not an Upcasters registry"),
        ("tests.integration.test_upcasting:gap", "none from version 1"),
    ):
        result = run_cli(
            "init", env={"PROJECTORD_DATABASE_URL": db.url, "PROJECTORD_UPCASTERS": spec}
        )
        assert result.returncode == 2, (spec, result.stderr)
        assert says in result.stderr, result.stderr
    flag = run_cli(
        "init", "--upcasters", "nowhere.at.all:x", env={"PROJECTORD_DATABASE_URL": db.url}
    )
    assert flag.returncode == 2 and "upcasters: cannot import 'nowhere.at.all'" in flag.stderr
    with pytest.raises(UpcastingError, match="two upcasters from version 1"):
        load_upcasters([UPCASTERS, "tests.integration.test_upcasting:other_v1"])


other_v1 = Upcasters()
other_v1.add(up.PRICED, 1, lambda payload: payload)


# -- upgrade in place --------------------------------------------------------------------------


@pytest.fixture
def store_before_0017(pg_admin_url: str) -> Iterator[TestDatabase]:
    """A store as `init` of the code before migration 0017 left it, with the projections' tables."""
    with temporary_database(pg_admin_url, "pd_upcast") as name:
        url = make_conninfo(pg_admin_url, dbname=name)
        prepare_for_daemon_role(url)

        async def old_init() -> None:
            async with await connect(as_daemon_role(url), autocommit=True) as conn:
                async with conn.transaction():
                    await apply_migrations_up_to(conn, 16)
                    projections = [*up.priced_and_ledger()]
                    await create_projection_tables(conn, "public", projections)

        anyio.run(old_init)
        yield TestDatabase(url, name)


def test_a_store_from_before_0017_upgrades_in_place_while_writers_append(
    store_before_0017: TestDatabase, state_dir: Path
) -> None:
    db = store_before_0017
    assert (
        db.scalar(
            "SELECT count(*) FROM information_schema.columns WHERE table_schema = 'projectord'"
            " AND table_name = 'events' AND column_name = 'schema_version'"
        )
        == 0
    )
    with db.connect(autocommit=True) as conn:  # the old shape, by writers of the old code
        old = [insert_priced(conn, {"amount": n}, None) for n in range(1, 6)]
    relfilenode = db.scalar("SELECT pg_relation_filenode('projectord.events')")
    tuples = "SELECT ctid::text, xmin::text FROM projectord.events WHERE event_id = ANY(%s)"
    old_tuples = db.rows(tuples, (old,))
    config = {"PROJECTORD_DATABASE_URL": db.url, "PROJECTORD_PROJECTIONS": PRICED_AND_LEDGER}
    credited = "SELECT count(*) FROM projectord.events WHERE type = 'Credited'"
    with Writers(db.url, count=2):
        wait_until(lambda: db.scalar(credited) > 20, timeout=30)
        upgraded = run_cli("init", env={**config, **env()})
        assert upgraded.returncode == 0, upgraded.stderr
        during = db.scalar(credited)
        wait_until(lambda: db.scalar(credited) > during + 20, timeout=30)  # they carry on
    assert 17 in [v for (v,) in db.rows("SELECT version FROM projectord.schema_migrations")]
    # No rewrite (the same file) and no update (the same tuples); every row, old or appended
    # meanwhile, is version 1.
    assert db.scalar("SELECT pg_relation_filenode('projectord.events')") == relfilenode
    assert db.rows(tuples, (old,)) == old_tuples
    assert db.rows("SELECT DISTINCT schema_version FROM projectord.events") == [(1,)]
    assert run_cli("init", env={**config, **env()}).returncode == 0  # again: nothing to do
    total = db.scalar(credited)
    with DaemonProcess(db.url, PRICED_AND_LEDGER, state_dir, extra_env=env()):
        wait_until(
            lambda: (
                db.scalar("SELECT count(*) FROM shapes_seen") == len(old)
                and db.scalar("SELECT coalesce(sum(events), 0) FROM ledger") == total
            ),
            timeout=60,
        )
    assert dict(db.rows("SELECT event_id, payload FROM shapes_seen")) == {
        event_id: up.v3(100 * n) for n, event_id in enumerate(old, 1)
    }


def test_upgrading_behind_a_long_reader_never_stalls_the_writers(
    store_before_0017: TestDatabase,
) -> None:
    """0017's ALTER TABLE needs ACCESS EXCLUSIVE on the events table. Waiting for it behind a
    long reader (a report, pg_dump, a slow batch) queued every append behind the wait, up to
    `init`'s lock timeout (30 s). It now tries for the lock briefly, again and again, so appends
    go on between tries, and takes it once the reader is gone."""
    db = store_before_0017
    config = {"PROJECTORD_DATABASE_URL": db.url, "PROJECTORD_PROJECTIONS": PRICED_AND_LEDGER}
    waiting_for_events = (
        "SELECT count(*) FROM pg_catalog.pg_locks WHERE NOT granted"
        " AND relation = 'projectord.events'::regclass AND mode = 'AccessExclusiveLock'"
    )
    upgraded: list[Any] = []
    with db.connect() as reader:
        reader.execute("SELECT count(*) FROM projectord.events")  # its transaction stays open
        init = threading.Thread(target=lambda: upgraded.append(run_cli("init", env=config)))
        init.start()
        try:
            wait_until(lambda: db.scalar(waiting_for_events) > 0, timeout=30)
            with db.connect(autocommit=True) as writer:
                writer.execute("SET statement_timeout = '5s'")
                started = time.monotonic()
                for price in range(10):
                    insert_priced(writer, {"amount": price}, None)
                took = time.monotonic() - started
            assert took < 5, f"10 appends took {took:.1f}s behind init's lock wait"
            assert not upgraded, "init finished while the reader still held the table"
        finally:
            reader.rollback()
            init.join(timeout=60)
    assert upgraded[0].returncode == 0, upgraded[0].stderr
    assert db.rows("SELECT DISTINCT schema_version FROM projectord.events") == [(1,)]
    assert db.scalar("SELECT count(*) FROM projectord.events") == 10


def test_upgrading_behind_a_reader_that_stays_gives_up_after_the_lock_timeout(
    store_before_0017: TestDatabase,
) -> None:
    """The brief tries end with `init`'s usual one line once its lock timeout has passed."""
    db = store_before_0017
    config = {
        "PROJECTORD_DATABASE_URL": db.url,
        "PROJECTORD_PROJECTIONS": PRICED_AND_LEDGER,
        "PROJECTORD_INIT_LOCK_TIMEOUT": "1",
    }
    with db.connect() as reader:
        reader.execute("SELECT count(*) FROM projectord.events")
        started = time.monotonic()
        refused = run_cli("init", env=config)
        took = time.monotonic() - started
    assert refused.returncode != 0 and took < 20, (refused, took)
    assert "0017_event_schema_version" in refused.stderr, refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert db.scalar("SELECT count(*) FROM projectord.schema_migrations WHERE version = 17") == 0
