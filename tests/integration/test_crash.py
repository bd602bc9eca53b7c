"""kill -9 during a large catch-up, restarted each time: the end state is exact."""

from __future__ import annotations

import random
from pathlib import Path

from tests.integration.test_ordering import assert_applied_exactly_once
from tests.support.harness import DaemonProcess, TestDatabase, bulk_credits, wait_until

LEDGER = "tests.support.projections:ledger_only"


def test_kill_9_during_catch_up(db: TestDatabase, state_dir: Path) -> None:
    db.init(LEDGER)
    total = 60_000
    with db.connect() as conn:
        bulk_credits(conn, total, accounts=500)
    rng = random.Random(7)
    kills = 0

    def applied() -> int:
        return (
            db.scalar(
                "SELECT applied_total FROM projectord.projection_positions WHERE name = 'ledger'"
            )
            or 0
        )

    env = {"PROJECTORD_BATCH_SIZE": "500"}
    while applied() < total and kills < 6:
        daemon = DaemonProcess(db.url, LEDGER, state_dir, extra_env=env).wait_started()
        start = applied()
        # Let it apply a few batches, then kill it without warning, mid-stream.
        wait_until(
            lambda start=start: applied() >= start + rng.randint(500, 6000) or applied() >= total,
            timeout=30,
            interval=0.005,
        )
        daemon.kill()
        kills += 1
    assert kills >= 3, "the catch-up finished before the daemon was killed three times"
    with DaemonProcess(db.url, LEDGER, state_dir, extra_env=env):
        wait_until(lambda: applied() == total, timeout=60)
    assert db.scalar("SELECT count(*) FROM applied_log") == total
    assert_applied_exactly_once(db)
