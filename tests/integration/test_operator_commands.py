"""The operator commands against a real daemon process: over the control socket and through the
command line, with their exit statuses and JSON shapes; pause that survives a restart; rebuild
that reproduces the read model; skip into the dead letters."""

from __future__ import annotations

import os
import pty
import signal
import subprocess
import sys
from pathlib import Path

from tests.integration.test_ordering import assert_applied_exactly_once
from tests.support.harness import ROOT, TestDatabase, bulk_credits, wait_until
from tests.support.ops_support import (
    LEDGER_AND_PICKY,
    ask,
    ask_error,
    cli,
    cli_json,
    credit,
    ledger_rows,
    projection,
    start,
)

LEDGER = "tests.support.projections:ledger_only"
STATUS_KEYS = {
    "name",
    "state",
    "lag",
    "lag_seconds",
    "caught_up",
    "applied_total",
    "events_per_second",
    "checkpoint",
    "held_back",
    "last_error",
    "owner",
    "updated_at",
    "rebuild",
}
ERROR_KEYS = {"event_id", "event_type", "global_position", "message", "attempts", "type"}


def applied(db: TestDatabase, name: str = "ledger") -> int:
    return db.scalar(
        "SELECT applied_total FROM projectord.projection_positions WHERE name = %s", (name,)
    )


def test_every_command_with_exit_statuses_and_shapes(db: TestDatabase, state_dir: Path) -> None:
    with start(db, LEDGER_AND_PICKY, state_dir) as daemon:
        credit(db)
        wait_until(lambda: applied(db, "picky") == 1, timeout=10)

        # status: socket and CLI agree on the shape.
        over_socket = ask(state_dir, "status")
        assert {"instance", "database", "listener", "projections"} <= set(over_socket)
        assert [p["name"] for p in over_socket["projections"]] == ["ledger", "picky"]
        from_cli = cli_json(state_dir, "status")
        for entry in from_cli["projections"]:
            assert set(entry) >= STATUS_KEYS
            assert entry["state"] == "running" and entry["lag"] == 0 and entry["caught_up"]
            assert entry["owner"] == f"{os.uname().nodename}:{daemon.process.pid}"
        text = cli(state_dir, "status")
        assert text.returncode == 0 and "ledger" in text.stdout and "picky" in text.stdout

        # health: ok, exit 0.
        assert cli_json(state_dir, "health") == {
            "status": "ok",
            "reasons": [],
            "instance": over_socket["instance"],
        }
        assert cli(state_dir, "health").returncode == 0

        # A poison event: picky fails on it, retries, stops on it (state failed) and names it;
        # health fails with exit 1.
        credit(db, poison=True)
        credit(db, amount=2)
        poison_id = str(
            db.scalar("SELECT event_id FROM projectord.events WHERE payload ? 'poison'")
        )
        wait_until(lambda: projection(state_dir, "picky")["state"] == "failed", timeout=15)
        failing = projection(state_dir, "picky")
        assert set(failing["last_error"]) >= ERROR_KEYS
        assert failing["last_error"]["event_id"] == poison_id
        assert failing["last_error"]["event_type"] == "Credited"
        assert "cannot handle event" in failing["last_error"]["message"]
        assert failing["lag"] == 2 and not failing["caught_up"]
        health = cli(state_dir, "health")
        assert health.returncode == 2  # failing (1 is degraded)
        assert health.stdout.startswith("failing") and poison_id in health.stdout
        reasons = cli_json(state_dir, "health")["reasons"]
        assert [r["code"] for r in reasons] == ["projection_failing"]

        # skip: the poison event goes to the dead letters, the rest is applied.
        skipped = cli(state_dir, "skip", "picky")
        assert skipped.returncode == 0, skipped.stderr
        assert poison_id in skipped.stdout
        wait_until(lambda: applied(db, "picky") == 2, timeout=10)
        letter = db.rows(
            "SELECT projection, event_id::text, event_type, error_message, traceback, attempts"
            " FROM projectord.dead_letters"
        )
        assert len(letter) == 1
        name, event_id, event_type, message, trace, attempts = letter[0]
        assert (name, event_id, event_type) == ("picky", poison_id, "Credited")
        assert "cannot handle event" in message and "ValueError" in trace and attempts >= 1
        assert db.scalar("SELECT count(*) FROM picky_seen") == 2
        assert cli(state_dir, "health").returncode == 0

        # Refusals: nothing to skip, unknown names; exit 1 and a stable error code.
        assert ask_error(state_dir, "skip", name="picky").code == "not_stuck"
        assert cli(state_dir, "skip", "picky").returncode == 1
        for command in ("pause", "resume", "rebuild", "skip"):
            assert ask_error(state_dir, command, name="nope").code == "unknown_projection"
            refused = cli(state_dir, command, "nope")
            assert refused.returncode == 1
            assert "no projection named 'nope'" in refused.stderr
        assert ask_error(state_dir, "status", names=["nope"]).code == "unknown_projection"
        assert daemon.stop() == 0

    # No daemon: every operator command exits 3.
    for args in (
        ("status",),
        ("status", "--json"),
        ("health",),
        ("pause", "ledger"),
        ("resume", "ledger"),
        ("rebuild", "ledger"),
        ("skip", "ledger"),
    ):
        result = cli(state_dir, *args)
        assert result.returncode == 3, (args, result.stderr)
        assert "no daemon answers" in result.stderr


def test_pause_holds_events_back_and_survives_a_restart(db: TestDatabase, state_dir: Path) -> None:
    with start(db, LEDGER, state_dir) as daemon:
        credit(db)
        wait_until(lambda: applied(db) == 1, timeout=10)
        paused = cli(state_dir, "pause", "ledger")
        assert paused.returncode == 0, paused.stderr
        assert ask(state_dir, "pause", name="ledger") == {"name": "ledger", "state": "paused"}
        for n in range(1, 4):
            credit(db)
            wait_until(lambda n=n: projection(state_dir, "ledger")["lag"] == n, timeout=10)
        status = projection(state_dir, "ledger")
        assert status["state"] == "paused" and status["lag_seconds"] > 0
        assert applied(db) == 1
        health = cli_json(state_dir, "health")
        assert health["status"] == "degraded"
        assert [r["code"] for r in health["reasons"]] == ["projection_paused"]
        assert daemon.stop() == 0

    with start(db, LEDGER, state_dir) as daemon:
        wait_until(lambda: projection(state_dir, "ledger")["state"] == "paused", timeout=10)
        credit(db)
        wait_until(lambda: projection(state_dir, "ledger")["lag"] == 4, timeout=10)
        assert applied(db) == 1, "a paused projection applied events after a restart"
        resumed = cli(state_dir, "resume", "ledger")
        assert resumed.returncode == 0, resumed.stderr
        wait_until(lambda: applied(db) == 5, timeout=10)
        assert projection(state_dir, "ledger")["caught_up"]
        assert daemon.stop() == 0
    assert_applied_exactly_once(db)


def test_rebuild_reproduces_the_read_model(db: TestDatabase, state_dir: Path) -> None:
    total = 20_000
    with db.connect() as conn:
        bulk_credits(conn, total, accounts=300)
    env = {"PROJECTORD_BATCH_SIZE": "500"}
    with start(db, LEDGER, state_dir, env) as daemon:
        wait_until(lambda: applied(db) == total, timeout=60)
        before = ledger_rows(db)
        started = ask(state_dir, "rebuild", name="ledger")
        assert started["name"] == "ledger"
        assert started["rebuild"]["total"] == total and started["rebuild"]["applied"] == 0
        wait_until(lambda: projection(state_dir, "ledger")["rebuild"]["done"], timeout=60)
        assert ledger_rows(db) == before
        assert_applied_exactly_once(db)

        # The CLI with --wait blocks until done and reports it.
        result = cli(state_dir, "rebuild", "ledger", "--wait")
        assert result.returncode == 0, result.stderr
        assert f"rebuilt ledger: {total} events applied" in result.stdout
        status = projection(state_dir, "ledger")
        assert status["state"] == "running" and status["caught_up"]
        assert status["applied_total"] == total
        assert ledger_rows(db) == before
        assert db.scalar("SELECT count(*) FROM applied_log") == total
        assert daemon.has_logged("projection.rebuild_started")
        assert daemon.has_logged("projection.rebuilt")

        # On a terminal it draws a progress bar.
        output = run_on_a_tty("rebuild", "ledger", "--state-dir", str(state_dir))
        assert "100%" in output and "ev/s" in output and "ETA" in output
        assert ledger_rows(db) == before
        assert daemon.stop() == 0


def run_on_a_tty(*args: str) -> str:
    """Run the CLI with its stdout on a pseudo-terminal; return what it wrote."""
    leader, follower = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "projectord", *args],
        stdout=follower,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # EIO: the process closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    assert process.wait(30) == 0, process.stderr.read() if process.stderr else ""
    return b"".join(chunks).decode()


def test_status_watch_refreshes_until_interrupted(db: TestDatabase, state_dir: Path) -> None:
    with start(db, LEDGER, state_dir) as daemon:
        watch = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "projectord",
                "status",
                "--watch",
                "--interval",
                "0.2",
                "--state-dir",
                str(state_dir),
            ],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            # As from a terminal: a test run started in the background (`cmd &` in a script)
            # ignores SIGINT, and Python then installs no KeyboardInterrupt for it.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        assert watch.stdout is not None
        tables = 0
        seen_credit = False
        credit(db)
        for line in watch.stdout:
            tables += line.startswith("NAME")
            seen_credit = seen_credit or (line.startswith("ledger") and " 1 " in line)
            if tables >= 3 and seen_credit:
                break
        watch.send_signal(signal.SIGINT)
        # Keep reading while it exits: a full pipe would block its last refresh, and its exit.
        watch.communicate(timeout=30)
        assert watch.returncode == 0
        assert seen_credit, "the live table never showed the applied event"
        assert daemon.stop() == 0
