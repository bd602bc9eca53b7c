"""A handler that raises: its batch rolls back, it retries and never passes the event; the other
projections carry on."""

from __future__ import annotations

from pathlib import Path

from tests.harness import DaemonProcess, TestDatabase, append_sql, wait_until

SPECS = "tests.projections:with_picky"


def position(db: TestDatabase, name: str) -> tuple[int, int, int]:
    txid, pos, applied = db.rows(
        "SELECT transaction_id::text::bigint, global_position, applied_total"
        " FROM projectord.projection_positions WHERE name = %s", (name,))[0]
    return txid, pos, applied


def test_failing_handler_never_skips_and_others_carry_on(
    db: TestDatabase, state_dir: Path
) -> None:
    db.init(SPECS)
    env = {"PROJECTORD_BATCH_SIZE": "100"}
    with DaemonProcess(db.url, SPECS, state_dir, extra_env=env) as daemon:
        with db.connect() as conn:
            append_sql(conn, "Credited", {"account": 1, "amount": 1})
        wait_until(lambda: db.scalar("SELECT count(*) FROM picky_seen") == 1, timeout=10)
        with db.connect() as conn:
            append_sql(conn, "Credited", {"account": 1, "amount": 2})
            append_sql(conn, "Credited", {"account": 1, "amount": 4, "poison": True})
            append_sql(conn, "Credited", {"account": 1, "amount": 8})
        # The healthy projection applies everything.
        wait_until(lambda: db.scalar("SELECT total FROM ledger WHERE account = 1") == 15,
                   timeout=10)
        # The failing one records the error and stays before the batch holding the poison event.
        wait_until(lambda: db.scalar(
            "SELECT last_error->>'message' FROM projectord.projection_positions"
            " WHERE name = 'picky'") is not None, timeout=10)
        assert db.scalar("SELECT count(*) FROM picky_seen") == 1
        assert position(db, "picky")[2] == 1
        message = db.scalar("SELECT last_error->>'message' FROM projectord.projection_positions"
                            " WHERE name = 'picky'")
        assert "cannot handle event" in message
        assert daemon.has_logged("projection.failed")
        # Repair the data behind the failure: the retry applies the batch, nothing was skipped.
        with db.connect() as conn:
            conn.execute("UPDATE projectord.events SET payload = payload - 'poison'")
        wait_until(lambda: db.scalar("SELECT count(*) FROM picky_seen") == 4, timeout=30)
        wait_until(lambda: daemon.has_logged("projection.recovered"), timeout=10)
    assert position(db, "picky")[2] == 4
