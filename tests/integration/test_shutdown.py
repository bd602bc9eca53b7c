"""Stopping and reconfiguring a real daemon process: SIGTERM during a slow batch (committed when
the drain allows it, rolled back when it does not, never half), a pause that lands while a batch
is in flight, and SIGHUP re-reading the configuration."""

from __future__ import annotations

import signal
import time
from pathlib import Path

from tests.support.harness import DaemonProcess, TestDatabase, wait_until
from tests.support.ops_support import append, ask, credit, projection, start

SLOW = "tests.support.ops_projections:slow_and_ledger"


def slow_state(db: TestDatabase) -> tuple[int, int]:
    """(rows in the read model, events the checkpoint says were applied)."""
    rows = db.scalar("SELECT count(*) FROM slow_seen")
    applied = db.scalar(
        "SELECT applied_total FROM projectord.projection_positions WHERE name = 'slow'"
    )
    return rows, applied


def batch_in_flight(db: TestDatabase) -> bool:
    """A daemon connection holds an open transaction that has written: the slow batch has
    begun. (Not `state = 'idle in transaction'`: in pipeline mode a batch between two
    statements shows as `active` until its COMMIT.)"""
    return bool(
        db.scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND application_name = 'projectord' AND backend_xid IS NOT NULL"
        )
    )


def test_sigterm_lets_the_batch_in_flight_commit(db: TestDatabase, state_dir: Path) -> None:
    env = {"PROJECTORD_DRAIN_TIMEOUT": "20"}
    with start(db, SLOW, state_dir, env) as daemon:
        append(db, "Slow", {"sleep": 0.3}, count=10)  # one batch of 10 sleeping 3 s in total
        wait_until(lambda: batch_in_flight(db), timeout=10)
        assert slow_state(db) == (0, 0)
        began = time.monotonic()
        assert daemon.stop(signal.SIGTERM) == 0
        took = time.monotonic() - began
    assert took < 20, f"took {took:.1f}s, longer than the drain timeout"
    assert slow_state(db) == (10, 10), "the batch in flight was not committed whole"
    assert daemon.has_logged("daemon.draining") and not daemon.has_logged("daemon.drain_timeout")


def test_sigterm_rolls_back_a_batch_that_outlasts_the_drain(
    db: TestDatabase, state_dir: Path
) -> None:
    env = {"PROJECTORD_DRAIN_TIMEOUT": "1"}
    with start(db, SLOW, state_dir, env) as daemon:
        credit(db)
        wait_until(lambda: db.scalar("SELECT count(*) FROM applied_log") == 1, timeout=10)
        append(db, "Slow", {"sleep": 60}, count=4)
        wait_until(lambda: batch_in_flight(db), timeout=10)
        began = time.monotonic()
        assert daemon.stop(signal.SIGTERM) == 0
        took = time.monotonic() - began
    assert took < 5, f"took {took:.1f}s with a drain timeout of 1s"
    assert slow_state(db) == (0, 0), "part of a rolled-back batch was committed"
    assert daemon.has_logged("daemon.drain_timeout")
    assert not batch_in_flight(db)


def test_a_pause_stops_the_batch_in_flight_from_committing(
    db: TestDatabase, state_dir: Path
) -> None:
    with start(db, SLOW, state_dir) as daemon:
        append(db, "Slow", {"sleep": 1}, count=2)
        wait_until(lambda: batch_in_flight(db), timeout=10)
        assert ask(state_dir, "pause", name="slow")["state"] == "paused"
        # The batch finishes its sleep, then fails its compare-and-set and rolls back.
        wait_until(lambda: projection(state_dir, "slow")["state"] == "paused", timeout=10)
        wait_until(lambda: not batch_in_flight(db), timeout=10)
        assert slow_state(db) == (0, 0), "a batch committed after the pause answered"
        assert projection(state_dir, "slow")["lag"] == 2
        ask(state_dir, "resume", name="slow")
        wait_until(lambda: slow_state(db) == (2, 2), timeout=20)
        assert daemon.stop() == 0


def test_sighup_rereads_the_configuration(db: TestDatabase, state_dir: Path) -> None:
    config = state_dir / "projectord.toml"
    config.write_text('log_level = "info"\nhealth_max_lag = 100\n')
    specs = "tests.support.projections:ledger_only"
    db.init(specs)
    with DaemonProcess(db.url, specs, state_dir, args=["--config", str(config)]) as daemon:
        credit(db)
        wait_until(lambda: db.scalar("SELECT count(*) FROM applied_log") == 1, timeout=10)
        assert not daemon.has_logged("batch.applied"), "debug lines at level info"

        config.write_text('log_level = "debug"\nhealth_max_lag = 5\nschema = "elsewhere"\n')
        daemon.process.send_signal(signal.SIGHUP)
        wait_until(lambda: daemon.has_logged("config.reloaded"), timeout=10)
        reloaded = next(e for e in daemon.log_events() if e["event"] == "config.reloaded")
        assert reloaded["changed"] == {"log_level": ["info", "debug"], "health_max_lag": [100, 5]}
        assert reloaded["needs_restart"] == ["schema"]
        credit(db)
        wait_until(lambda: daemon.has_logged("batch.applied"), timeout=10)

        config.write_text("batch_size = -1\n")
        daemon.process.send_signal(signal.SIGHUP)
        wait_until(lambda: daemon.has_logged("config.reload_failed"), timeout=10)
        failed = next(e for e in daemon.log_events() if e["event"] == "config.reload_failed")
        assert "batch_size" in failed["error"]
        # Still running, with the settings it had.
        credit(db)
        wait_until(lambda: db.scalar("SELECT count(*) FROM applied_log") == 3, timeout=10)

        # A file that is not UTF-8 (a stray byte of an editor) is refused the same way; it
        # raised UnicodeDecodeError through the signal loop and took the daemon down.
        config.write_bytes(b'log_level = "\xff"\n')
        daemon.process.send_signal(signal.SIGHUP)
        wait_until(
            lambda: sum(e["event"] == "config.reload_failed" for e in daemon.log_events()) == 2,
            timeout=10,
        )
        failed = [e for e in daemon.log_events() if e["event"] == "config.reload_failed"][-1]
        assert "cannot be read" in failed["error"]
        credit(db)
        wait_until(lambda: db.scalar("SELECT count(*) FROM applied_log") == 4, timeout=10)
        assert daemon.stop() == 0
