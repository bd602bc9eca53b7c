"""Wake-ups that can be lost: a killed listener, appends without a trigger, and the horizon."""

from __future__ import annotations

import time
from pathlib import Path

from tests.support.harness import (
    TENANT,
    DaemonProcess,
    TestDatabase,
    append_sql,
    run_cli,
    wait_until,
)

LEDGER = "tests.support.projections:ledger_only"


def applied(db: TestDatabase) -> int:
    return db.scalar("SELECT count(*) FROM applied_log")


def credit(db: TestDatabase, account: int = 1) -> None:
    with db.connect() as conn:
        append_sql(conn, "Credited", {"account": account, "amount": 1})


def test_terminated_listener_reconnects_and_catches_up(db: TestDatabase, state_dir: Path) -> None:
    db.init(LEDGER)
    # A long poll: only the listener's reconnect and catch-up can apply these in time.
    env = {"PROJECTORD_POLL_INTERVAL": "600"}
    with DaemonProcess(db.url, LEDGER, state_dir, extra_env=env) as daemon:
        credit(db)
        wait_until(lambda: applied(db) == 1, timeout=10)
        for round_ in range(3):
            killed = db.scalar(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = current_database() AND application_name = 'projectord'"
                # The listener's last statement: LISTEN, an arming's last, a disarming, its probe
                # or its poll (ownership's advisory-lock statements are not among these).
                " AND (query ILIKE 'LISTEN%%'"
                "      OR query ILIKE '%%pg_advisory_lock_shared(hashtext%%'"
                "      OR query ILIKE '%%pg_advisory_unlock_all%%'"
                "      OR query ILIKE '%%pg_advisory_unlock_shared(hashtext%%'"
                "      OR query ILIKE '%%pg_notify%%'"
                "      OR query ILIKE '%%pg_current_snapshot())::text::bigint AS horizon%%')"
            )
            assert killed == 1
            credit(db)  # appended while the listener is away: its NOTIFY is lost
            wait_until(lambda round_=round_: applied(db) == 2 + round_, timeout=10)
            wait_until(
                lambda r=round_: (
                    sum(e["event"] == "listener.reconnected" for e in daemon.log_events()) == r + 1
                ),
                timeout=10,
            )


def test_appends_without_the_trigger_are_applied_by_polling(
    db: TestDatabase, state_dir: Path
) -> None:
    db.init(LEDGER)
    with db.connect() as conn:
        conn.execute("ALTER TABLE projectord.events DISABLE TRIGGER events_appended")
    env = {"PROJECTORD_POLL_INTERVAL": "0.5"}
    with DaemonProcess(db.url, LEDGER, state_dir, extra_env=env):
        for n in range(1, 4):
            credit(db)
            wait_until(lambda n=n: applied(db) == n, timeout=10)


def test_held_back_events_apply_promptly_when_the_old_transaction_ends(
    db: TestDatabase, state_dir: Path
) -> None:
    db.init(LEDGER)
    env = {"PROJECTORD_POLL_INTERVAL": "10"}
    with DaemonProcess(db.url, LEDGER, state_dir, extra_env=env), db.connect() as holder:
        credit(db)
        wait_until(lambda: applied(db) == 1, timeout=10)
        # An older transaction holds an xid and appends nothing: it will end without a NOTIFY.
        holder.execute("SELECT pg_current_xact_id()")
        credit(db)
        # While it is open the new event waits behind the horizon.
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            assert applied(db) == 1, "applied an event above the xmin horizon"
            time.sleep(0.05)
        holder.commit()
        took = wait_until(lambda: applied(db) == 2, timeout=5, interval=0.005)
        assert took < 0.8, f"held-back event applied {took:.3f}s after the horizon moved"


def test_a_63_character_schema_appends_and_wakes_while_the_listener_is_armed(
    db: TestDatabase, state_dir: Path
) -> None:
    """`projectord_` plus a schema of more than 52 bytes exceeds the 63-byte channel limit: the
    trigger's pg_notify raised in every append while the listener was armed (its idle state)."""
    schema = "s" * 63
    env = {"PROJECTORD_SCHEMA": schema, "PROJECTORD_PROJECTIONS": LEDGER}
    assert run_cli("init", "--database-url", db.url, env=env).returncode == 0
    armed = (
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
        " AND mode = 'ShareLock' AND objid = 0"
        " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    )
    daemon_env = {"PROJECTORD_SCHEMA": schema, "PROJECTORD_POLL_INTERVAL": "600"}
    with DaemonProcess(db.url, LEDGER, state_dir, extra_env=daemon_env):
        wait_until(lambda: db.scalar(armed) == 1, timeout=10)
        with db.connect() as conn:
            conn.execute(
                f'INSERT INTO "{schema}".events (tenant_id, aggregate_id, version, type, payload)'
                """ VALUES (%s, gen_random_uuid(), 1, 'Credited', '{"account": 1, "amount": 5}')""",
                (TENANT,),
            )
        # Woken by the notification: the poll is 10 minutes away.
        wait_until(lambda: applied(db) == 1, timeout=10)
    assert db.scalar("SELECT total FROM ledger WHERE account = 1") == 5
