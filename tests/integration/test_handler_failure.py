"""A handler that raises: it is retried, then its batch is bisected so the events before the
poison event are applied, and the projection stops on the poison event (on_error = "pause", the
default). Nothing is ever skipped without an operator; the other projections carry on."""

from __future__ import annotations

from pathlib import Path

from tests.support.harness import DaemonProcess, TestDatabase, append_sql, wait_until
from tests.support.ops_support import cli

SPECS = "tests.support.projections:with_picky"


def position(db: TestDatabase, name: str) -> tuple[int, int, int]:
    txid, pos, applied = db.rows(
        "SELECT transaction_id::text::bigint, global_position, applied_total"
        " FROM projectord.projection_positions WHERE name = %s",
        (name,),
    )[0]
    return txid, pos, applied


def picky_state(db: TestDatabase) -> str:
    return db.scalar("SELECT state FROM projectord.projection_positions WHERE name = 'picky'")


def test_failing_handler_never_skips_and_others_carry_on(db: TestDatabase, state_dir: Path) -> None:
    db.init(SPECS)
    env = {"PROJECTORD_BATCH_SIZE": "100", "PROJECTORD_MAX_ATTEMPTS": "3"}
    with DaemonProcess(db.url, SPECS, state_dir, extra_env=env) as daemon:
        with db.connect() as conn:
            append_sql(conn, "Credited", {"account": 1, "amount": 1})
        wait_until(lambda: db.scalar("SELECT count(*) FROM picky_seen") == 1, timeout=10)
        with db.connect() as conn:  # one transaction: one batch for picky
            append_sql(conn, "Credited", {"account": 1, "amount": 2})
            append_sql(conn, "Credited", {"account": 1, "amount": 4, "poison": True})
            append_sql(conn, "Credited", {"account": 1, "amount": 8})
        # The healthy projection applies everything.
        wait_until(
            lambda: db.scalar("SELECT total FROM ledger WHERE account = 1") == 15, timeout=10
        )
        # The failing one applies the event before the poison one, then stops on it.
        wait_until(lambda: picky_state(db) == "failed", timeout=20)
        assert db.scalar("SELECT count(*) FROM picky_seen") == 2
        poison_position = db.scalar(
            "SELECT global_position FROM projectord.events WHERE payload ? 'poison'"
        )
        assert position(db, "picky")[1:] == (poison_position - 1, 2)
        error = db.scalar(
            "SELECT last_error FROM projectord.projection_positions WHERE name = 'picky'"
        )
        assert "cannot handle event" in error["message"]
        assert error["global_position"] == poison_position and error["attempts"] == 3
        assert daemon.has_logged("projection.handler_failed")
        assert daemon.has_logged("projection.failed")
        # It stays there: a later event is not applied either, and nothing was dead-lettered.
        with db.connect() as conn:
            append_sql(conn, "Credited", {"account": 1, "amount": 16})
        wait_until(
            lambda: db.scalar("SELECT total FROM ledger WHERE account = 1") == 31, timeout=10
        )
        assert db.scalar("SELECT count(*) FROM picky_seen") == 2 and picky_state(db) == "failed"
        assert db.scalar("SELECT count(*) FROM projectord.dead_letters") == 0
        # Repair the data behind the failure and resume: it applies the rest, nothing skipped.
        with db.connect() as conn:
            conn.execute("UPDATE projectord.events SET payload = payload - 'poison'")
        assert cli(state_dir, "resume", "picky").returncode == 0
        wait_until(lambda: db.scalar("SELECT count(*) FROM picky_seen") == 5, timeout=30)
    assert position(db, "picky")[2] == 5
    assert picky_state(db) == "running"
