"""Races between a rekey and the daemons' turns, and a stranger queued on the instance key, with a
real CONNECT-only login role and real advisory locks (the hostile review's F2 and F4,
docs/security-locks.md): a daemon must never own a projection under a key that is no longer its
own, a positions row that names a daemon which gave the projection up heals within a turn, and a
stranger waiting for the instance key cannot keep a new daemon from being counted."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import psycopg
from psycopg import AsyncConnection
from psycopg.conninfo import make_conninfo

from projectord.daemon.ownership import INSTANCE, PROJECTION, Keys, Ownership, take_keyed_lock
from projectord.database import connect
from projectord.queries import Queries
from tests.support.harness import TestDatabase, wait_until

SCHEMA = "projectord"


async def _nothing(_: Any) -> None:
    return None


def ownership(db: TestDatabase, instance: str, names: Sequence[str]) -> Ownership:
    return Ownership(
        db.url, SCHEMA, instance, names, acquired=_nothing, released=_nothing, lost=_nothing
    )


def lock_key(db: TestDatabase, purpose: str, name: str) -> int:
    return int(
        db.scalar(
            "SELECT key FROM projectord.lock_keys WHERE purpose = %s AND name = %s",
            (purpose, name),
        )
    )


def holds(db: TestDatabase, pid: int, key: int) -> bool:
    """Whether session `pid` holds advisory lock `key`, as pg_locks shows it."""
    return bool(
        db.scalar(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
            " AND objsubid = 1 AND pid = %s"
            " AND classid = ((%s::bigint >> 32) & 4294967295)::oid"
            " AND objid = (%s::bigint & 4294967295)::oid",
            (pid, key, key),
        )
    )


def row_owner(db: TestDatabase, name: str) -> str | None:
    return db.scalar("SELECT owner FROM projectord.projection_positions WHERE name = %s", (name,))


def with_stale_keys_once(daemon: Ownership, stale: Keys) -> None:
    """The daemon's next turn works with `stale`, the keys it read before a rekey: the state of
    a turn that read lock_keys just before another daemon drew a new key."""
    fresh: Callable[[AsyncConnection[Any]], Awaitable[Keys]] = daemon._keys

    async def once(_: AsyncConnection[Any]) -> Keys:
        daemon._keys = fresh  # type: ignore[method-assign]
        return dict(stale)

    daemon._keys = once  # type: ignore[method-assign]


@dataclass
class Race:
    """Two joined daemons, their connections, and a stranger's session holding p's key K1."""

    a: Ownership
    b: Ownership
    ca: AsyncConnection[Any]
    cb: AsyncConnection[Any]
    stranger: psycopg.Connection[Any]
    k1: int


@asynccontextmanager
async def two_daemons_and_a_stranger_on_k1(db: TestDatabase, stranger: str) -> AsyncIterator[Race]:
    """Daemons A and B joined, each on its own connection, and a stranger's session holding p's
    key K1; the sessions end with the block."""
    a, b = ownership(db, "A", ["p"]), ownership(db, "B", ["p"])
    async with (
        await connect(db.url, autocommit=True) as ca,
        await connect(db.url, autocommit=True) as cb,
    ):
        await a._join(ca)
        await b._join(cb)
        k1 = lock_key(db, PROJECTION, "p")
        with psycopg.connect(make_conninfo(db.url, user=stranger), autocommit=True) as mal:
            mal.execute("SELECT pg_advisory_lock(%s)", (k1,))
            yield Race(a, b, ca, cb, mal, k1)


def test_a_lock_taken_under_a_key_redrawn_since_is_not_held(
    db: TestDatabase, stranger: str
) -> None:
    """A stranger holds K1, a daemon redraws it (K2), the stranger lets K1 go: a daemon that
    still has K1 from its earlier read must not take the projection under it."""

    async def scenario() -> None:
        queries = Queries(SCHEMA)
        async with two_daemons_and_a_stranger_on_k1(db, stranger) as race:
            a, k1 = race.a, race.k1
            await a.rebalance(race.ca)  # K1 held only by a stranger: A draws K2 and takes it
            assert a.owned == ["p"]
            k2 = lock_key(db, PROJECTION, "p")
            assert k2 != k1 and a._held["p"] == k2
            race.stranger.execute("SELECT pg_advisory_unlock(%s)", (k1,))
            held = await take_keyed_lock(race.cb, queries, PROJECTION, "p", k1)
            assert held is None, "B took p under the key that was redrawn"
            assert not holds(db, race.cb.info.backend_pid, k1), "B kept the stale lock"

    anyio.run(scenario)


def test_a_row_naming_another_daemon_is_taken_back_by_the_holder(db: TestDatabase) -> None:
    """The holder of a projection's lock names itself again when the row names another daemon
    (what a daemon that raced a rekey and then gave the projection up leaves behind): otherwise
    its runner stands by and no daemon applies the projection."""

    async def scenario() -> None:
        a = ownership(db, "A", ["p"])
        async with await connect(db.url, autocommit=True) as ca:
            await a._join(ca)
            await a.rebalance(ca)
            assert a.owned == ["p"] and row_owner(db, "p") == "A"
            db.scalar(
                "UPDATE projectord.projection_positions SET owner = 'B' WHERE name = 'p'"
                " RETURNING owner"
            )
            await a.rebalance(ca)
            assert row_owner(db, "p") == "A"

    anyio.run(scenario)


def test_a_rekey_racing_a_turn_leaves_one_owner_who_applies(
    db: TestDatabase, stranger: str
) -> None:
    """The review's whole sequence: B reads K1, a stranger holds K1, A redraws K2 and takes it,
    the stranger lets K1 go, B's turn goes on with K1. At no point do both own p, and after a
    few turns the row names the daemon that holds p."""

    async def scenario() -> None:
        async with two_daemons_and_a_stranger_on_k1(db, stranger) as race:
            a, b, ca, cb = race.a, race.b, race.ca, race.cb
            stale = await b._keys(cb)
            await a.rebalance(ca)
            race.stranger.execute("SELECT pg_advisory_unlock(%s)", (race.k1,))
            with_stale_keys_once(b, stale)
            await b.rebalance(cb)
            assert not ("p" in a.owned and "p" in b.owned), "two daemons own p"
            for _ in range(3):
                await a.rebalance(ca)
                await b.rebalance(cb)
            holder = "A" if "p" in a.owned else "B" if "p" in b.owned else None
            assert holder is not None and row_owner(db, "p") == holder

    anyio.run(scenario)


def wait_for_lock(conn: psycopg.Connection[Any], key: int) -> None:
    """Queue for `key` exclusively, as a stranger's session would (ends when granted, or when
    the test ends the session)."""
    try:
        conn.execute("SELECT pg_advisory_lock(%s)", (key,))
    except psycopg.OperationalError:
        pass  # terminated by the test


def test_a_stranger_queued_on_the_instance_key_cannot_keep_a_daemon_out(
    db: TestDatabase, stranger: str
) -> None:
    """A stranger's pg_advisory_lock() on the instance key, queued behind daemon A's share lock,
    makes every later share request wait too: the key is redrawn, and B is counted."""
    names = [f"p{n}" for n in range(4)]

    async def scenario() -> None:
        a, b = ownership(db, "A", names), ownership(db, "B", names)
        async with (
            await connect(db.url, autocommit=True) as ca,
            await connect(db.url, autocommit=True) as cb,
        ):
            await a._join(ca)
            await a.rebalance(ca)
            key = lock_key(db, INSTANCE, "")
            with psycopg.connect(make_conninfo(db.url, user=stranger), autocommit=True) as mal:
                pid = mal.info.backend_pid
                queued = threading.Thread(target=wait_for_lock, args=(mal, key), daemon=True)
                queued.start()
                try:
                    wait_until(
                        lambda: bool(
                            db.scalar(
                                "SELECT count(*) FROM pg_locks WHERE pid = %s AND NOT granted",
                                (pid,),
                            )
                        ),
                        10,
                    )
                    await b._join(cb)
                    for _ in range(3):
                        await a.rebalance(ca)
                        await b.rebalance(cb)
                    assert lock_key(db, INSTANCE, "") != key
                    assert b._instance_key is not None and a.instances == b.instances == 2
                    assert len(a.owned) == len(b.owned) == 2
                    # The daemons moved off the old key, so the stranger got it: it means nothing.
                    await anyio.to_thread.run_sync(queued.join, 10)
                    assert not queued.is_alive()
                finally:
                    if queued.is_alive():  # still queued: end it, or closing its session hangs
                        db.scalar("SELECT pg_terminate_backend(%s)", (pid,))
                        queued.join(10)

    anyio.run(scenario)
