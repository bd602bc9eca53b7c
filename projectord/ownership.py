"""Ownership: which daemon instance runs which projection, decided by Postgres itself.

Any number of `projectord run` processes may share one database. Each holds, on one dedicated
connection, a session advisory lock per projection it owns, plus one lock that says "this instance
is alive". Counting the live instances gives each a fair share, ceil(projections / instances):
an instance over its share gives projections up (after draining their runners), one under it
takes free ones. Session locks die with their session, so when an instance is killed (kill -9) or
loses its connection, its projections are free at once and the others take them on their next
turn. The checkpoint's compare-and-set stays the second guard: a runner that lost its lock
cannot commit a batch after the new owner moved the checkpoint.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import socket
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import anyio
import psycopg
from psycopg import AsyncConnection

from projectord.database import condemn, connect, deadline, describe_error, reap
from projectord.logs import get_logger
from projectord.queries import Queries

log = get_logger("projectord.ownership")

INSTANCE_LOCK = "projectord-instance"


class Ownership:
    """Keeps this instance's fair share of projections locked, and tells the daemon."""

    def __init__(
        self,
        dsn: str,
        schema: str,
        instance: str,
        names: Sequence[str],
        *,
        acquired: Callable[[str], Awaitable[None]],
        released: Callable[[str], Awaitable[None]],
        lost: Callable[[Sequence[str]], Awaitable[None]],
        interval: float = 1.0,
    ) -> None:
        self.dsn = dsn
        self.schema = schema
        self.instance = instance
        self.names = list(names)
        self.queries = Queries(schema)
        self.interval = interval
        self._acquired = acquired
        self._released = released
        self._lost = lost
        self.owned: list[str] = []  # in the order taken: the last taken are given up first
        self.instances = 0
        self.connected = False
        self.balanced = anyio.Event()  # set once the first rebalance has taken this one's share
        # Each instance tries projections in its own order, so instances starting together
        # spread out instead of contending for the same locks.
        self._preference = sorted(self.names, key=lambda n: _digest(f"{instance}/{n}"))

    async def run(self) -> None:
        failures = 0
        while True:
            conn: AsyncConnection[Any] | None = None
            try:
                conn = await connect(self.dsn, autocommit=True, connect_timeout=5)
                async with conn:
                    # The previous session may live on on the server after a silent partition,
                    # holding this instance's locks: end it (and any other dead session) first.
                    async with deadline(conn, "terminating dead sessions"):
                        await reap(conn)
                    await self._query(
                        conn, "try_lock_instance", {"schema": self.schema, "key": INSTANCE_LOCK}
                    )
                    self.connected = True
                    if failures:
                        log.info("ownership.reconnected", instance=self.instance)
                    failures = 0
                    await self._keep(conn)
            except (psycopg.Error, OSError) as exc:
                if conn is not None:
                    condemn(conn)  # its locks must go with it, whatever the server still thinks
                was_connected, self.connected = self.connected, False
                if was_connected or failures == 0:
                    log.warning(
                        "ownership.disconnected",
                        instance=self.instance,
                        owned=self.owned,
                        error=describe_error(exc, self.dsn),
                    )
                await self._lose_all()
                failures += 1
                await anyio.sleep(min(2.0, 0.05 * 2 ** min(failures, 6)) * random.uniform(0.5, 1))

    async def _keep(self, conn: AsyncConnection[Any]) -> None:
        """Rebalance every `interval`; between turns, watch the connection: a session that
        dies takes its locks with it, and the runners must stop at once."""
        while True:
            await self.rebalance(conn)
            self.balanced.set()
            # Wait on the socket itself: the server says something only when the session ends
            # (or with a notice), and the next rebalance's query then raises or reads it at once.
            # psycopg's own wait (conn.notifies) wakes every 0.1 s to check for interrupts; those
            # wake-ups were a good part of an idle daemon's CPU.
            with anyio.move_on_after(self.interval):
                await anyio.wait_readable(conn.fileno())

    async def rebalance(self, conn: AsyncConnection[Any]) -> None:
        row = await self._query(
            conn, "count_instances", {"schema": self.schema, "key": INSTANCE_LOCK}
        )
        self.instances = max(int(row[0]) if row else 1, 1)
        share = math.ceil(len(self.names) / self.instances)
        while len(self.owned) > share:
            name = self.owned[-1]
            await self._released(name)  # drain its runner first
            # Logged before the unlock: another instance may take it the moment it is free.
            log.info(
                "ownership.released",
                projection=name,
                instance=self.instance,
                instances=self.instances,
            )
            await self._query(conn, "release_projection", {"schema": self.schema, "key": name})
            self.owned.pop()
        for name in self._preference:
            if len(self.owned) >= share:
                break
            if name not in self.owned and await self._take(conn, name):
                self.owned.append(name)
                await self._query(conn, "record_owner", {"name": name, "owner": self.instance})
                log.info(
                    "ownership.acquired",
                    projection=name,
                    instance=self.instance,
                    instances=self.instances,
                )
                await self._acquired(name)

    async def _take(self, conn: AsyncConnection[Any], key: str) -> bool:
        row = await self._query(conn, "try_lock_projection", {"schema": self.schema, "key": key})
        return bool(row and row[0])

    async def _query(
        self, conn: AsyncConnection[Any], name: str, params: dict[str, Any]
    ) -> tuple[Any, ...] | None:
        """One of ownership's statements, bounded: a session that does not answer is taken for
        dead (its locks are then someone else's to take), never waited on forever."""
        async with deadline(conn, f"ownership's {name}"):
            cur = await conn.execute(self.queries[name], params)
            return await cur.fetchone() if cur.description else None

    async def _lose_all(self) -> None:
        if self.owned:
            lost, self.owned = self.owned, []
            await self._lost(lost)  # their runners stop first: nothing commits after the line
            log.warning("ownership.lost", projections=lost, instance=self.instance)


def _digest(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


def default_instance_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"
