"""The handler timeout's watcher (projectord/runner/handler_timeout.py), against a real server: a
call
that overruns is stopped by cancelling its statement on the server, however many calls ended in
time before it under the same long-lived watcher, and the connection stays usable."""

from __future__ import annotations

import time

import anyio
import pytest
from psycopg import AsyncConnection

from projectord.database import connect
from projectord.runner.handler_timeout import CANCEL_GRACE, HandlerClock, HandlerTimeout
from tests.support.harness import TestDatabase


async def sleep_on_server(conn: AsyncConnection[object], seconds: float) -> None:
    await conn.execute("SELECT pg_sleep(%s)", (seconds,))


def test_calls_in_time_then_one_that_overruns_under_one_watcher(db: TestDatabase) -> None:
    """Twenty short calls under one watcher, each with a 0.5 s timeout, then one that sleeps 30 s
    on the server: it ends with HandlerTimeout about 0.5 s after it began (not at an earlier
    call's deadline, not never), by a cancel the server honoured: the connection answers next."""

    async def main() -> tuple[float, int]:
        clock = HandlerClock()
        conn = await connect(db.url, autocommit=True)
        async with conn, clock.watching():
            for _ in range(20):
                await clock.bound(lambda: sleep_on_server(conn, 0.02), conn, 0.5, "short")
            began = time.monotonic()
            with pytest.raises(HandlerTimeout, match="long ran longer than handler_timeout"):
                await clock.bound(lambda: sleep_on_server(conn, 30), conn, 0.5, "long")
            took = time.monotonic() - began
            cur = await conn.execute("SELECT 1")
            row = await cur.fetchone()
            assert row is not None
            return took, row[0]

    took, answer = anyio.run(main)
    assert answer == 1
    assert 0.45 <= took < CANCEL_GRACE


def test_a_late_call_is_not_stopped_at_an_earlier_calls_deadline(db: TestDatabase) -> None:
    """The watcher sleeps until the deadline of the call it saw; a call that began later must
    run to its own deadline."""

    async def main() -> None:
        clock = HandlerClock()
        conn = await connect(db.url, autocommit=True)
        async with conn, clock.watching():
            await clock.bound(lambda: sleep_on_server(conn, 0.0), conn, 0.6, "first")
            await anyio.sleep(0.3)
            # Began 0.3 s after the first call: the watcher wakes at the first deadline (0.6 s
            # after it) and must let this one, due 0.9 s after the first began, go on.
            await clock.bound(lambda: sleep_on_server(conn, 0.5), conn, 0.6, "second")

    anyio.run(main)


def test_work_that_ignores_the_cancel_is_cancelled_as_a_task(db: TestDatabase) -> None:
    """A handler waiting on something other than the database does not see the server-side
    cancel: CANCEL_GRACE later its task is cancelled and HandlerTimeout raised. Without a
    watcher running, the call brings its own."""

    async def main() -> float:
        conn = await connect(db.url, autocommit=True)
        async with conn:
            began = time.monotonic()
            with pytest.raises(HandlerTimeout):
                await HandlerClock().bound(lambda: anyio.sleep(60), conn, 0.2, "stubborn")
            return time.monotonic() - began

    took = anyio.run(main)
    assert 0.2 + CANCEL_GRACE - 0.1 <= took < 0.2 + CANCEL_GRACE + 2


def test_a_late_cancel_never_hits_the_next_statement(db: TestDatabase) -> None:
    """The cancel request takes a while to reach the server (here: 0.3 s, by delaying psycopg's
    own `cancel_safe`), and meanwhile the statement it was meant for ends by itself. The call
    still counts as timed out, but returns only once the cancel is done with, so the caller's
    next statement on the connection runs to its end instead of being cancelled."""

    async def main() -> None:
        conn = await connect(db.url, autocommit=True)
        async with conn:
            real_cancel = conn.cancel_safe

            async def slow_cancel(timeout: float = 30.0) -> None:
                await anyio.sleep(0.3)
                await real_cancel(timeout=timeout)

            conn.cancel_safe = slow_cancel  # type: ignore[method-assign]
            clock = HandlerClock()
            async with clock.watching():  # a runner's: it outlives the call
                with pytest.raises(HandlerTimeout):
                    await clock.bound(lambda: sleep_on_server(conn, 0.25), conn, 0.1, "late")
                await sleep_on_server(conn, 0.3)  # a cancel still on its way would cancel this

    anyio.run(main)
