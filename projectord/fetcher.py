"""Reading a projection's next batch in commit order: cheaply, and ahead of time.

A catch-up spends most of its client time turning rows into events, not in the query (an index
scan returns 5000 rows in a few milliseconds). So the batch is fetched in binary (UUIDs and
integers arrive without text parsing), `payload` and `metadata` travel as JSON text, the event id
as its 16 bytes and `recorded_at` as the 64-bit integer its binary form is (microseconds since
2000-01-01), which `Event` decodes only when a handler reads them; the transaction id, an xid8,
is read from its binary form as an integer too.

`ReadAhead` reads the next batch on a second connection while the current one is applied: the
server works on the batch's writes while this process turns the next rows into events, which on
a two-core machine runs the two halves of a catch-up side by side. A batch read ahead is only used
if the runner is still at the position it was read from (a rebuild, a skip or a failure in
between throws it away), and it is as safe as any other fetch: it carries the horizon of its own
snapshot.

A batch is bounded in bytes as well as in events (`batch_max_bytes`, counting each event's
payload and metadata as the JSON text the fetch receives), and the server cuts it: the rows past
the bound are never sent, so the bound holds on the wire and in this process, not only after the
fact. An event larger than the bound still comes, alone in its batch. A batch read ahead gets
only what the batch being applied leaves of the bound, and no oversized event, so one runner
holds at most `batch_max_bytes` of events text at a time (docs/batches.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from operator import attrgetter, itemgetter
from typing import Any

from psycopg import AsyncConnection, AsyncCursor
from psycopg.postgres import types as postgres_types
from psycopg.pq import Format
from psycopg_pool import AsyncConnectionPool

from projectord.checkpoint import Checkpoint
from projectord.database import deadline
from projectord.event_store import Event
from projectord.logs import get_logger
from projectord.queries import Queries

log = get_logger("projectord.fetcher")

_commit_order = attrgetter("transaction_id", "global_position")
# How long a read-ahead waits for a free connection before it gives up (seconds): it is an
# optimisation and must never hold up a runner.
READ_AHEAD_CONNECTION_TIMEOUT = 0.05
# The default byte bound of a batch (payload and metadata as JSON text), and of a batch and the
# one read ahead together.
DEFAULT_BATCH_MAX_BYTES = 32 * 2**20
# Rows asked for beyond what the byte bound should hold, at the last batch's bytes per event
# (as a fraction): the server converts every row asked for, sent or not.
ROWS_HEADROOM = 0.25
# An event's payload text in a row of `fetch_batch`: NULL when it exceeds the cheap bound.
_payload_of = itemgetter(10)
# Types a fetch reads as the 64-bit integers their binary forms are: `recorded_at`, microseconds
# since 2000-01-01 (a datetime is made only if a handler reads it), and the transaction id.
_AS_INTEGERS = tuple(postgres_types[name].oid for name in ("timestamptz", "xid8"))
_INT8 = postgres_types["int8"].oid


@dataclass
class Batch:
    """Events read in one snapshot, with what the read was bounded by.

    `limit` is the count the batch was read with, not the runner's batch size now: a reload may
    change that between the read and the apply (or while a batch is read ahead), and a batch read
    with a smaller limit would then look short and move the checkpoint over events never read."""

    events: list[Event]
    horizon: int
    held_back: bool
    limit: int
    cut: bool = False  # the byte bound stopped it: more events were there
    bytes: int = 0  # its events' payload and metadata text

    @property
    def last(self) -> Checkpoint:
        return self.events[-1].commit_position

    @property
    def short(self) -> bool:
        """Fewer events than asked for, and not for lack of room: every event below the horizon
        has been seen. A batch cut by the byte bound is not short."""
        return len(self.events) < self.limit and not self.cut


class Fetcher:
    """Fetches a projection's batches: events of its types, at most `limit` at a time and at
    most `max_bytes` of their payload and metadata text.

    Two reads: `fetch_batch` bounds the bytes cheaply, by leaving out the text of any event
    larger than `max_bytes / (2 * limit)`, and the batch ends before such an event; from there,
    `fetch_batch_by_bytes` bounds a running sum, which costs the server a window over the rows
    (about as much again as the whole read), so it is used only while events are that large.
    The cheap read's batch takes at most half the bound: the other half is left for the batch
    read ahead."""

    def __init__(self, queries: Queries, types: list[str]) -> None:
        self.queries = {name: queries[name] for name in ("fetch_batch", "fetch_batch_by_bytes")}
        self.types = types
        self._size_class = _size_class(0)
        # Bytes per event in the last batch read by bytes; 0 while events fit the cheap bound.
        self._bytes_per_event = 0

    def _query_for_size(self, name: str) -> str:
        """The fetch, told apart by the table's size class. psycopg prepares a statement on its
        fifth run and the server keeps the plan; one made while the table was small (a
        sequential scan and a sort) would cost more with every event appended. A new size class
        (the table doubled) is a new statement, planned afresh
        (tests/integration/test_batch_transaction.py).
        Planning every fetch instead would cost about 0.2 ms of a live batch's round trip."""
        return f"/* size class {self._size_class} */ {self.queries[name]}"

    async def fetch(
        self,
        conn: AsyncConnection[Any],
        after: Checkpoint,
        limit: int,
        max_bytes: int = DEFAULT_BATCH_MAX_BYTES,
        *,
        alone: bool = True,
    ) -> Batch:
        """The events after `after` in commit order, below the horizon of the query's snapshot:
        at most `limit` of them and `max_bytes` of their text, or a first event larger than that
        alone (unless not `alone`: then such an event is not read and the batch is empty)."""
        max_event_bytes = max_bytes // (2 * limit)
        if self._bytes_per_event <= max_event_bytes:
            batch = await self._fetch_small(conn, after, limit, max_event_bytes)
            if batch is not None:
                return batch
        return await self._fetch_by_bytes(conn, after, limit, max_bytes, alone)

    async def _execute(
        self, conn: AsyncConnection[Any], name: str, after: Checkpoint, **params: Any
    ) -> tuple[list[Any], int, bool]:
        """Run a fetch; returns its rows, the horizon and whether events are held back."""
        cur = _fetch_cursor(conn)
        await cur.execute(
            self._query_for_size(name),
            {"txid": str(after[0]), "position": after[1], "types": self.types, **params},
        )
        rows = await cur.fetchall()
        self._size_class = max(self._size_class, _size_class(rows[0][2]))
        return rows, int(rows[0][0]), bool(rows[0][1])

    async def _fetch_small(
        self, conn: AsyncConnection[Any], after: Checkpoint, limit: int, max_event_bytes: int
    ) -> Batch | None:
        """The cheap read: the events before the first one larger than `max_event_bytes`, or
        None when the first one is (then only a running sum bounds the batch)."""
        rows, horizon, held_back = await self._execute(
            conn, "fetch_batch", after, limit=limit, max_event_bytes=max_event_bytes
        )
        if rows[0][3] is None:
            return Batch([], horizon, held_back, limit)
        cut = None in map(_payload_of, rows)  # in C: a list comprehension cost 2 % of a catch-up
        # After a cut, the next event is a large one: read on from it by bytes.
        self._bytes_per_event = max_event_bytes + 1 if cut else 0
        if cut:
            rows = rows[: list(map(_payload_of, rows)).index(None)]
            if not rows:
                return None
        events = _events(rows, 3)
        return Batch(events, horizon, held_back, limit, cut, len(events) * max_event_bytes)

    async def _fetch_by_bytes(
        self,
        conn: AsyncConnection[Any],
        after: Checkpoint,
        limit: int,
        max_bytes: int,
        alone: bool,
    ) -> Batch:
        rows_asked = self._rows_for(limit, max_bytes)
        rows, horizon, held_back = await self._execute(
            conn, "fetch_batch_by_bytes", after, limit=rows_asked, max_bytes=max_bytes, alone=alone
        )
        events = _events(rows, 5) if rows[0][5] is not None else []
        batch = Batch(events, horizon, held_back, rows_asked)
        if events:
            batch.bytes, batch.cut = int(rows[-1][3]), bool(rows[-1][4])
            self._bytes_per_event = max(batch.bytes // len(events), 1)
        return batch

    def _rows_for(self, limit: int, max_bytes: int) -> int:
        """How many rows to ask for when reading by bytes: `limit`, or fewer when events have
        been large. The server reads and converts every row asked for, also those the byte
        bound then leaves out; at 400 kB an event, 2000 rows asked for 80 sent would cost it 25
        times the work. A batch of fewer rows than `limit` that fills them is full, so asking too
        few costs only smaller batches until the next estimate."""
        if not self._bytes_per_event:
            return limit
        fits = int(max_bytes * (1 + ROWS_HEADROOM)) // self._bytes_per_event
        return min(limit, fits + 1)


def _fetch_cursor(conn: AsyncConnection[Any]) -> AsyncCursor[Any]:
    """A binary cursor that reads timestamptz and xid8 columns as integers, with the connection's
    own (C) loader of int8: the server sends both as 64-bit integers, where an epoch computed in
    SQL (numeric arithmetic) and a transaction id's text cost it about 0.35 µs a row. Only this
    cursor's adapters change; a handler on the same connection still gets datetimes."""
    cur = conn.cursor(binary=True)
    integer = cur.adapters.get_loader(_INT8, Format.BINARY)
    assert integer is not None
    for oid in _AS_INTEGERS:
        cur.adapters.register_loader(oid, integer)
    return cur


def _events(rows: list[Any], first_column: int) -> list[Event]:
    """The rows' events, in commit order. The query returns that order; sorting an already
    sorted list is a linear check (in C) that keeps the guarantee even if a future plan stopped
    preserving it."""
    events = [Event(*row[first_column:]) for row in rows]
    events.sort(key=_commit_order)
    return events


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

    async def read(self, after: Checkpoint, limit: int, max_bytes: int) -> None:
        """Read the batch after `after` if a connection is free, within `max_bytes` (what the
        batch being applied leaves of the bound). A failure only loses the head start (the
        runner fetches the batch itself and meets the error there), and so does a batch that
        came back empty: it may be empty only because its first event did not fit, and the
        runner would take an empty batch for "nothing until the horizon"."""
        self.discard()
        if not self.has_spare_connection():
            return
        try:
            async with self.pool.connection(timeout=READ_AHEAD_CONNECTION_TIMEOUT) as conn:
                async with deadline(conn, "a read-ahead fetch"):
                    batch = await self.fetcher.fetch(conn, after, limit, max_bytes, alone=False)
        except Exception as exc:  # PoolTimeout, a lost connection, a cancelled statement
            log.debug("read_ahead.failed", error=str(exc))
            return
        if batch.events:
            self._after, self._batch = after, batch
