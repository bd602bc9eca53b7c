"""The database goes away for real: immediate-mode restarts of Postgres and terminated backends,
with writers running. The daemon never exits, and the end state is exact."""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from projectord.embedded import EmbeddedPostgres
from tests.harness import (
    DaemonProcess,
    TestDatabase,
    append_sql,
    init_database,
    wait_until,
)
from tests.test_ordering import assert_applied_exactly_once

LEDGER = "tests.projections:ledger_only"


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[tuple[EmbeddedPostgres, TestDatabase]]:
    """A server of this test's own, so the test may restart it."""
    server = EmbeddedPostgres(tmp_path / "pgdata", durable=False)
    url = server.start()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE DATABASE restart_test")
    database = TestDatabase(make_conninfo(url, dbname="restart_test"), "restart_test")
    init_database(database.url, [LEDGER])
    try:
        yield server, database
    finally:
        server.destroy()


class Writers:
    """Threads appending one committed event per transaction, riding out outages."""

    def __init__(self, url: str, count: int = 4) -> None:
        self.url = url
        self.stop = threading.Event()
        self.attempted_commits = 0
        self.threads = [threading.Thread(target=self._write, args=(n,)) for n in range(count)]

    def _write(self, seed: int) -> None:
        rng = random.Random(seed)
        while not self.stop.is_set():
            try:
                with psycopg.connect(self.url, connect_timeout=3) as conn:
                    while not self.stop.is_set():
                        append_sql(
                            conn,
                            "Credited",
                            {"account": rng.randint(1, 9), "amount": 1},
                            aggregate_id=uuid.uuid4(),
                        )
                        conn.commit()
                        time.sleep(rng.uniform(0, 0.01))
            except psycopg.Error:
                time.sleep(0.1)  # the server is away; an uncertain commit is checked by the fold

    def __enter__(self) -> Writers:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join()


def events_total(db: TestDatabase) -> int:
    return db.scalar("SELECT count(*) FROM projectord.events")


def applied_total(db: TestDatabase) -> int:
    return db.scalar("SELECT count(*) FROM applied_log")


def test_postgres_restarts_with_writers_running(
    own_server: tuple[EmbeddedPostgres, TestDatabase], state_dir: Path
) -> None:
    server, db = own_server
    with DaemonProcess(db.url, LEDGER, state_dir) as daemon:
        with Writers(db.url):
            for _ in range(3):
                wait_until(lambda: events_total(db) > 0 and applied_total(db) > 0, timeout=20)
                before = applied_total(db)
                server.restart("immediate")
                # It comes back by itself and applies what the writers commit afterwards.
                wait_until(
                    lambda before=before: applied_total(db) > before + 20, timeout=30, interval=0.1
                )
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
