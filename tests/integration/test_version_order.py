"""Each aggregate's events reach projections in version order, whoever wrote them (issue 12, §1).

A transaction takes its id at its first write, so one that took it early (a dispatcher that locked
its command row, a writer that lost a race and retried in a savepoint) used to append version n+1
with a lower id than version n, and projections read n+1 first.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
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
from projectord.event_store import EventStore, NewEvent
from projectord.samples import Account
from tests.integration.test_ordering import LEDGER, applied_count, assert_applied_exactly_once
from tests.support.harness import (
    TENANT,
    DaemonProcess,
    TestDatabase,
    Writers,
    credits,
    run_cli,
    wait_until,
)
from tests.support.role_support import TemporaryRoles

LAST = "tests.support.order_projections:last_amount"
INSERT = (
    "INSERT INTO projectord.events (tenant_id, aggregate_id, aggregate_type, version, type,"
    " payload) VALUES (%s, %s, 'account', %s, 'Deposited', %s)"
)
NEXT_VERSION = "SELECT coalesce(max(version), 0) + 1 FROM projectord.events WHERE aggregate_id = %s"


def insert(conn: psycopg.Connection[Any], account: uuid.UUID, version: int, amount: int) -> None:
    conn.execute(INSERT, (TENANT, account, version, Jsonb({"amount": amount})))


def commit_order_versions(db: TestDatabase, account: uuid.UUID) -> list[int]:
    """The aggregate's versions in the order projections read them."""
    rows = db.rows(
        "SELECT version FROM projectord.events WHERE aggregate_id = %s"
        " ORDER BY transaction_id, global_position",
        (account,),
    )
    return [v for (v,) in rows]


def append_taking_id_first(
    conn: psycopg.Connection[Any], account: uuid.UUID, amount: int, rng: random.Random
) -> None:
    """A plain SQL writer as the issue describes it: its transaction takes its id first, then it
    appends the next version, retrying in a savepoint when another writer got that version."""
    conn.execute("SELECT pg_current_xact_id()")
    while True:
        try:
            with conn.transaction():  # a savepoint: the transaction keeps its (older) id
                (version,) = conn.execute(NEXT_VERSION, (account,)).fetchone() or (1,)
                time.sleep(rng.uniform(0, 0.002))  # think time (not a wait for anything)
                insert(conn, account, version, amount)
            return
        except psycopg.errors.UniqueViolation:
            continue


def sql_writer(url: str, accounts: list[uuid.UUID], count: int, seed: int) -> int:
    """`count` appends, each retried in a fresh transaction when the store refuses it (40001),
    as under SERIALIZABLE; returns how many times it was refused."""
    rng = random.Random(seed)
    refused = 0
    with psycopg.connect(url) as conn:
        for _ in range(count):
            account, amount = rng.choice(accounts), rng.randint(1, 10**6)
            while True:
                try:
                    append_taking_id_first(conn, account, amount, rng)
                    conn.commit()
                    break
                except psycopg.errors.SerializationFailure:
                    conn.rollback()
                    refused += 1
    return refused


def contended_writes(db: TestDatabase, accounts: list[uuid.UUID]) -> tuple[list[Command], int]:
    """6 dispatchers and 4 plain SQL writers, all on the same few accounts at once."""
    dispatcher = Dispatcher(CommandRegistry([Account]), max_attempts=1000)
    outcomes: list[Command] = []
    refusals: list[int] = []
    rng = random.Random(12)

    async def dispatching(commands: list[Command]) -> None:
        async with await connect(db.url, autocommit=True) as conn:
            for command in commands:
                outcomes.append(await dispatcher.dispatch(conn, command))

    async def writing(seed: int) -> None:
        refusals.append(await anyio.to_thread.run_sync(sql_writer, db.url, accounts, 15, seed))

    async def main() -> None:
        async with anyio.create_task_group() as tasks:
            for _ in range(6):
                commands = [
                    Command(
                        TENANT,
                        "Deposit",
                        {"account_id": str(rng.choice(accounts)), "amount": rng.randint(1, 10**6)},
                    )
                    for _ in range(15)
                ]
                tasks.start_soon(dispatching, commands)
            for seed in range(4):
                tasks.start_soon(writing, seed)

    anyio.run(main)
    return outcomes, sum(refusals)


def test_contended_writers_keep_every_aggregates_versions_in_order(
    db: TestDatabase, state_dir: Path
) -> None:
    """The issue's scenario against the real daemon: a last-value projection applies each
    aggregate's versions in version order, and ends on the last version's value."""
    db.init(LAST)
    accounts = [uuid.uuid4(), uuid.uuid4()]
    with DaemonProcess(db.url, LAST, state_dir):
        outcomes, refused = contended_writes(db, accounts)
        assert all(o.status is CommandStatus.CONSUMED for o in outcomes), [
            o.error for o in outcomes if o.status is not CommandStatus.CONSUMED
        ]
        total = db.scalar("SELECT count(*) FROM projectord.events")
        assert total == 6 * 15 + 4 * 15
        wait_until(lambda: db.scalar("SELECT count(*) FROM apply_order") == total, timeout=60)

    print(f"plain SQL writers refused for order and retried: {refused} time(s)")
    for account in accounts:
        applied = [
            v
            for (v,) in db.rows(
                "SELECT version FROM apply_order WHERE aggregate_id = %s ORDER BY seq", (account,)
            )
        ]
        assert applied == list(range(1, len(applied) + 1)), "applied out of version order"
        versions = commit_order_versions(db, account)
        assert versions == sorted(versions), "commit order is not version order"
        last = db.rows(
            "SELECT version, (payload->>'amount')::bigint FROM projectord.events"
            " WHERE aggregate_id = %s ORDER BY version DESC LIMIT 1",
            (account,),
        )[0]
        assert db.rows(
            "SELECT version, amount FROM last_amount WHERE aggregate_id = %s", (account,)
        ) == [last]


def test_an_append_older_than_the_latest_version_is_refused_with_40001(db: TestDatabase) -> None:
    """A takes its id, B appends version 2 with a newer one and commits, then A appends version 3:
    refused with 40001 naming the aggregate and the rule. Retried fresh, it is accepted."""
    account = uuid.uuid4()
    with db.connect(autocommit=True) as setup:
        insert(setup, account, 1, 10)
    with db.connect() as a, db.connect() as b:
        a.execute("SELECT pg_current_xact_id()")
        insert(b, account, 2, 20)
        b.commit()
        with pytest.raises(psycopg.errors.SerializationFailure) as refused:
            insert(a, account, 3, 30)
        a.rollback()
        message = refused.value.diag.message_primary or ""
        assert str(account) in message and "version 3" in message
        assert "versions must come from ever newer transactions" in message
        insert(a, account, 3, 30)
        a.commit()
    assert commit_order_versions(db, account) == [1, 2, 3]


def test_versions_of_one_transaction_statement_and_copy_are_accepted(db: TestDatabase) -> None:
    """The edge cases the rule must let through: the first version, several versions in one
    statement or one COPY, and a version whose previous one this transaction wrote earlier."""
    one, two, three = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    with db.connect() as conn:
        insert(conn, one, 1, 1)
        insert(conn, one, 2, 2)  # the previous version, earlier in the same transaction
        conn.execute(
            "INSERT INTO projectord.events (tenant_id, aggregate_id, version, type)"
            " SELECT %s, %s, v, 'Deposited' FROM generate_series(1, 5) v ORDER BY v",
            (TENANT, two),
        )
        with conn.cursor().copy(
            "COPY projectord.events (tenant_id, aggregate_id, version, type) FROM STDIN"
        ) as copy:
            for version in (1, 2, 3):
                copy.write_row((TENANT, three, version, "Deposited"))
        conn.commit()
    assert commit_order_versions(db, one) == [1, 2]
    assert commit_order_versions(db, two) == [1, 2, 3, 4, 5]
    assert commit_order_versions(db, three) == [1, 2, 3]


def test_a_version_below_the_latest_that_does_not_exist_is_refused(db: TestDatabase) -> None:
    """Version 2 before version 1 in one statement, or a gap filled after a later version: no
    retry can put them in order, so they are refused as a constraint (23514); a version that
    exists still gets the unique violation a stale writer expects."""
    account = uuid.uuid4()
    with db.connect(autocommit=True) as conn:
        with pytest.raises(psycopg.errors.CheckViolation, match="below its latest version 2"):
            conn.execute(
                "INSERT INTO projectord.events (tenant_id, aggregate_id, version, type)"
                " VALUES (%s, %s, 2, 'Deposited'), (%s, %s, 1, 'Deposited')",
                (TENANT, account, TENANT, account),
            )
        insert(conn, account, 1, 1)
        insert(conn, account, 3, 3)
        with pytest.raises(psycopg.errors.CheckViolation, match=str(account)):
            insert(conn, account, 2, 2)
        with pytest.raises(psycopg.errors.UniqueViolation):
            insert(conn, account, 1, 1)
    assert commit_order_versions(db, account) == [1, 3]


PAUSE_MARKED_APPENDS = """
CREATE FUNCTION public.pause_marked_append() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.payload ? 'pause' THEN
        PERFORM pg_current_xact_id();  -- the transaction takes its id, then waits for the test
        PERFORM pg_advisory_xact_lock_shared(4242);
    END IF;
    RETURN NEW;
END $$;
-- Named to fire before the store's events_ordered (same timing: alphabetical order).
CREATE TRIGGER events_0_pause BEFORE INSERT ON projectord.events
    FOR EACH ROW EXECUTE FUNCTION public.pause_marked_append();
"""


def test_append_retries_a_refusal_in_a_fresh_transaction(db: TestDatabase) -> None:
    """`EventStore.append` on an idle connection owns its transaction: refused because another
    writer's newer transaction committed the latest version in between (held here at the moment
    the append's transaction has taken its id), it retries in a fresh transaction and succeeds."""
    account = uuid.uuid4()
    with db.connect(autocommit=True) as setup:
        setup.execute(PAUSE_MARKED_APPENDS)
        insert(setup, account, 1, 10)
    appended: list[list[int]] = []

    async def append() -> None:
        async with await connect(db.url, autocommit=True) as conn:
            event = NewEvent(TENANT, account, 3, "Deposited", {"amount": 30, "pause": True})
            appended.append(await EventStore().append(conn, [event]))

    with db.connect(autocommit=True) as holder, db.connect(autocommit=True) as other:
        holder.execute("SELECT pg_advisory_lock(4242)")
        appending = threading.Thread(target=anyio.run, args=(append,))
        appending.start()
        wait_until(
            lambda: (
                db.scalar(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                    " AND wait_event_type = 'Lock' AND wait_event = 'advisory'"
                )
                == 1
            ),
            timeout=10,
        )
        insert(other, account, 2, 20)  # a newer transaction, committed first
        holder.execute("SELECT pg_advisory_unlock(4242)")
        appending.join(timeout=30)
    assert len(appended) == 1, "the append was not retried"
    assert commit_order_versions(db, account) == [1, 2, 3]


def downgrade_to_before_0010(db: TestDatabase) -> None:
    """The schema an earlier main made: 0010 only added the trigger and its function."""
    with db.connect(autocommit=True) as conn:
        conn.execute("DROP TRIGGER events_ordered ON projectord.events")
        conn.execute("DROP FUNCTION projectord.order_appended_event()")
        conn.execute("DELETE FROM projectord.schema_migrations WHERE version = 10")


def test_upgrade_in_place_while_writing_carries_on_from_old_checkpoints(
    db: TestDatabase, state_dir: Path
) -> None:
    """A store from before 0010, with a checkpoint its daemon left: `init` upgrades it while
    writers append, and the new daemon applies every event exactly once from that checkpoint."""
    db.init(LEDGER)
    credits(db, 50)
    with DaemonProcess(db.url, LEDGER, state_dir):
        wait_until(lambda: applied_count(db) == 50, timeout=30)
    downgrade_to_before_0010(db)
    env = {"PROJECTORD_DATABASE_URL": db.url, "PROJECTORD_STATE_DIR": str(state_dir)}
    with Writers(db.url):
        wait_until(lambda: db.scalar("SELECT count(*) FROM projectord.events") > 100, timeout=30)
        upgraded = run_cli("init", env=env)
        wait_until(lambda: db.scalar("SELECT count(*) FROM projectord.events") > 200, timeout=30)
    assert upgraded.returncode == 0 and "0010_append_order" in upgraded.stdout, upgraded
    total = db.scalar("SELECT count(*) FROM projectord.events")
    with DaemonProcess(db.url, LEDGER, state_dir):
        wait_until(lambda: applied_count(db) == total, timeout=60)
    assert_applied_exactly_once(db)


def test_the_order_check_never_scans_the_table(db: TestDatabase) -> None:
    """A session plans the trigger's lookup once: planned while the table was tiny (here: fresh
    statistics of 3 rows, autovacuum off) it must still be the index probe, or every later row of
    a bulk INSERT or COPY would read the whole table."""
    with db.connect(autocommit=True) as conn:
        conn.execute("ALTER TABLE projectord.events SET (autovacuum_enabled = false)")
        for version in (1, 2, 3):
            insert(conn, uuid.uuid4(), version, 1)
        conn.execute("ANALYZE projectord.events")
        before = seq_scans(conn)
        for _ in range(3):  # one session: its plan of the lookup is kept
            conn.execute(
                "INSERT INTO projectord.events (tenant_id, aggregate_id, version, type)"
                " SELECT %s, gen_random_uuid(), 1, 'Deposited' FROM generate_series(1, 2000)",
                (TENANT,),
            )
        assert seq_scans(conn) == before


def seq_scans(conn: psycopg.Connection[Any]) -> int:
    conn.execute("SELECT pg_stat_force_next_flush()")
    conn.execute("SELECT pg_stat_clear_snapshot()")
    row = conn.execute(
        "SELECT seq_scan FROM pg_stat_user_tables WHERE relid = 'projectord.events'::regclass"
    ).fetchone()
    assert row is not None
    return int(row[0])


# A writer's own schema, put first on its search_path, with a stand-in for every function,
# operator and type the order check uses: each one raises, so if the check (which runs with its
# owner's rights) resolved any of its names through the writer's search_path, the append would fail
# with "hostile code ran".
HOSTILE_SCHEMA = """
CREATE FUNCTION hostile.trap() RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'hostile code ran as %', current_user;
END $$;
CREATE FUNCTION hostile.pg_current_xact_id() RETURNS pg_catalog.xid8 LANGUAGE plpgsql AS $$
BEGIN
    PERFORM hostile.trap();
    RETURN '1';
END $$;
CREATE FUNCTION hostile.uuid_eq(uuid, uuid) RETURNS boolean LANGUAGE sql
    AS 'SELECT hostile.trap()';
CREATE OPERATOR hostile.= (LEFTARG = uuid, RIGHTARG = uuid, FUNCTION = hostile.uuid_eq);
CREATE FUNCTION hostile.int4_eq(integer, integer) RETURNS boolean LANGUAGE sql
    AS 'SELECT hostile.trap()';
CREATE OPERATOR hostile.= (LEFTARG = integer, RIGHTARG = integer, FUNCTION = hostile.int4_eq);
CREATE FUNCTION hostile.int4_lt(integer, integer) RETURNS boolean LANGUAGE sql
    AS 'SELECT hostile.trap()';
CREATE OPERATOR hostile.< (LEFTARG = integer, RIGHTARG = integer, FUNCTION = hostile.int4_lt);
CREATE FUNCTION hostile.xid8_gt(pg_catalog.xid8, pg_catalog.xid8) RETURNS boolean LANGUAGE sql
    AS 'SELECT hostile.trap()';
CREATE OPERATOR hostile.> (
    LEFTARG = pg_catalog.xid8, RIGHTARG = pg_catalog.xid8, FUNCTION = hostile.xid8_gt
);
CREATE FUNCTION hostile.format(text, uuid, integer, pg_catalog.xid8, pg_catalog.xid8, integer)
    RETURNS text LANGUAGE sql AS 'SELECT hostile.trap()::text';
CREATE FUNCTION hostile.format(text, uuid, integer, integer)
    RETURNS text LANGUAGE sql AS 'SELECT hostile.trap()::text';
CREATE DOMAIN hostile.xid8 AS pg_catalog.xid8 CHECK (hostile.trap());
"""
# What the trigger evaluates, unqualified: each must reach the writer's stand-in.
ARMED = [
    "SELECT pg_current_xact_id()",
    "SELECT gen_random_uuid() = gen_random_uuid()",
    "SELECT 1 = 1",
    "SELECT 1 < 2",
    "SELECT pg_catalog.pg_current_xact_id() > pg_catalog.pg_current_xact_id()",
    "SELECT format('%s', gen_random_uuid(), 1, pg_catalog.pg_current_xact_id(),"
    " pg_catalog.pg_current_xact_id(), 1)",
    "SELECT format('%s', gen_random_uuid(), 1, 1)",
    "SELECT '1'::xid8",
]
HOSTILE_PATH = "hostile, pg_catalog"


def hostile_writer(db: TestDatabase, roles: TemporaryRoles) -> str:
    """A writer as docs/security-roles.md sets one up (USAGE on the schema, INSERT on events and
    nothing else), with a schema of its own holding the stand-ins; its connection URL."""
    writer = roles.create("writer", "LOGIN")
    with db.connect(autocommit=True) as conn:
        conn.execute(f'GRANT USAGE ON SCHEMA projectord TO "{writer}"')
        conn.execute(f'GRANT INSERT ON projectord.events TO "{writer}"')
        conn.execute(f'CREATE SCHEMA hostile AUTHORIZATION "{writer}"')
    url = make_conninfo(db.url, user=writer)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(HOSTILE_SCHEMA)
        conn.execute(f"SET search_path = {HOSTILE_PATH}")
        for query in ARMED:  # the stand-ins do shadow pg_catalog's objects in this session
            with pytest.raises(psycopg.errors.RaiseException, match="hostile code ran"):
                conn.execute(query)
    return url


def appends_as_a_hostile_writer(db: TestDatabase, conn: psycopg.Connection[Any]) -> None:
    """Every path of the check, as the writer: accepted versions (one statement, a COPY), a
    refusal for order (40001) and one for a version below the latest (23514)."""
    account = uuid.uuid4()
    conn.execute(
        "INSERT INTO projectord.events (tenant_id, aggregate_id, version, type, transaction_id)"
        " VALUES (%s, %s, 1, 'Deposited', '1'), (%s, %s, 2, 'Deposited', '1')",
        (TENANT, account, TENANT, account),
    )
    with conn.cursor().copy(
        "COPY projectord.events (tenant_id, aggregate_id, version, type) FROM STDIN"
    ) as copy:
        copy.write_row((TENANT, account, 3, "Deposited"))
    (own,) = conn.execute("SELECT pg_catalog.pg_current_xact_id()").fetchone() or (None,)
    conn.commit()
    assert db.rows(
        "SELECT version, transaction_id FROM projectord.events WHERE aggregate_id = %s"
        " ORDER BY version",
        (account,),
    ) == [(1, own), (2, own), (3, own)]

    conn.execute("SELECT pg_catalog.pg_current_xact_id()")  # the writer's id, taken first
    with db.connect(autocommit=True) as other:
        insert(other, account, 4, 4)  # a newer transaction
    with pytest.raises(psycopg.errors.SerializationFailure) as refused:
        conn.execute(
            "INSERT INTO projectord.events (tenant_id, aggregate_id, version, type)"
            " VALUES (%s, %s, 5, 'Deposited')",
            (TENANT, account),
        )
    conn.rollback()
    message = refused.value.diag.message_primary or ""
    assert f"aggregate {account}: version 5 cannot be appended by transaction" in message
    assert "that appended version 4: an aggregate's versions must come from ever" in message

    gap = uuid.uuid4()
    with pytest.raises(psycopg.errors.CheckViolation) as below:
        conn.execute(
            "INSERT INTO projectord.events (tenant_id, aggregate_id, version, type)"
            " VALUES (%s, %s, 2, 'Deposited'), (%s, %s, 1, 'Deposited')",
            (TENANT, gap, TENANT, gap),
        )
    conn.rollback()
    assert below.value.diag.message_primary == (
        f"aggregate {gap}: version 1 is below its latest version 2 and cannot be ordered after it"
    )


def test_a_writers_search_path_cannot_run_its_code_in_the_order_check(
    db: TestDatabase, roles: TemporaryRoles
) -> None:
    """The check runs with its owner's rights and pins no search_path (0020): every name in it
    is schema-qualified, so a writer's own functions, operators and types placed first on its
    search_path are never called, whether the session compiled the check before or after setting
    that path."""
    url = hostile_writer(db, roles)
    with psycopg.connect(url) as conn:
        insert(conn, uuid.uuid4(), 1, 1)  # compiled and planned under the default search_path
        conn.commit()
        conn.execute(f"SET search_path = {HOSTILE_PATH}")
        conn.commit()
        appends_as_a_hostile_writer(db, conn)
    with psycopg.connect(url, options=f"-c search_path={HOSTILE_PATH.replace(' ', '')}") as conn:
        appends_as_a_hostile_writer(db, conn)  # compiled under the writer's path


def test_the_order_check_runs_as_its_owner_with_one_setting(db: TestDatabase) -> None:
    """SECURITY DEFINER (a writer may only INSERT, the check reads the table), and no setting
    but enable_seqscan (the plan guard above): a pinned search_path would be set and reset for
    every appended row again, 12-16 % of the check's instructions on PostgreSQL 15."""
    assert db.rows(
        "SELECT prosecdef, proconfig FROM pg_catalog.pg_proc"
        " WHERE oid = 'projectord.order_appended_event'::regproc"
    ) == [(True, ["enable_seqscan=off"])]
