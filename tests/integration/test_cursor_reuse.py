"""The default `handle` hands out again the cursors nobody holds (projectord/cursor_reuse.py): an
`on` handler must not be able to tell. It reads the results of its own statements, even ones it
keeps for later; whatever it set on a cursor, or registered on a cursor or on the connection, and
the session settings adapters read, act as they would with a new cursor every time."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import psycopg
import pytest
from psycopg import AsyncConnection, AsyncCursor
from psycopg.adapt import Dumper, Loader
from psycopg.pq import Format
from psycopg.rows import dict_row

from projectord import Event, Projection, Table
from projectord.cursor_reuse import CursorPool, reused_cursors
from projectord.database import connect
from tests.support.harness import TENANT, TestDatabase

SELECT_N = "SELECT %s::int"  # one query object, as a constant in a handler is


def events(count: int) -> list[Event]:
    now = dt.datetime.now(dt.UTC)
    return [
        Event(i + 1, uuid.uuid4(), TENANT, uuid.uuid4(), "", 1, "Step", {"n": i}, {}, now, 1)
        for i in range(count)
    ]


def run(db: TestDatabase, body: Callable[[AsyncConnection[Any]], Awaitable[None]]) -> None:
    async def main() -> None:
        conn = await connect(db.url, autocommit=True)
        async with conn:
            await body(conn)

    anyio.run(main)


class Chain(Projection):
    """Reads a result back in every event and keeps some cursors to read them after the batch."""

    name = "chain"
    event_types = ("Step",)
    tables = {"chain": Table({"n": "int PRIMARY KEY", "prev": "int"})}

    def __init__(self) -> None:
        self.kept: list[tuple[int, AsyncCursor[Any]]] = []
        self.pools: set[int] = set()
        self.last_pool: Any = None

    async def on(self, event: Event, conn: AsyncConnection[Any]) -> None:
        n = event.payload["n"]
        self.last_pool = conn.cursor_factory
        cur = await conn.execute("SELECT max(n) FROM chain")
        (previous,) = await cur.fetchone() or (None,)
        await conn.execute("INSERT INTO chain VALUES (%s, %s)", (n, previous))
        if n % 50 == 0:
            self.kept.append((n, await conn.execute(SELECT_N, (n,))))
        else:
            await conn.execute(SELECT_N, (n,))


class PlainChain(Chain):
    pipeline = False


@pytest.mark.parametrize("projection", [Chain(), PlainChain()], ids=["pipeline", "plain"])
def test_a_handler_reads_its_results_and_cursors_it_keeps(
    db: TestDatabase, projection: Chain
) -> None:
    async def body(conn: AsyncConnection[Any]) -> None:
        await conn.execute("CREATE TABLE chain (n int PRIMARY KEY, prev int)")
        async with conn.transaction():
            await projection.handle(events(1000), conn)
        for n, cur in projection.kept:  # read after 1000 more statements: still their own
            assert await cur.fetchone() == (n,)
        assert conn.cursor_factory is AsyncCursor

    run(db, body)
    assert db.rows("SELECT count(*), count(*) FILTER (WHERE prev = n - 1) FROM chain") == [
        (1000, 999)
    ]
    # The cursors were reused (the point of it all): most statements did not build a new one.
    pool = projection.last_pool
    assert isinstance(pool, CursorPool)
    assert pool.reused > 2 * pool.created


class Failing(Projection):
    name = "failing"
    event_types = ("Step",)

    async def on(self, event: Event, conn: AsyncConnection[Any]) -> None:
        await conn.execute(SELECT_N, (event.payload["n"],))
        if event.payload["n"] == 7:
            raise RuntimeError("poison")


def test_the_connection_gets_its_cursor_factory_back_after_a_failure(db: TestDatabase) -> None:
    async def body(conn: AsyncConnection[Any]) -> None:
        with pytest.raises(RuntimeError, match="poison"):
            async with conn.transaction():
                await Failing().handle(events(20), conn)
        assert conn.cursor_factory is AsyncCursor

    run(db, body)


def test_only_unreferenced_cursors_come_back(db: TestDatabase) -> None:
    async def body(conn: AsyncConnection[Any]) -> None:
        async with reused_cursors(conn) as pool:
            assert pool is not None
            first = await conn.execute(SELECT_N, (1,))
            second = await conn.execute(SELECT_N, (2,))
            assert second is not first  # `first` is held here
            assert await first.fetchone() == (1,)
            first_id = id(first)
            del first
            third = await conn.execute(SELECT_N, (3,))
            assert id(third) == first_id and pool.reused == 1
            assert await second.fetchone() == (2,)
            assert await third.fetchone() == (3,)
            # In pipeline mode a cursor waits in psycopg's queue for its results: never reused
            # before they are in.
            async with conn.pipeline():
                pending = [await conn.execute(SELECT_N, (i,)) for i in range(300)]
            assert len({id(cur) for cur in pending}) == 300
            assert [(await cur.fetchone()) for cur in pending] == [(i,) for i in range(300)]

    run(db, body)


def test_what_a_caller_set_on_a_cursor_does_not_carry_over(db: TestDatabase) -> None:
    async def body(conn: AsyncConnection[Any]) -> None:
        async with reused_cursors(conn) as pool:
            assert pool is not None
            cur = conn.cursor(row_factory=dict_row)
            cur.arraysize = 7
            await cur.execute("SELECT 1 AS x", binary=True)
            cur.format = Format.BINARY
            assert await cur.fetchone() == {"x": 1}
            del cur
            again = await conn.execute("SELECT 2 AS x")
            assert pool.reused == 1
            assert (again.format, again.arraysize) == (Format.TEXT, 1)
            assert await again.fetchone() == (2,)
            await again.close()
            del again
            fresh = await conn.execute("SELECT 3")  # a closed cursor is not handed out again
            assert not fresh.closed and pool.reused == 1
            assert await fresh.fetchone() == (3,)

    run(db, body)


class Money:
    def __init__(self, cents: int) -> None:
        self.cents = cents


class MoneyDumper(Dumper):
    def dump(self, obj: Money) -> bytes:
        return f"{obj.cents / 100:.2f}".encode()


class FortyTwoDumper(Dumper):
    def dump(self, obj: int) -> bytes:
        return b"42"


class TextLoader(Loader):
    def load(self, data: Any) -> str:
        return f"loaded {bytes(data).decode()}"


def test_adapters_registered_mid_batch_act_as_with_new_cursors(db: TestDatabase) -> None:
    async def body(conn: AsyncConnection[Any]) -> None:
        async with reused_cursors(conn) as pool:
            assert pool is not None
            for i in range(3):
                await conn.execute(SELECT_N, (i,))
            # Registered on one cursor: that cursor only.
            cur = conn.cursor()
            cur.adapters.register_dumper(int, FortyTwoDumper)
            cur.adapters.register_loader("int4", TextLoader)
            await cur.execute(SELECT_N, (1,))
            assert await cur.fetchone() == ("loaded 42",)
            del cur
            plain = await conn.execute(SELECT_N, (1,))
            assert await plain.fetchone() == (1,)
            del plain
            # Registered on the connection: every cursor from then on.
            with pytest.raises(psycopg.ProgrammingError, match="cannot adapt type 'Money'"):
                await conn.execute("SELECT %s::numeric::text", (Money(1),))
            conn.adapters.register_dumper(Money, MoneyDumper)
            money = await conn.execute("SELECT %s::numeric::text", (Money(1234),))
            assert await money.fetchone() == ("12.34",)
            del money
            conn.adapters.register_loader("int4", TextLoader)
            loaded = await conn.execute(SELECT_N, (5,))
            assert await loaded.fetchone() == ("loaded 5",)
            assert pool.reused >= 1

    run(db, body)


def test_session_settings_changed_mid_batch_act_as_with_new_cursors(db: TestDatabase) -> None:
    query = "SELECT %s::timestamptz"
    instant = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)

    async def zone_of_result(cur: AsyncCursor[Any]) -> dt.timedelta | None:
        (value,) = await cur.fetchone() or (None,)
        assert value == instant
        return value.utcoffset()  # type: ignore[no-any-return]

    async def body(conn: AsyncConnection[Any]) -> None:
        await conn.execute("SET TIME ZONE 'UTC'")
        async with reused_cursors(conn) as pool:
            assert pool is not None
            for _ in range(3):
                assert await zone_of_result(await conn.execute(query, (instant,))) == dt.timedelta()
            assert pool.reused == 2
            # The cursor that ran `query` (with a loader made for UTC) is held while the time zone
            # changes, so the change runs on another one; then both are free.
            held = await conn.execute(query, (instant,))
            await conn.execute("SET TIME ZONE 'Asia/Tokyo'")
            del held
            cur = await conn.execute(query, (instant,))
            assert await zone_of_result(cur) == dt.timedelta(hours=9)

    run(db, body)


def test_a_connection_with_its_own_cursor_factory_is_left_alone(db: TestDatabase) -> None:
    class MyCursor(AsyncCursor[Any]):
        pass

    async def body(conn: AsyncConnection[Any]) -> None:
        conn.cursor_factory = MyCursor
        async with reused_cursors(conn) as pool:
            assert pool is None
            assert type(await conn.execute("SELECT 1")) is MyCursor
        assert conn.cursor_factory is MyCursor

    run(db, body)
