"""`transaction_id` is the store's, never the writer's, and ids from another cluster are refused
(issue 12, §3).

A supplied old id hid the event behind every checkpoint (skipped, lag 0); a future one held the
horizon forever. An event store restored into another cluster (pg_dump) or fed by logical
replication carries ids the new cluster has not reached: `init` and `run` refuse it.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.support.harness import TENANT, TestDatabase, run_cli

LEDGER = "tests.support.projections:ledger_only"  # `run` needs a projection to start at all

FAR_AHEAD = 10**12  # an id this test server will never reach


def insert_with_id(conn: psycopg.Connection[Any], aggregate: uuid.UUID, txid: int) -> None:
    conn.execute(
        "INSERT INTO projectord.events (tenant_id, aggregate_id, version, type, transaction_id)"
        " VALUES (%s, %s, 1, 'Deposited', %s::text::xid8)",
        (TENANT, aggregate, txid),
    )


def copy_with_id(conn: psycopg.Connection[Any], aggregate: uuid.UUID, txid: int) -> None:
    with conn.cursor().copy(
        "COPY projectord.events (tenant_id, aggregate_id, version, type, transaction_id) FROM STDIN"
    ) as copy:
        copy.write_row((TENANT, aggregate, 1, "Deposited", str(txid)))


@pytest.mark.parametrize("write", [insert_with_id, copy_with_id], ids=["insert", "copy"])
@pytest.mark.parametrize("txid", [3, FAR_AHEAD], ids=["old", "future"])
def test_a_supplied_transaction_id_is_overwritten(db: TestDatabase, write: Any, txid: int) -> None:
    aggregate = uuid.uuid4()
    with db.connect() as conn:
        write(conn, aggregate, txid)
        (own,) = conn.execute("SELECT pg_current_xact_id()::text::bigint").fetchone() or (0,)
        conn.commit()
    stored = db.scalar(
        "SELECT transaction_id::text::bigint FROM projectord.events WHERE aggregate_id = %s",
        (aggregate,),
    )
    assert stored == own != txid


def put_ahead(db: TestDatabase, what: str) -> None:
    """Simulate a restore from a cluster with higher ids: as superuser, past the store's trigger
    (an UPDATE, which it does not guard; pg_restore --disable-triggers is another way)."""
    with db.connect(autocommit=True) as conn:
        if what == "events":
            conn.execute(
                "INSERT INTO projectord.events (tenant_id, aggregate_id, version, type)"
                " VALUES (%s, %s, 1, 'Deposited')",
                (TENANT, uuid.uuid4()),
            )
            conn.execute(
                "UPDATE projectord.events SET transaction_id = %s::text::xid8", (FAR_AHEAD,)
            )
        else:
            conn.execute(
                "INSERT INTO projectord.projection_positions (name, transaction_id)"
                " VALUES ('restored', %s::text::xid8)",
                (FAR_AHEAD,),
            )


def env_for(db: TestDatabase, state_dir: Path) -> dict[str, str]:
    return {
        "PROJECTORD_DATABASE_URL": db.url,
        "PROJECTORD_STATE_DIR": str(state_dir),
        "PROJECTORD_LOG_FORMAT": "json",
    }


@pytest.mark.parametrize("what", ["events", "checkpoints"])
def test_init_and_run_refuse_transaction_ids_from_another_cluster(
    db: TestDatabase, state_dir: Path, what: str
) -> None:
    assert run_cli("init", env=env_for(db, state_dir)).returncode == 0
    put_ahead(db, what)

    init = run_cli("init", env=env_for(db, state_dir))
    assert init.returncode == 1, init
    lines = init.stderr.strip().splitlines()
    assert len(lines) == 1, init.stderr
    assert f"{what} up to" in lines[0] and str(FAR_AHEAD) in lines[0]
    assert "ahead of this server's next transaction id" in lines[0]
    assert "docs/ordering.md" in lines[0]

    run = run_cli("run", "--projections", LEDGER, env=env_for(db, state_dir), timeout=60)
    assert run.returncode == 4, run
    refusal = [line for line in run.stderr.splitlines() if "refusing to run" in line]
    assert len(refusal) == 1 and str(FAR_AHEAD) in refusal[0], run.stderr


def test_ids_of_this_cluster_do_not_alarm(db: TestDatabase, state_dir: Path) -> None:
    """The newest event's id and a checkpoint at the current horizon are this server's own."""
    with db.connect(autocommit=True) as conn:
        conn.execute(
            "INSERT INTO projectord.events (tenant_id, aggregate_id, version, type)"
            " VALUES (%s, %s, 1, 'Deposited')",
            (TENANT, uuid.uuid4()),
        )
        conn.execute(
            "INSERT INTO projectord.projection_positions (name, transaction_id)"
            " VALUES ('caught_up', pg_snapshot_xmax(pg_current_snapshot()))"
        )
    init = run_cli("init", env=env_for(db, state_dir))
    assert init.returncode == 0, init.stderr
