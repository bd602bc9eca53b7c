"""A pipelined batch with more server work than COMMIT_WAIT (issue: review 1, item 1).

In pipeline mode a batch's statements travel with its COMMIT, and their server work is waited for
at the pipeline's end. That wait was bounded by COMMIT_WAIT (5 s): a batch with 6 s of work had
its connection discarded as dead, its session terminated, and was retried the same way for ever,
although `handler_timeout` allows 60 s. Now the wait goes on while the server says the batch's
session is working, and `handler_timeout` bounds it (projectord/runner/commit_watch.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.support.harness import DaemonProcess, TestDatabase, append_sql, wait_until

SLOW = "tests.support.fault_projections:slow_server_side"
PAST_TIMEOUT = "tests.support.fault_projections:slow_past_timeout"


def connections_lost(daemon: DaemonProcess) -> list[dict[str, Any]]:
    """The daemon's log lines that say it took the database for lost."""
    return [e for e in daemon.log_events() if e.get("event") == "projection.database_unavailable"]


def test_a_batch_with_more_server_work_than_commit_wait_commits_once(
    db: TestDatabase, state_dir: Path
) -> None:
    db.init(SLOW)
    with db.connect() as conn:  # one transaction: one batch of three events, 6 s of server work
        for _ in range(3):
            append_sql(conn, "Slow", {"seconds": 6})
    with DaemonProcess(db.url, SLOW, state_dir) as daemon:
        wait_until(lambda: db.scalar("SELECT count(*) FROM slow_seen") == 3, timeout=40)
        assert db.scalar("SELECT count(*) FROM applied_log") == 3  # once, in one batch
        assert connections_lost(daemon) == []


def test_pipelined_server_work_past_handler_timeout_is_a_handler_failure(
    db: TestDatabase, state_dir: Path
) -> None:
    """Bounded by `handler_timeout` (2 s here), cancelled on the server, counted toward
    `max_attempts` and dead-lettered: never taken for a lost connection."""
    db.init(PAST_TIMEOUT)
    with db.connect(autocommit=True) as conn:
        append_sql(conn, "Slow", {})
        append_sql(conn, "Slow", {"seconds": 60})
        append_sql(conn, "Slow", {})
    with DaemonProcess(db.url, PAST_TIMEOUT, state_dir) as daemon:
        wait_until(lambda: db.scalar("SELECT count(*) FROM slow_past_seen") == 2, timeout=40)
        letters = db.rows("SELECT error_type FROM projectord.dead_letters")
        assert letters == [("HandlerTimeout",)]
        assert connections_lost(daemon) == []
        assert (
            db.scalar(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE query LIKE '%%slow past timeout%%' AND state = 'active'"
                " AND pid <> pg_backend_pid()"
            )
            == 0
        )
