"""Plan regression: the commit-order read is an index scan without a sort, mid-history."""

from __future__ import annotations

from projectord.queries import Queries
from tests.support.harness import TestDatabase, bulk_credits


def test_fetch_batch_uses_the_commit_order_index(db: TestDatabase) -> None:
    with db.connect() as conn:
        for _ in range(20):  # many transactions, so transaction_id varies
            bulk_credits(conn, 5000, accounts=100)
            conn.commit()
        conn.execute("ANALYZE projectord.events")
        conn.commit()
        middle = conn.execute(
            "SELECT transaction_id::text, global_position FROM projectord.events"
            " ORDER BY transaction_id, global_position OFFSET 50000 LIMIT 1"
        ).fetchone()
        assert middle is not None
        position = {"txid": middle[0], "position": middle[1], "types": ["Credited"]}
        bounds = {"limit": 5000, "max_event_bytes": 2**13, "max_bytes": 2**25, "alone": True}
        plans = [
            "\n".join(
                row[0]
                for row in conn.execute(
                    "EXPLAIN (ANALYZE, COSTS OFF) " + Queries("projectord")[name],
                    {**position, **bounds},
                )
            )
            for name in ("fetch_batch", "fetch_batch_by_bytes")
        ]
    for plan in plans:
        assert "events_commit_order" in plan, plan
        assert "Sort" not in plan, plan
        assert "Seq Scan on events" not in plan, plan
