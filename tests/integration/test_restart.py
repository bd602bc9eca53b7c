"""The database goes away for real: immediate-mode restarts of Postgres and terminated backends,
with writers running. The daemon never exits, reports `degraded` while the database is away
(without spinning or flooding the log), and the end state is exact."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from projectord.embedded import EmbeddedPostgres
from tests.integration.test_ordering import assert_applied_exactly_once
from tests.support.harness import (
    DaemonProcess,
    TestDatabase,
    Writers,
    init_database,
    prepare_for_daemon_role,
    wait_until,
)
from tests.support.ops_support import cli

LEDGER = "tests.support.projections:ledger_only"


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[tuple[EmbeddedPostgres, TestDatabase]]:
    """A server of this test's own, so the test may restart it."""
    server = EmbeddedPostgres(tmp_path / "pgdata", durable=False)
    url = server.start()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE DATABASE restart_test")
    database = TestDatabase(make_conninfo(url, dbname="restart_test"), "restart_test")
    prepare_for_daemon_role(database.url)
    init_database(database.url, [LEDGER])
    try:
        yield server, database
    finally:
        server.destroy()


def events_total(db: TestDatabase) -> int:
    return db.scalar("SELECT count(*) FROM projectord.events")


def applied_total(db: TestDatabase) -> int:
    return db.scalar("SELECT count(*) FROM applied_log")


def health(state_dir: Path) -> tuple[int, dict[str, Any]]:
    result = cli(state_dir, "health", "--json")
    return result.returncode, json.loads(result.stdout)


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def outage_reported(state_dir: Path, at_least: float) -> bool:
    """`health` says degraded (exit 1), the database away for `at_least` seconds."""
    status, verdict = health(state_dir)
    away = [r for r in verdict["reasons"] if r["code"] == "database_unreachable"]
    assert status == 1 and verdict["status"] == "degraded", verdict
    return bool(away) and away[0]["seconds"] >= at_least


def test_postgres_restarts_with_writers_running(
    own_server: tuple[EmbeddedPostgres, TestDatabase], state_dir: Path
) -> None:
    server, db = own_server
    with DaemonProcess(db.url, LEDGER, state_dir) as daemon:
        with Writers(db.url):
            for round_ in range(3):
                wait_until(lambda: events_total(db) > 0 and applied_total(db) > 0, timeout=20)
                before = applied_total(db)
                if round_ == 1:
                    # A longer outage: meanwhile the daemon says degraded, does not spin, and
                    # does not log each retry.
                    server.stop("immediate")
                    wait_until(lambda: outage_reported(state_dir, 0), timeout=30, interval=0.1)
                    lines, cpu = len(daemon.log_events()), cpu_seconds(daemon.process.pid)
                    wait_until(lambda: outage_reported(state_dir, 6), timeout=30, interval=0.1)
                    assert len(daemon.log_events()) - lines <= 5, daemon.log_events()[lines:]
                    assert cpu_seconds(daemon.process.pid) - cpu < 2.0, "a busy loop"
                    server.start()
                else:
                    server.restart("immediate")
                # It comes back by itself and applies what the writers commit afterwards.
                wait_until(
                    lambda before=before: applied_total(db) > before + 20, timeout=30, interval=0.1
                )
                wait_until(lambda: health(state_dir)[0] == 0, timeout=30, interval=0.1)
                assert daemon.process.poll() is None, "the daemon exited"
        wait_until(lambda: applied_total(db) == events_total(db), timeout=30)
        disconnects = sum(e["event"] == "listener.disconnected" for e in daemon.log_events())
        assert 3 <= disconnects <= 6, "one line per state change, not one per retry"
    assert_applied_exactly_once(db)


def test_terminating_every_daemon_connection_repeatedly(
    own_server: tuple[EmbeddedPostgres, TestDatabase], state_dir: Path
) -> None:
    _, db = own_server
    with DaemonProcess(db.url, LEDGER, state_dir) as daemon:
        with Writers(db.url):
            for _ in range(5):
                before = applied_total(db)
                wait_until(
                    lambda before=before: applied_total(db) > before + 10, timeout=30, interval=0.05
                )
                killed = db.scalar(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                    " WHERE application_name = 'projectord' AND pid <> pg_backend_pid()"
                )
                assert killed >= 2  # the listener and at least one pooled connection
                assert daemon.process.poll() is None
        wait_until(lambda: applied_total(db) == events_total(db), timeout=30)
    assert_applied_exactly_once(db)
