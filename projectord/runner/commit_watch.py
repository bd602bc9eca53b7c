"""How long a pipelined batch's answer is awaited: as long as the server works on it.

In pipeline mode a batch's statements, its compare-and-set and COMMIT are sent together, and the
wait at the end (psycopg's pipeline exit) is for all of them: a handler statement with seconds of
server work is waited for there, not where the handler called `execute`. So that wait cannot have
a fixed bound. A bound of COMMIT_WAIT (5 s) discarded every batch with more server work as a dead
connection; its retry did the same, for ever. The handler's own bound is `handler_timeout`, whose
clock cancels the statement on the server (projectord/runner/handler_timeout.py).

Yet a silent partition never answers, and a kernel may not notice for a long time
(docs/reliability.md). So every COMMIT_WAIT seconds without an answer the server is asked, over a
new connection, whether the batch's session is still working (`session_working`: running a
statement, not waiting for the client). While it is, the wait goes on; once it is not, or the
server does not answer within COMMIT_WAIT, the connection is taken for dead: it is discarded and
`DeadConnection` (transient) is raised.

The wait is shielded from cancellation: a stopped runner (ownership lost, a drain that timed out)
must not leave a COMMIT in flight that lands after it stopped. A cancelled runner waits at most
COMMIT_WAIT more, then gives the connection up.

One watcher task per runner for its whole life (projectord/runner/watcher.py), as the handler clock
has: a
batch answered in time costs a few assignments, where a task per batch cost about 130 µs.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio
from psycopg import AsyncConnection

from projectord.database import DeadConnection, discard, session_working
from projectord.runner.watcher import Watcher

# Seconds a batch's answer may be awaited before the server is asked whether the batch's session
# is still working on it; also the bound of that question, and of the wait of a cancelled runner.
COMMIT_WAIT = 5.0


@dataclass(eq=False)
class _Wait:
    """A wait for a batch's answer in flight."""

    conn: AsyncConnection[Any]
    scope: anyio.CancelScope
    due: float  # monotonic: when the watcher looks at it next
    lost: bool = False  # given up: the connection is taken for dead
    ended: anyio.Event | None = None  # made only when a cancelled watcher waits for the end


class CommitWatch(Watcher[_Wait]):
    """Bounds the waits for pipelined batches' answers of one runner, one at a time."""

    def __init__(self, conninfo: str) -> None:
        super().__init__()
        self._conninfo = conninfo  # where the question about a session is asked

    async def wait(
        self, conn: AsyncConnection[Any], answer: Callable[[], Awaitable[object]], what: str
    ) -> None:
        """Await `answer()` (everything has been sent) for as long as `conn`'s session is seen
        working on the server; raise `DeadConnection` once it is not."""
        if not self._watcher_running:
            async with self.watching():
                await self.wait(conn, answer, what)
            return
        with anyio.CancelScope(shield=True) as scope:
            wait = _Wait(conn, scope, time.monotonic() + COMMIT_WAIT)
            self._current = wait
            self._began()
            try:
                await answer()
            finally:
                self._current = None
                if wait.ended is not None:
                    wait.ended.set()
        if wait.lost:
            # Its session may live on over there, holding the positions row's lock and an xid
            # that holds back every projection: it is terminated once the server answers.
            with anyio.CancelScope(shield=True):
                await discard(conn)
            raise DeadConnection(
                f"no answer to {what} and its session not seen working within"
                f" {COMMIT_WAIT:g}s; connection discarded"
            )

    async def _watch(self) -> None:
        try:
            await super()._watch()
        except anyio.get_cancelled_exc_class():
            with anyio.CancelScope(shield=True):
                await self._last_look()
            raise

    async def _on_due(self, call: _Wait) -> None:
        await self._look(call)

    async def _look(self, wait: _Wait) -> None:
        """Ask the server about the wait's session; give the wait up unless it is working."""
        working = await session_working(wait.conn, self._conninfo, COMMIT_WAIT)
        if self._current is not wait:  # answered meanwhile
            return
        if working:
            wait.due = time.monotonic() + COMMIT_WAIT
        else:
            self._give_up(wait)

    async def _last_look(self) -> None:
        """The runner is cancelled: the wait in flight has COMMIT_WAIT more, then is given up."""
        wait = self._current
        if wait is None:
            return
        wait.ended = anyio.Event()
        with anyio.move_on_after(COMMIT_WAIT):
            await wait.ended.wait()
        if self._current is wait:
            self._give_up(wait)

    @staticmethod
    def _give_up(wait: _Wait) -> None:
        wait.lost = True
        wait.scope.cancel()
