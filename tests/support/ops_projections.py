"""Projections for the operations tests: one whose batches can be made slow, and one whose loop
can be wedged on purpose, the way a handler stuck in a C call or a forgotten lock would wedge it.

Both only misbehave on events that ask for it (`{"sleep": seconds}`, `{"wedge": true}`), so the
production code has no test hooks: the misbehaviour lives here, in the test build's projections.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import anyio
from psycopg import AsyncConnection

from projectord import Event, Projection, Table
from tests.support.projections import Ledger, Picky


class Slow(Projection):
    """Writes one row per event; a batch holding `{"sleep": s}` events sleeps s seconds in the
    middle of its transaction, after its first writes (so a half-applied batch would show)."""

    name = "slow"
    event_types = ("Slow",)
    tables = {"slow_seen": Table({"event_id": "uuid PRIMARY KEY", "position": "bigint NOT NULL"})}

    async def handle(self, events: Sequence[Event], conn: AsyncConnection[Any]) -> None:
        half = len(events) // 2 or 1
        await self._insert(events[:half], conn)
        delay = sum(float(e.payload.get("sleep", 0)) for e in events)
        if delay:
            await anyio.sleep(delay)
        await self._insert(events[half:], conn)

    @staticmethod
    async def _insert(events: Sequence[Event], conn: AsyncConnection[Any]) -> None:
        """Insert, and read back what was inserted: a handler that reads a result waits for
        its statements to run, so the first writes are on the server while the batch sleeps
        (in the runner's pipeline mode they would otherwise go out with the COMMIT)."""
        if events:
            cur = await conn.execute(
                "INSERT INTO slow_seen SELECT * FROM unnest(%s::uuid[], %s::bigint[])"
                " RETURNING position",
                ([e.event_id for e in events], [e.global_position for e in events]),
            )
            assert len(await cur.fetchall()) == len(events)


class Wedge(Projection):
    """On a `{"wedge": true}` event its handler never returns and cannot be cancelled."""

    name = "wedge"
    event_types = ("Wedge",)

    async def on(self, event: Event, conn: AsyncConnection[Any]) -> None:
        if event.payload.get("wedge"):
            with anyio.CancelScope(shield=True):
                await anyio.sleep_forever()


def slow_and_ledger() -> list[Projection]:
    return [Slow(), Ledger()]


def wedge_and_ledger() -> list[Projection]:
    return [Wedge(), Ledger()]


def ledger_and_picky() -> list[Projection]:
    return [Ledger(), Picky()]
