"""Failover to a promoted streaming replica, with the daemon and writers running.

A primary and a replica made with `pg_basebackup` from the binaries the tests use; the daemon and
the writers reach them through one multi-host URL with `target_session_attrs=read-write`, as users
who fail over do. The primary is stopped hard (immediate mode, its unreplicated tail lost with it)
and the replica promoted. The daemon must follow within 30 s, and its read models must be an
exact fold of the events the new primary holds, with no checkpoint ahead of them.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from projectord.embedded import EmbeddedPostgres
from tests.integration.test_ordering import assert_applied_exactly_once
from tests.support.harness import DaemonProcess, TestDatabase, Writers, init_database, wait_until

LEDGER = "tests.support.projections:ledger_only"
DATABASE = "failover_test"
FOLLOW_WITHIN = 30.0  # seconds, issue 17


def replica_of(primary: EmbeddedPostgres, data_dir: Path) -> EmbeddedPostgres:
    """A streaming replica of `primary`, started: a base backup with its standby settings."""
    replica = EmbeddedPostgres(data_dir, durable=False)
    replica.claim(data_dir)  # pg_basebackup runs as the server's user
    primary._run(
        "pg_basebackup",
        "-D",
        str(data_dir),
        "-h",
        str(primary.socket_dir),
        "-U",
        "postgres",
        "-X",
        "stream",
        "-R",  # standby.signal and primary_conninfo
        "--checkpoint=fast",
        timeout=120,
    )
    replica.start()
    return replica


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[EmbeddedPostgres, EmbeddedPostgres, str]]:
    """A primary with the test database, its replica, and the URL that reaches whichever of
    them accepts writes."""
    primary = EmbeddedPostgres(tmp_path / "primary", durable=False)
    primary.start()
    replica: EmbeddedPostgres | None = None
    try:
        with psycopg.connect(primary.url, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {DATABASE}")
        init_database(make_conninfo(primary.url, dbname=DATABASE), [LEDGER])
        replica = replica_of(primary, tmp_path / "replica")
        url = make_conninfo(
            "",
            host=f"{primary.socket_dir},{replica.socket_dir}",
            user="postgres",
            dbname=DATABASE,
            target_session_attrs="read-write",
        )
        yield primary, replica, url
    finally:
        for server in (replica, primary):
            if server is not None:
                server.destroy()


def applied(db: TestDatabase) -> int:
    return db.scalar("SELECT count(*) FROM applied_log")


def test_the_daemon_follows_a_promoted_replica(
    pair: tuple[EmbeddedPostgres, EmbeddedPostgres, str], state_dir: Path
) -> None:
    primary, replica, url = pair
    db = TestDatabase(url, DATABASE)
    events = "SELECT count(*) FROM projectord.events"
    with DaemonProcess(url, LEDGER, state_dir) as daemon:
        with Writers(url):
            wait_until(lambda: applied(db) > 100, timeout=30)
            primary.stop("immediate")  # the unreplicated tail is lost with it
            replica._run("pg_ctl", "-D", str(replica.data_dir), "-w", "promote", timeout=60)
            promoted = time.monotonic()
            # Follows: applies what writers commit on the new primary after the promotion.
            newest = db.scalar("SELECT coalesce(max(global_position), 0) FROM projectord.events")
            since = "SELECT count(*) FROM applied_log WHERE global_position > %s"
            wait_until(lambda: db.scalar(since, (newest,)) > 20, timeout=60, interval=0.1)
            followed = time.monotonic() - promoted
        print(f"\nfailover: applying on the new primary {followed:.1f} s after the promotion")
        assert followed < FOLLOW_WITHIN
        # The writers have stopped: everything the new primary holds is applied, once.
        wait_until(lambda: applied(db) == db.scalar(events), timeout=30)
        assert daemon.process.poll() is None, "the daemon exited"
    assert_applied_exactly_once(db)
    with DaemonProcess(url, LEDGER, state_dir):  # a restart on the new primary: no false alarm
        pass
    ahead = db.scalar(
        "SELECT count(*) FROM projectord.projection_positions"
        " WHERE transaction_id > pg_current_xact_id()"
    )
    assert ahead == 0, "a checkpoint is ahead of the new primary's transaction ids"
