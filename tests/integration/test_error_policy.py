"""The error policy against a real daemon: a poison event is isolated, the projection stops on it
and an operator skips it into the dead letters and retries it after a fix; a transient database
error is retried without counting as a failure; a handler that runs too long is cancelled and,
with `on_error = "skip"`, dead-lettered without an operator."""

from __future__ import annotations

import json
import secrets
import uuid
from pathlib import Path
from typing import Any

from tests.support.harness import DaemonProcess, TestDatabase, append_sql, run_cli, wait_until
from tests.support.ops_support import cli, cli_json, projection

PICKY = "tests.support.projections:with_picky"


def dead_letters(db: TestDatabase, specs: str, *args: str) -> Any:
    """`projectord dead-letters ARGS` against the test database (no daemon needed)."""
    env = {"PROJECTORD_DATABASE_URL": db.url, "PROJECTORD_PROJECTIONS": specs}
    return run_cli("dead-letters", *args, env=env)


def letters(db: TestDatabase) -> list[dict[str, Any]]:
    listed = dead_letters(db, PICKY, "list", "--all", "--json")
    assert listed.returncode == 0, listed.stderr
    return json.loads(listed.stdout)["dead_letters"]


def picky_seen(db: TestDatabase) -> set[str]:
    return {str(e) for (e,) in db.rows("SELECT event_id FROM picky_seen")}


def test_poison_is_isolated_skipped_and_retried_after_a_fix(
    db: TestDatabase, state_dir: Path
) -> None:
    db.init(PICKY)
    env = {"PROJECTORD_BATCH_SIZE": "100", "PROJECTORD_MAX_ATTEMPTS": "2"}
    with DaemonProcess(db.url, PICKY, state_dir, extra_env=env) as daemon:
        with db.connect() as conn:  # one transaction: one batch holding both poison events
            for n, poison in enumerate([0, 0, 0, 1, 0, 0, 0, 2, 0]):
                payload = {"account": 1, "amount": 1 + n} | ({"poison": poison} if poison else {})
                append_sql(conn, "Credited", payload)
        first, second = [
            (str(e), p)
            for e, p in db.rows(
                "SELECT event_id, global_position FROM projectord.events"
                " WHERE payload ? 'poison' ORDER BY global_position"
            )
        ]
        # The other projection applies everything.
        wait_until(lambda: db.scalar("SELECT total FROM ledger") == sum(range(1, 10)), 10)

        # Picky applies the three events before the first poison event and stops on it.
        wait_until(lambda: projection(state_dir, "picky")["state"] == "failed", timeout=20)
        stuck = projection(state_dir, "picky")
        error = stuck["last_error"]
        assert (error["event_id"], error["global_position"]) == first
        assert error["event_type"] == "Credited" and error["attempts"] == 2
        assert "cannot handle event" in error["message"] and "ValueError" in error["traceback"]
        assert len(picky_seen(db)) == 3 and stuck["lag"] == 6
        health = cli(state_dir, "health")
        assert health.returncode == 2 and health.stdout.startswith("failing")
        assert first[0] in health.stdout
        failed = [e for e in daemon.log_events() if e["event"] == "projection.failed"]
        assert [e["event_id"] for e in failed] == [first[0]]

        # skip: the first poison event goes to the dead letters; picky stops on the second.
        skipped = cli(state_dir, "skip", "picky")
        assert skipped.returncode == 0, skipped.stderr

        def stuck_on_second() -> bool:  # one status read: last_error changes between reads
            picky = projection(state_dir, "picky")
            error = picky["last_error"] or {}
            return picky["state"] == "failed" and error.get("event_id") == second[0]

        wait_until(stuck_on_second, timeout=20)
        assert len(picky_seen(db)) == 6
        assert cli(state_dir, "skip", "picky").returncode == 0
        wait_until(lambda: len(picky_seen(db)) == 7, timeout=10)
        wait_until(lambda: projection(state_dir, "picky")["state"] == "running", timeout=10)
        assert cli_json(state_dir, "health")["status"] == "ok"

        # The dead letters hold both events, with the error.
        held = letters(db)
        assert [(d["event_id"], d["global_position"]) for d in held] == [first, second]
        for letter in held:
            assert letter["projection"] == "picky" and letter["event_type"] == "Credited"
            assert "cannot handle event" in letter["error_message"]
            assert "ValueError" in letter["traceback"] and letter["attempts"] == 2
            assert letter["resolution"] is None
        text = dead_letters(db, PICKY, "list")
        assert text.returncode == 0 and first[0] in text.stdout and "picky" in text.stdout
        ids = [str(d["id"]) for d in held]

        # retry before a fix fails again and keeps the dead letter; after the fix it re-applies.
        again = dead_letters(db, PICKY, "retry", ids[0])
        assert again.returncode == 1 and "failed again" in again.stderr
        assert letters(db)[0]["attempts"] == 3 and letters(db)[0]["resolution"] is None
        with db.connect() as conn:
            conn.execute(
                "UPDATE projectord.events SET payload = payload - 'poison' WHERE event_id = %s",
                (first[0],),
            )
        retried = dead_letters(db, PICKY, "retry", ids[0])
        assert retried.returncode == 0, retried.stderr
        assert first[0] in retried.stdout
        assert first[0] in picky_seen(db) and len(picky_seen(db)) == 8
        assert letters(db)[0]["resolution"] == "retried"
        assert dead_letters(db, PICKY, "retry", ids[0]).returncode == 1  # done already

        # A rebuild meets every event again: it resolves the pending dead letter, so a retry
        # cannot apply that event a second time.
        with db.connect() as conn:
            conn.execute("UPDATE projectord.events SET payload = payload - 'poison'")
        rebuilt = cli(state_dir, "rebuild", "picky", "--wait", "--timeout", "30")
        assert rebuilt.returncode == 0, rebuilt.stderr
        assert letters(db)[1]["resolution"] == "rebuilt"
        refused = dead_letters(db, PICKY, "retry")
        assert refused.returncode == 0 and "nothing to retry" in refused.stdout
        assert len(picky_seen(db)) == 9
        assert db.scalar("SELECT count(*) FROM applied_log") == 9  # ledger: each event once


def test_a_dead_letter_the_projection_has_not_passed_is_not_retried(db: TestDatabase) -> None:
    db.init(PICKY)
    with db.connect() as conn:
        append_sql(conn, "Credited", {"account": 1, "amount": 1})
    event_id, position, txid = db.rows(
        "SELECT event_id, global_position, transaction_id::text FROM projectord.events"
    )[0]
    letter = db.scalar(
        "INSERT INTO projectord.dead_letters"
        " (projection, event_id, global_position, transaction_id, event_type, error_message)"
        " VALUES ('picky', %s, %s, %s::xid8, 'Credited', 'boom') RETURNING id",
        (event_id, position, txid),
    )
    refused = dead_letters(db, PICKY, "retry", str(letter))
    assert refused.returncode == 1 and "has not passed" in refused.stderr
    assert picky_seen(db) == set()
    missing = dead_letters(db, PICKY, "retry", "424242")
    assert missing.returncode == 1 and "no such dead letter" in missing.stderr
    unknown = dead_letters(db, PICKY, "retry", "--projection", "nope'; DROP TABLE x; --")
    assert unknown.returncode == 2 and "no projection named" in unknown.stderr
    with db.connect() as conn:  # the projection has passed it now
        conn.execute(
            "UPDATE projectord.projection_positions SET transaction_id = %s::xid8,"
            " global_position = %s WHERE name = 'picky'",
            (txid, position),
        )
    retried = dead_letters(db, PICKY, "retry", "--json")
    assert retried.returncode == 0, retried.stderr
    assert json.loads(retried.stdout)["retried"][0]["event_id"] == str(event_id)
    assert picky_seen(db) == {str(event_id)}


def test_transient_error_is_retried_without_counting_as_a_failure(
    db: TestDatabase, state_dir: Path
) -> None:
    specs = "tests.support.fault_projections:flaky"
    db.init(specs)
    # One handler failure would be enough to isolate the event: a transient one must not count.
    env = {"PROJECTORD_MAX_ATTEMPTS": "1"}
    with DaemonProcess(db.url, specs, state_dir, extra_env=env) as daemon:
        with db.connect() as conn:
            append_sql(conn, "Noted", {"flaky": True})
            append_sql(conn, "Noted", {})
        wait_until(lambda: db.scalar("SELECT count(*) FROM flaky_seen") == 2, timeout=15)
        wait_until(lambda: daemon.has_logged("projection.recovered"), timeout=10)
        names = [e["event"] for e in daemon.log_events()]
        assert names.count("projection.database_unavailable") == 1
        unavailable = next(
            e for e in daemon.log_events() if e["event"] == "projection.database_unavailable"
        )
        assert unavailable["error_type"] == "SerializationFailure"
        for counted in ("projection.handler_failed", "projection.isolating", "projection.failed"):
            assert counted not in names
        status = projection(state_dir, "flaky")
        assert status["state"] == "running" and status["last_error"] is None
    assert db.scalar("SELECT count(*) FROM applied_log") == 2
    assert db.scalar("SELECT count(DISTINCT event_id) FROM applied_log") == 2
    assert db.rows(
        "SELECT state, last_error FROM projectord.projection_positions WHERE name = 'flaky'"
    ) == [("running", None)]
    assert db.scalar("SELECT count(*) FROM projectord.dead_letters") == 0


def test_handler_timeout_cancels_and_on_error_skip_dead_letters(
    db: TestDatabase, state_dir: Path
) -> None:
    """`Hanging` overrides the policy: handler_timeout 1 s, 2 attempts, on_error skip."""
    specs = "tests.support.fault_projections:hanging_and_flaky"
    db.init(specs)
    with DaemonProcess(db.url, specs, state_dir) as daemon:
        with db.connect() as conn:
            for payload in ({}, {"hang": True}, {}):
                append_sql(conn, "Noted", payload, aggregate_id=uuid.uuid4())
        hang_id = str(db.scalar("SELECT event_id FROM projectord.events WHERE payload ? 'hang'"))
        wait_until(lambda: db.scalar("SELECT count(*) FROM hanging_seen") == 2, timeout=20)
        wait_until(lambda: db.scalar("SELECT count(*) FROM flaky_seen") == 3, timeout=10)
        letter = db.rows(
            "SELECT projection, event_id::text, error_type, error_message, attempts"
            " FROM projectord.dead_letters"
        )
        assert letter == [("hanging", hang_id, "HandlerTimeout", letter[0][3], 2)]
        assert "handler_timeout (1s)" in letter[0][3]
        dead_lettered = [e for e in daemon.log_events() if e["event"] == "event.dead_lettered"]
        assert [(e["event_id"], e["by"]) for e in dead_lettered] == [(hang_id, "on_error")]
        # Cancelled on the server too: no backend still sleeps for it.
        wait_until(
            lambda: (
                db.scalar(
                    "SELECT count(*) FROM pg_stat_activity WHERE state = 'active'"
                    " AND query LIKE '%%hanging handler%%' AND pid <> pg_backend_pid()"
                )
                == 0
            ),
            timeout=10,
        )
        hanging = projection(state_dir, "hanging")
        assert hanging["state"] == "running" and hanging["caught_up"]


def test_a_deterministic_operational_error_is_skipped_not_retried_forever(
    db: TestDatabase, state_dir: Path
) -> None:
    """An index row too large (SQLSTATE 54000, an `OperationalError` to psycopg) fails the same
    way every time: it counts toward max_attempts, is isolated and, with on_error = "skip",
    dead-lettered; the 100 good events around it are applied."""
    specs = "tests.support.fault_projections:labels"
    db.init(specs)
    env = {"PROJECTORD_ON_ERROR": "skip", "PROJECTORD_MAX_ATTEMPTS": "2"}
    with db.connect(autocommit=True) as conn:
        for n in range(101):
            label = secrets.token_hex(4_000) if n == 50 else f"label {n}"  # incompressible
            append_sql(conn, "Labelled", {"label": label})
    poison = db.scalar(
        "SELECT event_id FROM projectord.events WHERE length(payload->>'label') > 1000"
    )
    with DaemonProcess(db.url, specs, state_dir, extra_env=env):
        wait_until(lambda: db.scalar("SELECT count(*) FROM projectord.dead_letters") == 1, 60)
        wait_until(lambda: projection(state_dir, "labels")["caught_up"], 30)
        assert projection(state_dir, "labels")["state"] == "running"
        health = cli_json(state_dir, "health")
        assert health["status"] == "ok", health
    assert db.scalar("SELECT count(*) FROM labels") == 100
    assert db.rows("SELECT event_id, error_type, attempts FROM projectord.dead_letters") == [
        (poison, "ProgramLimitExceeded", 2)
    ]
