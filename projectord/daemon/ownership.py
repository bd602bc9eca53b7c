"""Ownership: which daemon instance runs which projection, decided by Postgres itself.

Any number of `projectord run` processes may share one database. Each holds, on one dedicated
connection, a session advisory lock per projection it owns, plus one lock that says "this instance
is alive". Counting the live instances gives each a fair share, ceil(projections / instances):
an instance over its share gives projections up (after draining their runners), one under it
takes free ones. Session locks die with their session, so when an instance is killed (kill -9) or
loses its connection, its projections are free at once and the others take them on their next
turn. The checkpoint's compare-and-set stays the second guard: a runner that lost its lock
cannot commit a batch after the new owner moved the checkpoint.

Advisory locks need no privilege, so their keys are random and kept in `<schema>.lock_keys`, which
only the daemon's role can read (migration 0014): a role that can merely connect cannot take a
projection's lock before a daemon does. A held key shows in pg_locks, though, and a stranger who
saw it may take it once it is free (at a rebalance or a restart). A daemon that finds a key held
only by strangers draws a new one, and every daemon uses that from its next turn; fellow daemons
are counted only among sessions of the daemon's role (docs/security-locks.md). A lock taken under a
key that was redrawn meanwhile is released at once, and a daemon that holds a projection names
itself in its positions row again whenever the row names another.

Versioned projections (projectord/daemon/versions.py): a unit of ownership is a projection *and*
a version. `eligible`, asked every turn, says which units this daemon's code may own now; one it
owns that is no longer eligible (its version was superseded, or its build was swapped in) is given
up like a surplus one. Builds (`extra`) do not count against the fair share: a build that only
new-code daemons can run must not wait for a share that live projections fill. And since daemons
of different versions cannot take each other's projections, the fair share may leave one free
that only a full daemon could run: a projection this daemon may run that no session has held for
FREE_TURNS turns in a row is taken beyond the share, and kept until the number of daemons
changes (a new one may be able to run it).
"""

from __future__ import annotations

import hashlib
import math
import os
import socket
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import Any

import anyio
import psycopg
from psycopg import AsyncConnection

from projectord.backoff import jittered_delay
from projectord.database import condemn, connect, deadline, describe_error, reap
from projectord.logs import get_logger
from projectord.queries import Queries
from projectord.runner.checkpoint_store import CheckpointStore

log = get_logger("projectord.daemon.ownership")

PROJECTION = "projection"  # lock_keys.purpose of a projection's lock (name: the projection's)
INSTANCE = "instance"  # lock_keys.purpose of the shared "this instance is alive" lock (name: "")

Keys = dict[tuple[str, str], int]

FREE_TURNS = 3  # turns a projection this daemon may run stays free before it goes beyond its share


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
        eligible: Callable[[AsyncConnection[Any]], Awaitable[set[str]]] | None = None,
        extra: Collection[str] = (),
        versions: dict[str, int] | None = None,
    ) -> None:
        self.dsn = dsn
        self.schema = schema
        self.instance = instance
        self.names = list(names)
        self.queries = Queries(schema)
        self.checkpoints = CheckpointStore(self.queries)
        self.interval = interval
        self._acquired = acquired
        self._released = released
        self._lost = lost
        self._eligible = eligible  # None: every name, always
        self.extra = frozenset(extra)  # units outside the fair share (builds of new versions)
        self.versions = versions or {}  # unit -> the version a row created for it is
        self._free_turns: dict[str, int] = {}  # unit -> turns seen free while at the share
        self._overflow: dict[str, int] = {}  # unit taken beyond the share -> daemons counted then
        self.owned: list[str] = []  # in the order taken: the last taken are given up first
        self._held: dict[str, int] = {}  # owned projection -> the key it is locked with
        self._instance_key: int | None = None  # the instance key this session holds
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
                    await self._join(conn)
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
                await anyio.sleep(jittered_delay(failures, 0.05, 2.0))

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

    async def _join(self, conn: AsyncConnection[Any]) -> None:
        """Make sure every lock this daemon may take has a key, then say this instance is alive."""
        await self._query(conn, "ensure_lock_keys", {"purpose": INSTANCE, "names": [""]})
        await self._query(conn, "ensure_lock_keys", {"purpose": PROJECTION, "names": self.names})
        self._instance_key = None
        await self._hold_instance(conn, await self._keys(conn))

    async def _keys(self, conn: AsyncConnection[Any]) -> Keys:
        """The current keys, read every turn: another daemon may have drawn a new one."""
        async with deadline(conn, "ownership's lock_keys"):
            cur = await conn.execute(
                self.queries["lock_keys"], {"purposes": [INSTANCE, PROJECTION]}
            )
            rows = await cur.fetchall()
        return {(purpose, name): int(key) for purpose, name, key in rows}

    async def _hold_instance(self, conn: AsyncConnection[Any], keys: Keys) -> None:
        """Hold the current instance key in share mode (moving off an old one)."""
        key = keys[(INSTANCE, "")]
        if key == self._instance_key:
            return
        row = await self._query(conn, "try_lock_instance", {"key": key})
        if not (row and row[0]):
            # A stranger holds it exclusively, or waits for it exclusively: a waiting exclusive
            # request queues every new share request behind it, even while daemons hold it.
            await self._rekey(conn, INSTANCE, "", key, query="rekey_instance_lock")
            return  # the next turn holds the new key
        if self._instance_key is not None:
            await self._query(conn, "release_instance", {"key": self._instance_key})
        self._instance_key = key

    async def rebalance(self, conn: AsyncConnection[Any]) -> None:
        keys = await self._keys(conn)
        await self._hold_instance(conn, keys)
        row = await self._query(conn, "count_instances", {"key": keys[(INSTANCE, "")]})
        self.instances = max(int(row[0]) if row else 1, 1)
        share = math.ceil(len([n for n in self.names if n not in self.extra]) / self.instances)
        eligible = set(self.names)
        if self._eligible is not None:
            async with deadline(conn, "ownership's versions"):
                eligible = await self._eligible(conn)
        # A projection held under a key that is no longer its own (a daemon drew a new one) is
        # given up; it is taken again under the new key. So is one this code may no longer run.
        for name in [
            n for n in self.owned if self._held[n] != keys[(PROJECTION, n)] or n not in eligible
        ]:
            await self._give_up(conn, name)
        while len(shared := [n for n in self.owned if n not in self.extra]) > share:
            surplus = [n for n in shared if self._overflow.get(n) != self.instances]
            if not surplus:
                break
            await self._give_up(conn, surplus[-1])
        await self._reclaim(conn)
        free = await self._free(conn, keys, share, eligible)
        for name in self._preference:
            if name in self.owned or name not in eligible:
                continue
            overflow = False
            if name not in self.extra and len(self.owned) - self._extra_owned() >= share:
                if name not in free:
                    continue
                overflow = True
            if await self._take(conn, name, keys):
                if overflow:
                    self._overflow[name] = self.instances
                    log.info("ownership.beyond_share", projection=name, instance=self.instance)
                self.owned.append(name)
                await self._record_owner(conn, name)
                log.info(
                    "ownership.acquired",
                    projection=name,
                    instance=self.instance,
                    instances=self.instances,
                )
                await self._acquired(name)

    async def _free(
        self, conn: AsyncConnection[Any], keys: Keys, share: int, eligible: set[str]
    ) -> set[str]:
        """The projections this daemon may run, beyond its share, that no session has held for
        FREE_TURNS of its turns in a row (one statement; none while under the share)."""
        if len(self.owned) - self._extra_owned() < share:
            self._free_turns.clear()
            return set()
        wanted = {
            keys[(PROJECTION, n)]: n
            for n in self.names
            if n in eligible and n not in self.extra and n not in self.owned
        }
        if not wanted:
            return set()
        async with deadline(conn, "ownership's locks_held"):
            cur = await conn.execute(self.queries["locks_held"], {"keys": list(wanted)})
            held = {wanted[int(key)] for (key,) in await cur.fetchall()}
        for name in list(self._free_turns):
            if name in held or name not in wanted.values():
                del self._free_turns[name]
        for name in set(wanted.values()) - held:
            self._free_turns[name] = self._free_turns.get(name, 0) + 1
        return {n for n, turns in self._free_turns.items() if turns >= FREE_TURNS}

    def _extra_owned(self) -> int:
        return len([n for n in self.owned if n in self.extra])

    async def _reclaim(self, conn: AsyncConnection[Any]) -> None:
        """Name this instance again in the positions row of every projection it holds whose row
        names someone else. Ownership is recorded once, when a lock is taken; a daemon that took
        it under a stale key (a rekey racing its turn) may record itself after, then give the
        projection up, and the row would name it for good: the holder's runner would stand by
        and no daemon would apply the projection. Checked every turn, so such a state heals
        within one turn. Runs after the stale and surplus projections were given up, so only a
        daemon holding a projection under its current key claims it."""
        if not self.owned:
            return
        async with deadline(conn, "ownership's owners"):
            recorded = await self.checkpoints.owners(conn, self.owned)
        for name in list(self.owned):
            if recorded.get(name) == self.instance:
                continue
            if not await self._record_owner(conn, name):
                continue  # a row of another version now: given up on the next turn
            log.warning(
                "ownership.reclaimed",
                projection=name,
                instance=self.instance,
                recorded_owner=recorded.get(name),
                reason="this instance holds the projection's lock but its row named another",
            )

    async def _give_up(self, conn: AsyncConnection[Any], name: str) -> None:
        await self._released(name)  # drain its runner first
        # Logged before the unlock: another instance may take it the moment it is free.
        log.info(
            "ownership.released", projection=name, instance=self.instance, instances=self.instances
        )
        await self._query(conn, "release_projection", {"key": self._held.pop(name)})
        self.owned.remove(name)
        self._overflow.pop(name, None)

    async def _take(self, conn: AsyncConnection[Any], name: str, keys: Keys) -> bool:
        """Lock a projection; if a stranger holds its key, draw a new key and lock that."""
        async with deadline(conn, "ownership's try_lock"):
            held = await take_keyed_lock(
                conn, self.queries, PROJECTION, name, keys[(PROJECTION, name)]
            )
        if held is None:
            return False
        self._held[name] = keys[(PROJECTION, name)] = held
        return True

    async def _rekey(
        self,
        conn: AsyncConnection[Any],
        purpose: str,
        name: str,
        key: int,
        *,
        query: str = "rekey_lock",
    ) -> int | None:
        async with deadline(conn, f"ownership's {query}"):
            return await rekey(conn, self.queries, purpose, name, key, query=query)

    async def _record_owner(self, conn: AsyncConnection[Any], name: str) -> bool:
        async with deadline(conn, "ownership's record_owner"):
            return await self.checkpoints.record_owner(
                conn, name, self.instance, self.versions.get(name, 1)
            )

    async def _query(
        self, conn: AsyncConnection[Any], name: str, params: dict[str, Any]
    ) -> tuple[Any, ...] | None:
        """One of ownership's statements, bounded: a session that does not answer is taken for
        dead (its locks are then someone else's to take), never waited on forever."""
        async with deadline(conn, f"ownership's {name}"):
            cur = await conn.execute(self.queries[name], params)
            return await cur.fetchone() if cur.description else None

    async def _lose_all(self) -> None:
        self._held.clear()
        self._overflow.clear()
        self._instance_key = None
        if self.owned:
            lost, self.owned = self.owned, []
            await self._lost(lost)  # their runners stop first: nothing commits after the line
            log.warning("ownership.lost", projections=lost, instance=self.instance)


async def take_keyed_lock(
    conn: AsyncConnection[Any], queries: Queries, purpose: str, name: str, key: int
) -> int | None:
    """Take the session lock `key` of lock_keys' (purpose, name) without waiting; if only
    strangers hold it, draw a new key and take that. The key now held, or None.

    `key` was read before (at the start of a turn): another daemon may have drawn a new key
    since, and a stranger may then have let the old one go. Taking the old key would then let
    two daemons own one lock, so the key is read again once held, and a lock taken under a key
    that is no longer the lock's is released and counts as not taken."""
    if await _try(conn, queries, "try_lock", key):
        held = key
    else:
        new = await rekey(conn, queries, purpose, name, key)
        if new is None or not await _try(conn, queries, "try_lock", new):
            return None
        held = new
    cur = await conn.execute(queries["lock_key"], {"purpose": purpose, "name": name})
    row = await cur.fetchone()
    if row is not None and int(row[0]) == held:
        return held
    await conn.execute(queries["release_projection"], {"key": held})
    log.info("ownership.stale_key", lock=purpose, name=name or None)
    return None


async def _try(conn: AsyncConnection[Any], queries: Queries, query: str, key: int) -> bool:
    cur = await conn.execute(queries[query], {"key": key})
    row = await cur.fetchone()
    return bool(row and row[0])


async def rekey(
    conn: AsyncConnection[Any],
    queries: Queries,
    purpose: str,
    name: str,
    key: int,
    *,
    query: str = "rekey_lock",
) -> int | None:
    """A new key for a lock held only by strangers (`rekey_lock`), or for the instance lock
    that a stranger holds or waits for exclusively (`rekey_instance_lock`); None when nothing
    changed (a daemon holds it, it is free again, or another daemon drew the new key first)."""
    cur = await conn.execute(queries[query], {"purpose": purpose, "name": name, "key": key})
    row = await cur.fetchone()
    if row is None:
        return None
    log.warning(
        "ownership.rekeyed",
        lock=purpose,
        name=name or None,
        reason=(
            "its key was held only by sessions of roles other than the daemon's"
            if query == "rekey_lock"
            else "a session of a role other than the daemon's held or awaited it exclusively"
        ),
    )
    return int(row[0])


def _digest(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


def default_instance_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"
