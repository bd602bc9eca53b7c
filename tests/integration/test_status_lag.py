"""The status snapshot counts each projection's lag from its stored checkpoint; the lags of all
projections are asked in one round trip, and each must still come back to its own projection."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import anyio

from projectord import Projection
from projectord.control.status import StatusReporter
from projectord.database import make_pool
from projectord.queries import Queries
from projectord.runner.loop import ProjectionRunner
from tests.support.harness import TestDatabase
from tests.support.ops_support import append


def projection(name: str, *types: str) -> Projection:
    attributes = {"name": name, "event_types": types, "handle": lambda self, events, conn: None}
    return type(name.title(), (Projection,), attributes)()  # type: ignore[no-any-return]


def test_every_projection_gets_its_own_lag(db: TestDatabase) -> None:
    append(db, "Alpha", {}, count=3)
    append(db, "Beta", {}, count=5)
    # Checkpoints: `alpha` just past its first event, `both` past everything, `beta` at the
    # start, and `never` has no positions row at all.
    with db.connect(autocommit=True) as conn:
        conn.execute(
            "INSERT INTO projectord.projection_positions (name, transaction_id, global_position)"
            " SELECT 'alpha', transaction_id, global_position FROM projectord.events"
            " WHERE type = 'Alpha' ORDER BY transaction_id, global_position LIMIT 1"
        )
        conn.execute(
            "INSERT INTO projectord.projection_positions (name, transaction_id, global_position)"
            " SELECT 'both', transaction_id, global_position FROM projectord.events"
            " ORDER BY transaction_id DESC, global_position DESC LIMIT 1"
        )
        conn.execute("INSERT INTO projectord.projection_positions (name) VALUES ('beta')")
    projections = [
        projection("alpha", "Alpha"),
        projection("beta", "Beta"),
        projection("both", "Alpha", "Beta"),
        projection("never", "Alpha", "Gamma"),
    ]

    async def snapshot() -> dict[str, Any]:
        pool = make_pool(db.url, max_size=2, read_model_schema="public", name="status-test")
        await pool.open(wait=True)
        try:
            queries = Queries("projectord")
            runners = [
                ProjectionRunner(p, pool, queries, batch_size=100, poll_interval=5)
                for p in projections
            ]
            listener: Any = SimpleNamespace(connected=True, reconnects=0)
            return await StatusReporter(runners, pool, queries, listener).snapshot()
        finally:
            await pool.close()

    report = anyio.run(snapshot)
    assert report["database"] == {
        "reachable": True,
        "error": None,
        "notification_queue_usage": 0.0,
    }
    lags = {p["name"]: (p["lag"], p["caught_up"]) for p in report["projections"]}
    assert lags == {
        "alpha": (2, False),
        "beta": (5, False),
        "both": (0, True),
        "never": (3, False),
    }
