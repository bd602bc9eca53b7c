"""Commit order: events whose transactions commit out of position order are each applied once."""

from __future__ import annotations

import random
import threading
import uuid
from pathlib import Path

import psycopg

from tests.support.harness import DaemonProcess, TestDatabase, append_sql, wait_until

LEDGER = "tests.support.projections:ledger_only"


def ledger_state(db: TestDatabase) -> dict[int, tuple[int, int]]:
    return {a: (t, n) for a, t, n in db.rows("SELECT account, total, events FROM ledger")}


def fold_of_committed_events(db: TestDatabase) -> dict[int, tuple[int, int]]:
    rows = db.rows(
        "SELECT (payload->>'account')::bigint, sum((payload->>'amount')::bigint), count(*)"
        " FROM projectord.events WHERE type = 'Credited' GROUP BY 1"
    )
    return {a: (int(t), int(n)) for a, t, n in rows}


def assert_applied_exactly_once(db: TestDatabase) -> None:
    assert (
        db.scalar("SELECT count(*) FROM applied_log GROUP BY event_id HAVING count(*) > 1 LIMIT 1")
        is None
    ), "an event was applied twice"
    assert (
        db.scalar(
            "SELECT count(*) FROM projectord.events e WHERE e.type = 'Credited'"
            " AND NOT EXISTS (SELECT 1 FROM applied_log a WHERE a.event_id = e.event_id)"
        )
        == 0
    ), "an event was never applied"
    assert ledger_state(db) == fold_of_committed_events(db)


def applied_count(db: TestDatabase) -> int:
    return db.scalar("SELECT count(*) FROM applied_log")


def test_out_of_order_commit_applies_both_once(db: TestDatabase, state_dir: Path) -> None:
    db.init(LEDGER)
    with DaemonProcess(db.url, LEDGER, state_dir):
        with db.connect() as a, db.connect() as b:
            append_sql(a, "Credited", {"account": 1, "amount": 10})  # takes the lower position
            append_sql(b, "Credited", {"account": 2, "amount": 20})
            b.commit()  # commits first, with the higher position
            # B is committed but sits above A's xid: it must wait for A, not be applied past it.
            wait_until(lambda: db.scalar("SELECT count(*) FROM projectord.events") == 1, timeout=5)
            a.commit()
        wait_until(lambda: applied_count(db) == 2, timeout=10)
        positions = [p for (p,) in db.rows("SELECT global_position FROM applied_log")]
        assert sorted(positions) == [1, 2]
    assert_applied_exactly_once(db)


def test_out_of_order_commit_with_rollback(db: TestDatabase, state_dir: Path) -> None:
    db.init(LEDGER)
    with DaemonProcess(db.url, LEDGER, state_dir):
        with db.connect() as a, db.connect() as b:
            append_sql(a, "Credited", {"account": 1, "amount": 10})
            append_sql(b, "Credited", {"account": 2, "amount": 20})
            b.commit()
            a.rollback()
        wait_until(lambda: applied_count(db) == 1, timeout=10)
        append_sql_committed(db, account=3, amount=30)
        wait_until(lambda: applied_count(db) == 2, timeout=10)
    assert ledger_state(db) == {2: (20, 1), 3: (30, 1)}
    assert_applied_exactly_once(db)


def append_sql_committed(db: TestDatabase, *, account: int, amount: int) -> None:
    with db.connect() as conn:
        append_sql(conn, "Credited", {"account": account, "amount": amount})


def test_many_concurrent_writers_with_delays_and_rollbacks(
    db: TestDatabase, state_dir: Path
) -> None:
    db.init(LEDGER)
    committed = []
    errors: list[BaseException] = []

    def writer(seed: int) -> None:
        rng = random.Random(seed)
        try:
            with psycopg.connect(db.url) as conn:
                for _ in range(40):
                    for _ in range(rng.randint(1, 4)):
                        append_sql(
                            conn,
                            "Credited",
                            {"account": rng.randint(1, 20), "amount": rng.randint(1, 9)},
                        )
                    # Random delay before commit: later positions often commit first.
                    threading.Event().wait(rng.uniform(0, 0.02))
                    if rng.random() < 0.15:
                        conn.rollback()
                    else:
                        conn.commit()
                        committed.append(seed)
        except BaseException as exc:  # pragma: no cover - surfaced below
            errors.append(exc)

    with DaemonProcess(db.url, LEDGER, state_dir, extra_env={"PROJECTORD_BATCH_SIZE": "7"}):
        threads = [threading.Thread(target=writer, args=(seed,)) for seed in range(10)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors
        total = db.scalar("SELECT count(*) FROM projectord.events")
        assert total > 0
        wait_until(lambda: applied_count(db) >= total, timeout=30)
    assert_applied_exactly_once(db)


def test_rare_event_types_do_not_rescan_history(db: TestDatabase, state_dir: Path) -> None:
    """A projection whose batch comes back short moves its checkpoint to the safe horizon."""
    db.init("tests.support.projections:Rare")
    with db.connect() as conn:
        conn.execute(
            "INSERT INTO projectord.events (tenant_id, aggregate_id, version, type)"
            " SELECT gen_random_uuid(), gen_random_uuid(), 1, 'Noted' FROM generate_series(1, 500)"
        )
    with DaemonProcess(db.url, "tests.support.projections:Rare", state_dir):
        with db.connect() as conn:
            append_sql(conn, "Rare", {})
        wait_until(lambda: db.scalar("SELECT count(*) FROM rare_seen") == 1, timeout=10)
        checkpoint = db.rows(
            "SELECT transaction_id, global_position FROM projectord.projection_positions"
            " WHERE name = 'rare'"
        )[0]
        last = db.rows(
            "SELECT transaction_id, global_position FROM projectord.events"
            " ORDER BY transaction_id DESC, global_position DESC LIMIT 1"
        )[0]
        # Not stuck at its last own event: the checkpoint passed everything below the horizon.
        assert int(str(checkpoint[0])) > int(str(last[0]))
        assert checkpoint[1] == 0
    assert uuid.UUID(str(db.scalar("SELECT event_id FROM rare_seen")))
