"""What bounds a batch, and what a batch's bounds mean for the checkpoint.

A batch is bounded by `batch_size` (events) and `batch_max_bytes` (payload and metadata as JSON
text); the batch read ahead counts against the same byte bound. A batch that stopped at either
bound is full, never short: only a short batch moves the checkpoint to the horizon, and "short"
is judged against the bounds the batch was read with, not those in force when it is applied
(a SIGHUP may change them in between).
"""

from __future__ import annotations

import signal
from pathlib import Path

from tests.harness import DaemonProcess, TestDatabase, bulk_credits, wait_until

EVENTS = 20_000
# Growing sizes are what lost events: a full batch read with the old, smaller size looked short.
RELOADED_SIZES = (80, 130, 70, 160, 200)

LAG = """
SELECT count(*) FROM projectord.events e, projectord.projection_positions p
WHERE p.name = %s AND e.type = 'Credited'
  AND (e.transaction_id, e.global_position) > (p.transaction_id, p.global_position)
"""


def lag(db: TestDatabase, name: str = "ledger") -> int:
    return int(db.scalar(LAG, (name,)))


def applied(db: TestDatabase) -> int:
    return int(db.scalar("SELECT count(*) FROM applied_log"))


def test_batch_size_changed_by_sighup_during_a_catch_up_loses_nothing(
    db: TestDatabase, state_dir: Path
) -> None:
    specs = "tests.batch_projections:paced_ledger"
    db.init(specs)
    with db.connect(autocommit=True) as conn:
        bulk_credits(conn, EVENTS)
    config = state_dir / "projectord.toml"
    config.write_text("batch_size = 50\n")
    with DaemonProcess(db.url, specs, state_dir, args=["--config", str(config)]) as daemon:
        for reloads, size in enumerate(RELOADED_SIZES, start=1):
            before = applied(db)
            # Reload in the middle of the catch-up: after some batches, before the end.
            wait_until(lambda b=before: applied(db) >= b + 1000 or lag(db) == 0, timeout=60)
            config.write_text(f"batch_size = {size}\n")
            daemon.process.send_signal(signal.SIGHUP)
            wait_until(
                lambda n=reloads: (
                    sum(e["event"] == "config.reloaded" for e in daemon.log_events()) >= n
                ),
                timeout=10,
            )
        assert applied(db) < EVENTS, "the catch-up ended before the reloads: nothing was tested"
        wait_until(lambda: lag(db) == 0, timeout=120)
        assert daemon.stop() == 0
    assert applied(db) == EVENTS, f"{EVENTS - applied(db)} events never applied"
    assert db.scalar("SELECT count(DISTINCT event_id) FROM applied_log") == EVENTS
    expected = db.scalar(
        "SELECT sum((payload->>'amount')::bigint) FROM projectord.events WHERE type = 'Credited'"
    )
    assert db.scalar("SELECT sum(total) FROM ledger") == expected
