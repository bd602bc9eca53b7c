"""Upgrading a store the last landed main made (migrations 0001-0009) to this code.

The old store is reproduced from the migration files themselves (they are never edited), applied
with the `schema_migrations` bookkeeping `projectord/schema/migrations.py` does, and what the old
daemon left
is written directly: events, the Ledger's read model and `applied_log` for the events up to a
checkpoint in the middle, and that checkpoint in the positions row. Then `projectord init` (the
CLI) runs while plain-SQL writers append, and the new daemon carries on from the old checkpoint:
every event applied exactly once, none before the checkpoint applied again, and `drift check`
clean after the upgrade's init.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from psycopg.conninfo import make_conninfo

from projectord.database import connect
from projectord.schema.migrations import create_projection_tables, migrations
from tests.integration.test_ordering import assert_applied_exactly_once
from tests.support.harness import (
    DaemonProcess,
    TestDatabase,
    Writers,
    apply_migrations_up_to,
    as_daemon_role,
    bulk_credits,
    prepare_for_daemon_role,
    run_cli,
    temporary_database,
    wait_until,
)
from tests.support.projections import Ledger

LEDGER = "tests.support.projections:ledger_only"
OLD_MAIN = 9  # the last migration the last landed main had
OLD_DAEMON = "old-daemon"  # the instance the old daemon's applied_log rows name


@pytest.fixture
def empty_db(pg_admin_url: str) -> Iterator[TestDatabase]:
    """A database with nothing of projectord's in it (not cloned from the migrated template)."""
    with temporary_database(pg_admin_url, "pd_upgrade") as name:
        url = make_conninfo(pg_admin_url, dbname=name)
        prepare_for_daemon_role(url)
        yield TestDatabase(url, name)


def old_store(url: str) -> None:
    """Migrations 0001-0009 as `projectord init` applied them, and the Ledger's tables as the old
    init created them, as the daemon's role."""

    async def run() -> None:
        conn = await connect(as_daemon_role(url), autocommit=True)
        async with conn, conn.transaction():
            await apply_migrations_up_to(conn, OLD_MAIN)
            await create_projection_tables(conn, "public", [Ledger()])

    anyio.run(run)


def old_daemon_stopped_at(db: TestDatabase, applied: int) -> tuple[int, int]:
    """What the old daemon left after applying the first `applied` Credited events in commit
    order: their ledger totals and applied_log rows, and its checkpoint at the last of them."""
    with db.connect() as conn:
        row = conn.execute(
            "SELECT transaction_id::text::bigint, global_position FROM projectord.events"
            " WHERE type = 'Credited' ORDER BY transaction_id, global_position"
            " OFFSET %s LIMIT 1",
            (applied - 1,),
        ).fetchone()
        assert row is not None
        checkpoint = (int(row[0]), int(row[1]))
        before = (
            " FROM projectord.events WHERE type = 'Credited'"
            " AND (transaction_id, global_position) <= (%s::text::xid8, %s)"
        )
        conn.execute(
            "INSERT INTO ledger (account, total, events)"
            " SELECT (payload->>'account')::bigint, sum((payload->>'amount')::bigint), count(*)"
            + before
            + " GROUP BY 1",
            checkpoint,
        )
        conn.execute(
            "INSERT INTO applied_log (projection, event_id, global_position, instance)"
            f" SELECT 'ledger', event_id, global_position, '{OLD_DAEMON}'" + before,
            checkpoint,
        )
        conn.execute(
            "INSERT INTO projectord.projection_positions"
            " (name, transaction_id, global_position, state, applied_total)"
            " VALUES ('ledger', %s::text::xid8, %s, 'running', %s)",
            (*checkpoint, applied),
        )
    return checkpoint


def test_a_store_of_the_last_main_upgrades_and_carries_on_from_its_checkpoint(
    empty_db: TestDatabase, state_dir: Path
) -> None:
    db = empty_db
    old_store(db.url)
    with db.connect(autocommit=True) as conn:
        for _ in range(4):  # four transactions: the checkpoint falls inside the history
            bulk_credits(conn, 500, accounts=7)
    checkpoint = old_daemon_stopped_at(db, 1_000)
    env = {"PROJECTORD_DATABASE_URL": db.url, "PROJECTORD_PROJECTIONS": LEDGER}
    with Writers(db.url, count=2):
        wait_until(lambda: credited(db) > 2_010, timeout=30)  # they are appending
        upgraded = run_cli("init", env=env)
        assert upgraded.returncode == 0, upgraded.stderr
        written_during_init = credited(db)
        wait_until(lambda: credited(db) > written_during_init + 20, timeout=30)
    versions = [v for (v,) in db.rows("SELECT version FROM projectord.schema_migrations")]
    assert versions == [m.version for m in migrations()]
    # The old checkpoint is version 1, serving (migration 0019), and nothing is being built.
    assert db.rows("SELECT name, version FROM projectord.projection_positions") == [("ledger", 1)]
    assert db.scalar("SELECT count(*) FROM projectord.projection_versions") == 0
    drift = run_cli("drift", "check", env=env)
    assert drift.returncode == 0, drift.stdout + drift.stderr
    total = credited(db)
    with DaemonProcess(db.url, LEDGER, state_dir):
        wait_until(lambda: db.scalar("SELECT count(*) FROM applied_log") >= total, timeout=60)
    assert_applied_exactly_once(db)
    new_positions = db.rows(
        "SELECT e.transaction_id::text::bigint, e.global_position FROM applied_log a"
        " JOIN projectord.events e USING (event_id) WHERE a.instance <> %s",
        (OLD_DAEMON,),
    )
    assert min(new_positions) > checkpoint, "the new daemon re-applied from before the checkpoint"
    assert db.scalar("SELECT count(*) FROM applied_log WHERE instance = %s", (OLD_DAEMON,)) == 1_000


def credited(db: TestDatabase) -> int:
    return int(db.scalar("SELECT count(*) FROM projectord.events WHERE type = 'Credited'"))
