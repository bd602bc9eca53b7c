"""Operator requests to a runner, run inside the runner's own task: rebuild and skip.

An operator action that touches the checkpoint runs between two batches (`call`), so it never
races one: the control socket's request waits for the runner to take it, and is refused
(`RunnerBusy`) when the runner does not within its timeout. Pause and resume need no cooperation:
they are a state in the positions row that the checkpoint's compare-and-set checks, so no batch
commits once a pause has committed (projectord/control/operations.py writes it, then nudges the
runner).

`OperatorRequests` is a part of ProjectionRunner (projectord/runner/loop.py), kept apart because
it is a concern of its own; it shares the runner's state (RunnerState) and uses the runner's
`fetch`, `_set_state`, `_check_owners` and `_dead_letter` (projectord/runner/failures.py).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
from psycopg import AsyncConnection

from projectord.checkpoint import START, Checkpoint
from projectord.fetcher import Batch
from projectord.queries import quote_ident
from projectord.runner.runner_state import RebuildProgress, RunnerState, StuckEvent

# A rebuild waits at most this long for the locks on the projection's tables.
REBUILD_LOCK_TIMEOUT = "10s"


class RunnerBusy(Exception):
    """The runner did not take an operator request in time (it is inside a long batch)."""


class UndeclaredWrites(Exception):
    """`rebuild` refused: the projection writes tables it does not declare, which a rebuild does
    not empty, so it would apply every event to them a second time."""


class NothingToSkip(Exception):
    """`skip` asked of a projection that is not stuck on an event."""


@dataclass
class PendingRequest:
    """An operator action waiting for the runner's task."""

    action: Callable[[], Awaitable[Any]]
    done: anyio.Event = field(default_factory=anyio.Event)
    started: bool = False
    result: Any = None
    error: BaseException | None = None


class OperatorRequests(RunnerState):
    """The runner's side of operator requests: a queue served between batches, and the
    requests that need it."""

    _requests: list[PendingRequest]  # taken by the runner's task between batches

    async def call(self, action: Callable[[], Awaitable[Any]], *, timeout: float) -> Any:
        """Run `action` in this runner's own task, between two batches, so it never races one.
        Raises `RunnerBusy` when the runner did not take it within `timeout` (nothing was done)."""
        request = PendingRequest(action)
        self._requests.append(request)
        self.control.set()
        self.wakeup.set()
        with anyio.move_on_after(timeout):
            await request.done.wait()
        if not request.done.is_set():
            if not request.started:
                self._requests.remove(request)
                raise RunnerBusy(
                    f"projection {self.name!r} did not take the request within {timeout:g}s "
                    "(it is inside a batch); nothing was done"
                )
            await request.done.wait()  # it has begun: its own statement timeouts bound it
        if request.error is not None:
            raise request.error
        return request.result

    async def _serve_requests(self) -> None:
        while self._requests:
            request = self._requests.pop(0)
            request.started = True
            try:
                request.result = await request.action()
            except Exception as exc:
                request.error = exc
            finally:
                request.done.set()

    def _refuse_requests(self) -> None:
        while self._requests:
            request = self._requests.pop(0)
            request.error = RunnerBusy(f"projection {self.name!r} is stopping")
            request.done.set()

    async def rebuild(self, *, timeout: float, allow_undeclared: bool = False) -> dict[str, Any]:
        """Empty the projection's tables and reset its checkpoint in one transaction; the runner
        then catches up from the first event. A paused projection is resumed. Refused
        (`UndeclaredWrites`) when the handler was seen writing a table it does not declare,
        unless `allow_undeclared`: the operator has dealt with those tables."""

        async def now() -> dict[str, Any]:
            return await self._rebuild_now(allow_undeclared)

        return await self.call(now, timeout=timeout)

    async def _check_declared_writes(
        self, conn: AsyncConnection[Any], allow_undeclared: bool
    ) -> None:
        """Refuse to rebuild over tables the rebuild would not empty; when confirmed, start the
        record of written tables over (the rebuild shows them again)."""
        if allow_undeclared:
            await conn.execute(self.queries["forget_tables_written"], {"name": self.name})
            return
        cur = await conn.execute(
            self.queries["undeclared_tables_written"],
            {"name": self.name, "tables": list(self.projection.tables)},
        )
        undeclared = [f"{schema}.{table}" for schema, table in await cur.fetchall()]
        if undeclared:
            raise UndeclaredWrites(
                f"refusing to rebuild {self.name}: it writes {', '.join(undeclared)}, not among"
                " its declared tables, which a rebuild does not empty, so every event would be"
                " applied to it again; declare the table in the projection's `tables`, or empty"
                " it yourself and confirm with --allow-undeclared"
            )

    async def _rebuild_now(self, allow_undeclared: bool) -> dict[str, Any]:
        params = {"txid": "0", "position": 0, "types": self.types}
        async with self.pool.connection() as conn, conn.transaction():
            await self._check_owners(conn)
            if self.refused:  # TRUNCATE would fire the owner's triggers as projectord
                raise self.refused
            await conn.execute(f"SET LOCAL lock_timeout = '{REBUILD_LOCK_TIMEOUT}'")
            await self._check_declared_writes(conn, allow_undeclared)
            if self.projection.tables:
                tables = ", ".join(quote_ident(t) for t in self.projection.tables)
                await conn.execute(f"TRUNCATE {tables}")
            await self.checkpoints.reset(conn, self.name)
            await conn.execute(self.queries["resolve_by_rebuild"], {"projection": self.name})
            cur = await conn.execute(self.queries["count_unapplied"], params)
            total = int((await cur.fetchone() or (0,))[0])
            cur = await conn.execute(self.queries["latest_event_of_types"], params)
            row = await cur.fetchone()
        target = Checkpoint.parse(row[0], row[1]) if row else None
        self.batches.writes_recorded_at = None  # the rebuild's first batch shows what it writes
        self._persisted = self._position = START
        self._persisted_at = time.monotonic()
        self.paused = self.failed = False
        self.stuck = None
        self._failures = self._transient_failures = 0
        self.status.checkpoint = START
        self.status.applied_total = 0
        self.status.last_error = None
        self.status.recent.clear()
        self.status.rebuild = RebuildProgress(total, target)
        self._set_state("rebuilding")
        self._log.info("projection.rebuild_started", total=total)
        return self.status.rebuild.report(0, 0.0)

    async def skip(self, *, timeout: float) -> dict[str, Any]:
        """Move the event this projection is stuck on to the dead letters and go on."""
        return await self.call(self._skip_now, timeout=timeout)

    async def _skip_now(self) -> dict[str, Any]:
        if self.refused:  # the events before the stuck one would be applied into those tables
            raise self.refused
        if self._persisted is None or (self.stuck is None and not self.failed):
            raise NothingToSkip(f"projection {self.name!r} is not stuck on an event")
        async with self.pool.connection() as conn:
            batch = await self.fetch(conn, self._position)
        stuck = self.stuck or self._stuck_from_record(batch)
        if stuck is None:
            raise NothingToSkip(f"projection {self.name!r} is not stuck on an event")
        event = stuck.event
        ahead = [e for e in batch.events if e.commit_position < event.commit_position]
        if not any(e.event_id == event.event_id for e in batch.events):
            raise NothingToSkip(f"projection {self.name!r} has moved on; nothing skipped")
        error = self.status.last_error or {}
        await self._dead_letter(event, ahead, error, stuck.traceback, by="operator")
        return {
            "event_id": str(event.event_id),
            "event_type": event.type,
            "global_position": event.global_position,
            "applied_before": len(ahead),
        }

    def _stuck_from_record(self, batch: Batch) -> StuckEvent | None:
        """A projection found `failed` when its runner started (after a restart, or on another
        instance) is stuck on the event its stored error names: the first one after its
        checkpoint, since the events before it were committed."""
        error = self.status.last_error or {}
        if not (self.failed and batch.events and error.get("event_id")):
            return None
        first = batch.events[0]
        if str(first.event_id) != error["event_id"]:
            return None
        return StuckEvent(first, first.commit_position, error.get("traceback") or "")
