"""The handler timeout: a handler call that runs longer than `handler_timeout` is stopped.

Stopping it is two steps, in this order:

1. The statement still running on the server is cancelled (a cancel request on a side
   connection): the handler sees it fail and returns, and the connection stays usable. Merely
   cancelling the task is not enough, although psycopg 3.3 sends a cancel request when its task
   is cancelled: anyio delivers the cancellation again while psycopg waits for that request, and
   psycopg then closes the connection while the server goes on running the statement, holding
   its locks, which blocks the retry (seen against PostgreSQL 15 over TCP:
   tests/integration/test_error_policy.py, the handler-timeout test, dead-lettered the wrong
   events).
2. A handler that has not returned CANCEL_GRACE seconds later (it waits on something other than
   the database) is cancelled as a task.

A watcher task does both. A runner keeps one for its whole life (`HandlerClock.watching`): it
sleeps until the deadline of the call in flight when it last looked, and a call that ends in
time costs nothing but two assignments, where a task group started for every call cost about
150 µs of a live batch. A call made without a watcher running gets one of its own for its
duration.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
from psycopg import AsyncConnection

from projectord.event_store import Event
from projectord.projection import Projection
from projectord.runner.watcher import Watcher

CANCEL_GRACE = 2.0  # seconds a timed-out handler has to return once its statement is cancelled


class HandlerTimeout(Exception):
    """A handler ran longer than its `handler_timeout` and was cancelled."""


@dataclass(eq=False)
class _Call:
    """A bounded call in flight. The events exist only once it has overrun (`mark_overrun`): a call
    that ends in time creates none."""

    due: float  # monotonic: the call's deadline
    conn: AsyncConnection[Any]
    scope: anyio.CancelScope
    timed_out: bool = False
    ended: anyio.Event | None = None  # set when the call has returned
    cancel_sent: anyio.Event | None = None  # set once the server-side cancel is done with

    def mark_overrun(self) -> None:
        self.timed_out = True
        self.ended = anyio.Event()
        self.cancel_sent = anyio.Event()


class HandlerClock(Watcher[_Call]):
    """Enforces the handler timeout on one call at a time (a runner's batches) with one
    long-lived watcher task instead of a task per call."""

    async def bound(
        self,
        work: Callable[[], Awaitable[None]],
        conn: AsyncConnection[Any],
        timeout: float,
        what: str,
    ) -> None:
        """Run `work` (a handler, or a whole batch transaction whose statements are pipelined
        and only run on the server when it ends); after `timeout` seconds raise
        `HandlerTimeout`. `conn` is the connection whose statement is cancelled then."""
        if not self._watcher_running:
            async with self.watching():
                await self.bound(work, conn, timeout, what)
            return
        assert self._current is None, "one bounded call at a time"
        with anyio.CancelScope() as scope:
            call = _Call(time.monotonic() + timeout, conn, scope)
            self._current = call
            self._began()
            try:
                await work()
            except Exception:
                if not call.timed_out:
                    raise
            finally:
                self._current = None
                if call.ended is not None:
                    call.ended.set()
        if call.timed_out:
            assert call.cancel_sent is not None
            # Return only once the cancel request is done with: sent later, it could cancel the
            # next statement on this connection (the server ignores one that finds it idle).
            with anyio.move_on_after(CANCEL_GRACE, shield=True):
                await call.cancel_sent.wait()
            raise HandlerTimeout(
                f"{what} ran longer than handler_timeout ({timeout:g}s) and was cancelled"
            )

    async def _on_due(self, call: _Call) -> None:
        await self._stop(call)

    @staticmethod
    async def _stop(call: _Call) -> None:
        """Cancel the call's statement on the server, then, after CANCEL_GRACE, the call. Runs
        straight from the watcher's look at the current call, so the call has not returned
        before `mark_overrun` (there is no await in between)."""
        call.mark_overrun()
        assert call.ended is not None and call.cancel_sent is not None
        try:
            await call.conn.cancel_safe(timeout=CANCEL_GRACE)
        except Exception:  # nothing to cancel, or the server is away: the task is cancelled
            pass
        finally:
            call.cancel_sent.set()
        with anyio.move_on_after(CANCEL_GRACE):
            await call.ended.wait()
        call.scope.cancel()
        await call.ended.wait()


def handler_of(projection: Projection, events: Sequence[Event]) -> str:
    """What ran, as a `HandlerTimeout` names it."""
    return f"the handler of {projection.name!r} on {len(events)} event(s)"


async def run_handler(
    projection: Projection,
    events: Sequence[Event],
    conn: AsyncConnection[Any],
    timeout: float,
    clock: HandlerClock | None = None,
) -> None:
    """Call the projection's handler; after `timeout` seconds raise `HandlerTimeout`, and the
    caller's transaction rolls back."""
    await (clock or HandlerClock()).bound(
        lambda: projection.handle(events, conn), conn, timeout, handler_of(projection, events)
    )
