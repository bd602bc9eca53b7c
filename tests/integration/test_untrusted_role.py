"""What a role with nothing but CONNECT can do to the daemon (issue 18, point 5), with a real
login role, the real daemon and `projectord health --json`: it cannot keep a projection from its
daemon through advisory locks, it cannot hang `init`, and a transaction it holds open in another
database makes health degraded at once, naming it."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from projectord.queries import Queries
from tests.support.harness import (
    DaemonProcess,
    TestDatabase,
    run_cli,
    temporary_database,
    wait_until,
)
from tests.support.ops_support import cli, credit, projection, start
from tests.support.role_support import TemporaryRoles

LEDGER = "tests.support.projections:ledger_only"
LEGACY_INIT_LOCK = 0x70726F6A  # the init lock's advisory key before migration 0014


@pytest.fixture
def other_database(pg_admin_url: str) -> Iterator[str]:
    """Another database of the same cluster, for a session that is not in the daemon's."""
    with temporary_database(pg_admin_url, "pd_other") as name:
        yield name


def health(state_dir: Path) -> tuple[int, dict[str, Any]]:
    """`projectord health --json`: its exit status and its verdict."""
    result = cli(state_dir, "health", "--json")
    assert result.returncode in (0, 1, 2), result.stderr
    return result.returncode, json.loads(result.stdout)


def applied(db: TestDatabase) -> int:
    return int(db.scalar("SELECT count(*) FROM applied_log"))


def advisory_locks_of_others(conn: psycopg.Connection[Any]) -> list[tuple[int, int, int]]:
    """Every advisory lock other sessions hold in this database, as pg_locks shows them to
    anyone: (classid, objid, objsubid)."""
    return conn.execute(
        "SELECT DISTINCT classid::bigint, objid::bigint, objsubid FROM pg_locks"
        " WHERE locktype = 'advisory' AND granted AND pid <> pg_backend_pid()"
        " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    ).fetchall()


def take(conn: psycopg.Connection[Any], lock: tuple[int, int, int]) -> None:
    """Take a lock seen in pg_locks, exclusively, for the session."""
    classid, objid, objsubid = lock
    if objsubid == 1:  # one bigint key: its high and low halves
        conn.execute("SELECT pg_advisory_lock((%s::bigint << 32) | %s::bigint)", (classid, objid))
    else:  # two int4 keys, shown as oids
        conn.execute(
            "SELECT pg_advisory_lock(%s::bigint::bit(32)::int, %s::bigint::bit(32)::int)",
            (classid, objid),
        )


def test_a_stranger_cannot_keep_a_projection_from_its_daemon(
    db: TestDatabase, state_dir: Path, stranger: str
) -> None:
    """Blind: the keys every installation used to have. Then a stranger that watched the daemon's
    keys in pg_locks and took them all the moment the daemon stopped: the next daemon runs the
    projection anyway, on a key drawn anew."""
    db.init(LEDGER)
    with psycopg.connect(make_conninfo(db.url, user=stranger), autocommit=True) as mallory:
        mallory.execute(
            "SELECT pg_advisory_lock(hashtext('projectord:projectord'), hashtext('ledger')),"
            " pg_advisory_lock(hashtext('projectord:projectord'), hashtext('projectord-instance'))"
        )
        with DaemonProcess(db.url, LEDGER, state_dir) as daemon:
            credit(db)
            wait_until(lambda: applied(db) == 1, timeout=15)
            seen = advisory_locks_of_others(mallory)
            assert daemon.stop() == 0
        for lock in seen:  # the daemon's keys, the moment they are free
            take(mallory, lock)

        with DaemonProcess(db.url, LEDGER, state_dir) as daemon:
            credit(db)
            wait_until(lambda: applied(db) == 2, timeout=15)
            assert projection(state_dir, "ledger")["local"] is True
            assert daemon.has_logged("ownership.rekeyed")
            _, verdict = health(state_dir)
            assert verdict["status"] != "failing", verdict
            assert daemon.stop() == 0


def test_a_stranger_cannot_hang_init_and_every_init_lock_wait_is_bounded(
    db: TestDatabase, state_dir: Path, stranger: str
) -> None:
    """The init lock used to be an advisory key anyone could hold, with no lock_timeout: init
    and the daemon's start hung forever. Now it is a table lock a stranger may not take, and a
    wait for it (held by a privileged session here) ends with one line saying what and how long."""
    env = {"PROJECTORD_DATABASE_URL": db.url, "PROJECTORD_PROJECTIONS": LEDGER}
    with psycopg.connect(make_conninfo(db.url, user=stranger), autocommit=True) as mallory:
        mallory.execute("SELECT pg_advisory_lock(%s)", (LEGACY_INIT_LOCK,))
        with pytest.raises(psycopg.errors.InsufficientPrivilege), mallory.transaction():
            mallory.execute("LOCK TABLE projectord.schema_migrations")
        done = run_cli("init", env=env, timeout=30)
        assert done.returncode == 0, done.stderr

    env["PROJECTORD_INIT_LOCK_TIMEOUT"] = "1"
    with db.connect() as operator:  # an operator's forgotten transaction
        operator.execute("LOCK TABLE projectord.schema_migrations IN ACCESS SHARE MODE")
        began = time.monotonic()
        failed = run_cli("init", env=env, timeout=30)
        assert failed.returncode == 1 and time.monotonic() - began < 20
        lines = failed.stderr.strip().splitlines()
        assert len(lines) == 1, failed.stderr
        assert "1s" in lines[0] and "projectord.schema_migrations" in lines[0], lines[0]

        daemon = DaemonProcess(db.url, LEDGER, state_dir, extra_env=env)
        assert daemon.process.wait(30) == 1
        daemon.stop()
        assert "waiting 1s for a lock on the init lock" in daemon.log_path.read_text()


def test_health_names_a_strangers_transaction_in_another_database_at_once(
    db: TestDatabase, state_dir: Path, stranger: str, other_database: str, roles: TemporaryRoles
) -> None:
    """An xid held in another database holds back every projection. Health says so within the
    default threshold (5 s) plus a check, with no event waiting yet, naming pid, database and role
    (visible to every role); the daemon here may see the rest too."""
    other_url = make_conninfo(db.url, user=stranger, dbname=other_database)
    with start(db, LEDGER, state_dir), psycopg.connect(other_url) as mallory:
        credit(db)
        wait_until(lambda: applied(db) == 1, timeout=15)
        wait_until(lambda: health(state_dir)[0] == 0, timeout=15, interval=0.2)
        mallory.execute("SELECT pg_current_xact_id()")
        pid = mallory.info.backend_pid

        def held() -> dict[str, Any] | None:
            code, verdict = health(state_dir)
            found = [r for r in verdict["reasons"] if r["code"] == "horizon_held"]
            return found[0] if found and code == 1 and verdict["status"] == "degraded" else None

        # The default threshold (5 s) plus a few checks: within 15 s, no event waiting yet.
        wait_until(lambda: held() is not None, timeout=15, interval=0.2)
        reason = held()
        assert reason is not None
        holder = reason["holder"]
        assert (holder["pid"], holder["datname"], holder["usename"]) == (
            pid,
            other_database,
            stranger,
        )
        assert f"pid {pid}" in reason["message"] and other_database in reason["message"]

        # A role without pg_read_all_stats still finds who it is, not what it does.
        observer = roles.create("observer", "LOGIN")
        with psycopg.connect(make_conninfo(db.url, user=observer), autocommit=True) as conn:
            cur = conn.execute(Queries("projectord")["horizon_holder"])
            row = cur.fetchone()
            assert row is not None
            seen = dict(zip([c.name for c in cur.description or ()], row, strict=True))
        assert (seen["pid"], seen["datname"], seen["usename"]) == (pid, other_database, stranger)
        assert seen["visible"] is False and seen["query"] is None
        credit(db)  # committed behind the stranger's xid: it waits
        wait_until(lambda: (held() or {}).get("projections") == ["ledger"], timeout=15)
        assert applied(db) == 1

        mallory.rollback()
        wait_until(lambda: applied(db) == 2, timeout=10)
        wait_until(lambda: health(state_dir)[0] == 0, timeout=15, interval=0.2)


def test_health_names_a_stranger_holding_the_wake_up_locks(
    db: TestDatabase, state_dir: Path, stranger: str
) -> None:
    """The wake-up stripes' key cannot be secret (the trigger's source is readable by all), so a
    stranger may take them: events still arrive (the runners poll), and health names who does it."""
    db.init(LEDGER)
    with psycopg.connect(make_conninfo(db.url, user=stranger), autocommit=True) as mallory:
        mallory.execute(
            "SELECT count(pg_advisory_lock(hashtext('projectord_projectord'), s))"
            " FROM generate_series(0, 63) AS s"
        )
        with DaemonProcess(db.url, LEDGER, state_dir):
            credit(db)
            wait_until(lambda: applied(db) == 1, timeout=15)

            def obstructed() -> dict[str, Any] | None:
                code, verdict = health(state_dir)
                found = [r for r in verdict["reasons"] if r["code"] == "wakeups_obstructed"]
                return found[0] if found and code == 1 else None

            wait_until(lambda: obstructed() is not None, timeout=15, interval=0.2)
            reason = obstructed()
            assert reason is not None
            assert reason["session"]["pid"] == mallory.info.backend_pid
            assert reason["session"]["usename"] == stranger
            assert f"pid {mallory.info.backend_pid}" in reason["message"]
            mallory.execute("SELECT pg_advisory_unlock_all()")
            wait_until(lambda: health(state_dir)[0] == 0, timeout=15, interval=0.2)
