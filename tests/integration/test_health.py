"""Health against a real daemon: it names the open transaction that holds the xmin horizon, and
it reports lag beyond the thresholds; the monitor logs each change of verdict once."""

from __future__ import annotations

from pathlib import Path

from tests.support.harness import DaemonProcess, TestDatabase, wait_until
from tests.support.ops_support import append, ask, cli, credit, start

LEDGER = "tests.support.projections:ledger_only"


def codes(state_dir: Path) -> list[str]:
    return [r["code"] for r in ask(state_dir, "health")["reasons"]]


def test_health_names_the_transaction_holding_the_horizon(
    db: TestDatabase, state_dir: Path
) -> None:
    env = {"PROJECTORD_HEALTH_HORIZON_SECONDS": "1"}
    with start(db, LEDGER, state_dir, env) as daemon, db.connect() as holder:
        credit(db)
        wait_until(lambda: db.scalar("SELECT count(*) FROM applied_log") == 1, timeout=10)
        holder.execute("SELECT pg_current_xact_id() /* the forgotten report */")
        pid = holder.info.backend_pid
        credit(db)  # committed, but behind the open transaction's xid
        wait_until(lambda: "horizon_held" in codes(state_dir), timeout=15)
        health = ask(state_dir, "health")
        assert health["status"] == "degraded"
        held = next(r for r in health["reasons"] if r["code"] == "horizon_held")
        assert held["holder"]["pid"] == pid
        assert held["holder"]["state"] == "idle in transaction"
        assert held["projections"] == ["ledger"] and held["seconds"] >= 1
        assert f"pid {pid}" in held["message"] and "the forgotten report" in held["message"]
        text = cli(state_dir, "health")
        assert text.returncode == 1 and f"pid {pid}" in text.stdout
        assert db.scalar("SELECT count(*) FROM applied_log") == 1
        # The monitor logs the change of verdict once, naming the holder.
        wait_until(lambda: verdicts(daemon) == ["degraded"], timeout=15)

        holder.commit()
        wait_until(lambda: db.scalar("SELECT count(*) FROM applied_log") == 2, timeout=10)
        wait_until(lambda: ask(state_dir, "health")["status"] == "ok", timeout=10)
        assert cli(state_dir, "health").returncode == 0
        wait_until(lambda: verdicts(daemon) == ["degraded", "ok"], timeout=15)
        changed = [e for e in daemon.log_events() if e["event"] == "health.changed"]
        assert f"pid {pid}" in changed[0]["reasons"][0]


def verdicts(daemon: DaemonProcess) -> list[str]:
    return [e["status"] for e in daemon.log_events() if e["event"] == "health.changed"]


def test_health_reports_lag_beyond_the_threshold(db: TestDatabase, state_dir: Path) -> None:
    env = {"PROJECTORD_HEALTH_MAX_LAG": "3", "PROJECTORD_BATCH_SIZE": "1"}
    with start(db, "tests.support.ops_projections:slow_and_ledger", state_dir, env):
        append(db, "Slow", {"sleep": 0.5}, count=8)
        wait_until(lambda: "projection_lagging" in codes(state_dir), timeout=10)
        lagging = next(
            r for r in ask(state_dir, "health")["reasons"] if r["code"] == "projection_lagging"
        )
        assert lagging["projection"] == "slow" and lagging["lag"] > 3
        wait_until(lambda: ask(state_dir, "health")["status"] == "ok", timeout=30)
