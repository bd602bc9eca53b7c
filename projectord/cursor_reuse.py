"""Cursor reuse for `on` handlers: `conn.execute` without building and freeing a cursor each time.

psycopg's `conn.execute` creates a cursor, and with it a `Transformer` that looks up a dumper for
each parameter's type; once the statement's results have been processed nothing references the
cursor, and all of it is freed. For an `on` handler in pipeline mode (one small statement per
event) that life cycle was 11-17 % of the client's CPU per event. A cursor that executes the
same query again keeps its Transformer and the dumpers it found (psycopg's own rule, in
`BaseCursor._start_query`), so handing the same cursor out again saves most of it.

`reused_cursors(conn)` installs, for one batch, a `cursor_factory` (a public, writable attribute of
psycopg's connections) that hands a cursor out again only when that cannot be told from a new one:

- nothing references it but the factory: not the handler (a `cur` it still holds, in a local, a
  list or an iterator), not psycopg's pipeline (whose queue holds a cursor until its results have
  arrived and been processed). `sys.getrefcount` tells, against the count of a cursor that only
  the factory holds. (A weak reference is not counted: code that keeps cursors only through weak
  references would see them reused.)
- it is open, and its adapters still adapt like the connection's: nothing was registered on
  either since it was made (a dumper, a loader, a type). Nor have the session settings that
  adapters read (`client_encoding`, `TimeZone`, `DateStyle`, `IntervalStyle`) changed since the
  batch began; if they do, the factory makes only new cursors for the rest of the batch.
- what a caller may set on a cursor is set as on a new one (`format`, `arraysize`,
  `row_factory`); `execute` resets the rest (results, position, row count, status message).

Anything else (a connection with its own `cursor_factory`, a psycopg whose adapters maps are built
differently, a Python without the global interpreter lock) leaves the connection as it is.
"""

from __future__ import annotations

import sys
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from psycopg import AsyncConnection, AsyncCursor
from psycopg.adapt import AdaptersMap
from psycopg.pq import Format

TEXT = Format.TEXT

# Most cursors a factory keeps. In pipeline mode a cursor stays referenced until the server's
# results reach the client, which can be a few hundred statements later; a cursor the handler keeps
# for good reaches the front of the queue and is let go once the queue is full.
POOL_LIMIT = 512


def _same_adapters(a: AdaptersMap, b: AdaptersMap) -> bool:
    """Whether two maps adapt alike. A cursor's map starts out sharing each copy-on-write part
    with the connection's (psycopg/_adapters_map.py, _typeinfo.py); registering anything on either
    map replaces the part it changes. The containers below hold those parts, and comparing them
    compares the parts by identity first (fast); the types registry is itself such a part, and
    `==` on it would walk its few hundred entries: identity only."""
    return (
        a.types._registry is b.types._registry
        and a._dumpers == b._dumpers
        and a._dumpers_by_oid == b._dumpers_by_oid
        and a._loaders == b._loaders
    )


def _supported(conn: AsyncConnection[Any]) -> bool:
    if conn.cursor_factory is not AsyncCursor:
        return False
    if getattr(sys, "_is_gil_enabled", lambda: True)() is False:
        return False  # reference counts are not exact without the GIL
    try:
        return _same_adapters(conn.adapters, AdaptersMap(conn.adapters))
    except (AttributeError, TypeError):  # another psycopg's internals
        return False


class CursorPool:
    """A `cursor_factory` for one connection and one batch (see the module's docstring)."""

    def __init__(self, conn: AsyncConnection[Any]) -> None:
        self._conn = conn
        self._cursors: deque[AsyncCursor[Any]] = deque()
        self._settings = self._session_settings()
        # getrefcount of a cursor only the pool holds: set on first use; -1 once reuse is off
        self._unreferenced = 0
        self.created = self.reused = 0

    def _session_settings(self) -> tuple[bytes | None, ...]:
        status = self._conn.pgconn.parameter_status
        return (status(b"client_encoding"), status(b"TimeZone"), status(b"DateStyle"),
                status(b"IntervalStyle"))  # fmt: skip

    def __call__(self, conn: AsyncConnection[Any], *, row_factory: Any = None) -> AsyncCursor[Any]:
        cursors = self._cursors
        # `getrefcount(cursors[0])` counts the deque's reference and its own argument only when
        # nothing else holds the cursor; the same expression calibrates it below.
        if cursors and sys.getrefcount(cursors[0]) == self._unreferenced:
            cur = cursors.popleft()
            if (
                not cur.closed
                and self._session_settings() == self._settings
                and _same_adapters(cur.adapters, conn.adapters)
            ):
                wanted = row_factory or conn.row_factory
                if cur.row_factory is not wanted:
                    cur.row_factory = wanted
                cur.format = TEXT
                cur.arraysize = 1
                cursors.append(cur)
                self.reused += 1
                return cur
            if self._session_settings() != self._settings:
                # Adapters made before the change may be stale: only new cursors from now on.
                cursors.clear()
                self._unreferenced = -1
        self.created += 1
        if self._unreferenced < 0:
            return AsyncCursor(conn, row_factory=row_factory)
        cursors.append(AsyncCursor(conn, row_factory=row_factory))
        if not self._unreferenced:
            self._unreferenced = sys.getrefcount(cursors[-1])
        if len(cursors) > POOL_LIMIT:
            cursors.popleft()
        return cursors[-1]


@asynccontextmanager
async def reused_cursors(conn: AsyncConnection[Any]) -> AsyncIterator[CursorPool | None]:
    """Within the block, `conn.execute` and `conn.cursor()` hand out unreferenced cursors again
    (see the module's docstring); yields the pool, or None where reuse is not supported."""
    if not _supported(conn):
        yield None
        return
    pool = CursorPool(conn)
    conn.cursor_factory = pool  # type: ignore[assignment]
    try:
        yield pool
    finally:
        if conn.cursor_factory is pool:
            conn.cursor_factory = AsyncCursor
