"""Waiting for projections to catch up with a point in the event history.

A target is a commit position `(transaction_id, global_position)`; a projection has caught up with
it once its checkpoint is at or past it. `projectord wait` targets the last event of each
projection's types committed before the call; a read-your-writes dispatch targets the events its
command appended. Both poll the checkpoints with a deadline: checkpoints move without notifying.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import anyio

from projectord.checkpoint import Checkpoint
from projectord.projection import Projection
from projectord.queries import Queries
from projectord.runner.checkpoint_store import CheckpointStore

POLL_INTERVAL = 0.05  # seconds between checkpoint reads while waiting


async def latest_positions(
    conn: Any, queries: Queries, projections: Sequence[Projection]
) -> dict[str, Checkpoint]:
    """Per projection, the last committed event of its types (none: the projection is left out)."""
    targets: dict[str, Checkpoint] = {}
    for projection in projections:
        cur = await conn.execute(
            queries["latest_event_of_types"], {"types": list(projection.event_types)}
        )
        row = await cur.fetchone()
        if row is not None:
            targets[projection.name] = Checkpoint.parse(row[0], row[1])
    return targets


async def wait_for_positions(
    conn: Any, queries: Queries, targets: Mapping[str, Checkpoint], *, timeout: float
) -> list[str]:
    """Wait until each named projection's checkpoint has reached its target. Returns the names
    still behind when `timeout` ran out (empty: all caught up)."""
    store = CheckpointStore(queries)
    behind = dict(targets)
    deadline = time.monotonic() + timeout
    while behind:
        for name, target in list(behind.items()):
            stored = await store.read(conn, name)
            if stored is not None and stored.checkpoint >= target:
                del behind[name]
        if not behind or time.monotonic() >= deadline:
            break
        await anyio.sleep(POLL_INTERVAL)
    return sorted(behind)


async def wait_for_projections(
    conn: Any, queries: Queries, projections: Sequence[Projection], *, timeout: float
) -> bool:
    """Wait until each projection's checkpoint has passed the last event of its types that was
    committed when the call began."""
    targets = await latest_positions(conn, queries, projections)
    return not await wait_for_positions(conn, queries, targets, timeout=timeout)
