"""Reading a projection's next batch in commit order: cheaply, and ahead of time.

A catch-up spends most of its client time turning rows into events, not in the query (an index
scan returns 5000 rows in a few milliseconds). So the batch is fetched in binary (UUIDs and
integers arrive without text parsing), `payload` and `metadata` travel as JSON text and
`recorded_at` as epoch microseconds, which `Event` decodes only when a handler reads them.

`ReadAhead` reads the next batch on a second connection while the current one is applied: the
server works on the batch's writes while this process turns the next rows into events, which on
a two-core machine runs the two halves of a catch-up side by side. A batch read ahead is only used
if the runner is still at the position it was read from (a rebuild, a skip or a failure in
between throws it away), and it is as safe as any other fetch: it carries the horizon of its own
snapshot.
"""

from __future__ import annotations

from dataclasses import dataclass
from operator import attrgetter
from typing import Any

from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from projectord.database import deadline
from projectord.event_store import Event
from projectord.logs import get_logger
from projectord.queries import Queries

log = get_logger("projectord.fetcher")

Checkpoint = tuple[int, int]  # (transaction_id, global_position)

_commit_order = attrgetter("transaction_id", "global_position")
# How long a read-ahead waits for a free connection before it gives up (seconds): it is an
# optimisation and must never hold up a runner.
READ_AHEAD_CONNECTION_TIMEOUT = 0.05


@dataclass
class Batch:
    events: list[Event]
    horizon: int
    held_back: bool

    @property
    def last(self) -> Checkpoint:
        return self.events[-1].commit_position


class Fetcher:
    """Fetches a projection's batches: events of its types, at most `limit` at a time."""

    def __init__(self, queries: Queries, types: list[str]) -> None:
        self.query = queries["fetch_batch"]
        self.types = types
        self._size_class = _size_class(0)

    def _query_for_size(self) -> str:
        """The fetch, told apart by the table's size class. psycopg prepares a statement on its
        fifth run and the server keeps the plan; one made while the table was small (a
        sequential scan and a sort) would cost more with every event appended. A new size class
        (the table doubled) is a new statement, planned afresh (tests/test_batch_transaction.py).
        Planning every fetch instead would cost about 0.2 ms of a live batch's round trip."""
        return f"/* size class {self._size_class} */ {self.query}"

    async def fetch(self, conn: AsyncConnection[Any], after: Checkpoint, limit: int) -> Batch:
        """The events after `after` in commit order, below the horizon of the query's snapshot."""
        cur = conn.cursor(binary=True)
        await cur.execute(
            self._query_for_size(),
            {
                "txid": str(after[0]),
                "position": after[1],
                "types": self.types,
                "limit": limit,
            },
        )
        rows = await cur.fetchall()
        horizon, held_back, newest = rows[0][0], rows[0][1], rows[0][2]
        self._size_class = max(self._size_class, _size_class(newest))
        events = [Event(*row[3:]) for row in rows if row[3] is not None]
        # The query returns commit order; sorting an already sorted list is a linear check (in C)
        # that keeps the guarantee even if a future plan stopped preserving it.
        events.sort(key=_commit_order)
        return Batch(events, int(horizon), bool(held_back))


def _size_class(newest_position: int) -> int:
    """log2 of the table's size, from 1024 events up: a fetch plan holds until it doubles."""
    return max(int(newest_position), 1024).bit_length()


class ReadAhead:
    """At most one batch read ahead, remembered with the position it was read from."""

    def __init__(self, fetcher: Fetcher, pool: AsyncConnectionPool) -> None:
        self.fetcher = fetcher
        self.pool = pool
        self._after: Checkpoint | None = None
        self._batch: Batch | None = None
        self.used = 0  # batches the runner took from here instead of fetching them itself

    def take(self, after: Checkpoint) -> Batch | None:
        """The batch read from `after`, if there is one; either way nothing is kept."""
        batch = self._batch if self._after == after else None
        self.discard()
        if batch is not None:
            self.used += 1
        return batch

    def discard(self) -> None:
        self._after = self._batch = None

    def has_spare_connection(self) -> bool:
        stats = self.pool.get_stats()
        return stats.get("pool_available", 0) > 0 or stats.get("pool_size", 0) < self.pool.max_size

    async def read(self, after: Checkpoint, limit: int) -> None:
        """Read the batch after `after` if a connection is free; a failure only loses the
        head start (the runner fetches the batch itself and meets the error there)."""
        self.discard()
        if not self.has_spare_connection():
            return
        try:
            async with self.pool.connection(timeout=READ_AHEAD_CONNECTION_TIMEOUT) as conn:
                async with deadline(conn, "a read-ahead fetch"):
                    batch = await self.fetcher.fetch(conn, after, limit)
        except Exception as exc:  # PoolTimeout, a lost connection, a cancelled statement
            log.debug("read_ahead.failed", error=str(exc))
            return
        self._after, self._batch = after, batch
