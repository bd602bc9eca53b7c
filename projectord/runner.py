"""The projection runner: fetch the next batch in commit order, apply it, move the checkpoint.

One runner per projection. Each batch runs in one transaction that holds the handler's writes and
the checkpoint's compare-and-set, so the read model and the checkpoint commit together or not at
all. A handler that raises rolls its batch back and is retried with backoff; the runner never moves
past an event it did not apply. Other runners are unaffected.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Any

import anyio
import psycopg
from psycopg import AsyncConnection
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from projectord.event_store import Event
from projectord.logs import get_logger
from projectord.projection import Projection
from projectord.queries import Queries

log = get_logger("projectord.runner")

Checkpoint = tuple[int, int]  # (transaction_id, global_position)

# While committed events wait behind an older open transaction, poll this fast (seconds):
# that transaction may end without any NOTIFY.
HELD_BACK_POLL = (0.02, 0.25)
# How often an empty batch may persist a checkpoint moved to the horizon (seconds).
HORIZON_PERSIST_INTERVAL = 5.0
RETRY_BACKOFF = (0.1, 30.0)


class CheckpointMoved(Exception):
    """The stored checkpoint is not the one this runner read: someone else moved it."""


class Wakeup:
    """A wake-up signal that is never lost: `set` before `wait` makes the next `wait` return."""

    def __init__(self) -> None:
        self._event = anyio.Event()

    def set(self) -> None:
        self._event.set()

    async def wait(self, timeout: float) -> bool:
        with anyio.move_on_after(timeout):
            await self._event.wait()
        woke = self._event.is_set()
        if woke:
            self._event = anyio.Event()
        return woke


def is_transient(exc: BaseException) -> bool:
    """Errors that say nothing about the handler: the connection or the server's concurrency."""
    return isinstance(
        exc,
        (
            psycopg.OperationalError,
            psycopg.errors.SerializationFailure,
            psycopg.errors.DeadlockDetected,
            psycopg.errors.LockNotAvailable,
        ),
    ) and not isinstance(exc, psycopg.errors.QueryCanceled)


@dataclass
class Batch:
    events: list[Event]
    horizon: int
    held_back: bool

    @property
    def last(self) -> Checkpoint:
        return self.events[-1].commit_position


@dataclass
class RunnerStatus:
    """What a runner reports about itself (status, health, metrics)."""

    name: str
    state: str = "starting"
    checkpoint: Checkpoint = (0, 0)
    applied_total: int = 0
    last_error: dict[str, Any] | None = None
    held_back: bool = False
    last_batch_at: float = 0.0
    recent: list[tuple[float, int]] = field(default_factory=list)  # (monotonic time, count)

    def record_batch(self, count: int) -> None:
        now = time.monotonic()
        self.last_batch_at = now
        self.recent.append((now, count))
        cutoff = now - 10.0
        while self.recent and self.recent[0][0] < cutoff:
            self.recent.pop(0)

    def events_per_second(self) -> float:
        now = time.monotonic()
        window = [(t, n) for t, n in self.recent if t >= now - 10.0]
        if not window:
            return 0.0
        return sum(n for _, n in window) / max(now - window[0][0], 1.0)


class ProjectionRunner:
    def __init__(
        self,
        projection: Projection,
        pool: AsyncConnectionPool,
        queries: Queries,
        *,
        batch_size: int,
        poll_interval: float,
    ) -> None:
        self.projection = projection
        self.pool = pool
        self.queries = queries
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        self.types = list(projection.event_types)
        self.wakeup = Wakeup()
        self.status = RunnerStatus(projection.name)
        self._stopping = False
        self._persisted: Checkpoint | None = None  # the stored checkpoint, as last read or written
        self._position: Checkpoint = (0, 0)  # may run ahead of it, up to the safe horizon
        self._persisted_at = 0.0
        self._log = log.bind(projection=projection.name)

    @property
    def name(self) -> str:
        return self.projection.name

    def request_stop(self) -> None:
        """Finish the batch in flight, start no other."""
        self._stopping = True
        self.wakeup.set()

    async def run(self) -> None:
        failures = 0
        held_back_wait = HELD_BACK_POLL[0]
        while not self._stopping:
            try:
                if self._persisted is None:
                    await self._load_checkpoint()
                batch = await self.step()
            except CheckpointMoved:
                self._log.warning("checkpoint.moved", position=self._position)
                self._persisted = None
                continue
            except Exception as exc:
                failures += 1
                await self._on_failure(exc, failures)
                if self._stopping:
                    break
                await anyio.sleep(_backoff(failures))
                continue
            if failures:
                self._log.info("projection.recovered", attempts=failures)
                failures = 0
            self.status.state = "running"
            self.status.held_back = batch.held_back
            if len(batch.events) >= self.batch_size:
                continue  # more to catch up
            if batch.held_back:
                await self.wakeup.wait(held_back_wait)
                held_back_wait = min(held_back_wait * 2, HELD_BACK_POLL[1])
            else:
                held_back_wait = HELD_BACK_POLL[0]
                await self.wakeup.wait(self.poll_interval)
        self.status.state = "stopped"

    async def _load_checkpoint(self) -> None:
        async with self.pool.connection() as conn:
            await conn.execute(self.queries["ensure_position"], {"name": self.name})
            cur = await conn.execute(self.queries["read_position"], {"name": self.name})
            row = await cur.fetchone()
        assert row is not None
        self._persisted = (int(row[0]), int(row[1]))
        self._position = self._persisted
        self.status.checkpoint = self._persisted
        self.status.applied_total = int(row[3])

    async def step(self) -> Batch:
        """Fetch one batch and apply it; returns the batch (empty when there was nothing)."""
        async with self.pool.connection() as conn:
            batch = await self.fetch(conn, self._position)
            if batch.events:
                await self.apply(conn, batch)
            else:
                await self._advance_idle(conn, batch)
        return batch

    async def fetch(self, conn: AsyncConnection[Any], after: Checkpoint) -> Batch:
        cur = await conn.execute(
            self.queries["fetch_batch"],
            {
                "txid": str(after[0]),
                "position": after[1],
                "types": self.types,
                "limit": self.batch_size,
            },
        )
        rows = await cur.fetchall()
        horizon = int(rows[0][0])
        held_back = bool(rows[0][1])
        events = [
            Event(r[2], r[3], r[4], r[5], r[6], r[7], r[8], r[9], r[10], r[11], int(r[12]))
            for r in rows
            if r[2] is not None
        ]
        # The query returns commit order; sorting an already sorted list is a linear check that
        # keeps the guarantee even if a future plan stopped preserving it.
        events.sort(key=_commit_position)
        return Batch(events, horizon, held_back)

    def _next_checkpoint(self, batch: Batch) -> Checkpoint:
        """After a short batch everything below the horizon has been seen: move there, so events
        of other types are never scanned again. After a full batch, stop at its last event."""
        if len(batch.events) < self.batch_size:
            return max((batch.horizon, 0), batch.last if batch.events else self._position)
        return batch.last

    async def apply(self, conn: AsyncConnection[Any], batch: Batch) -> None:
        assert self._persisted is not None
        new = self._next_checkpoint(batch)
        started = time.perf_counter()
        try:
            async with conn.transaction():
                await self.projection.handle(batch.events, conn)
                await self._compare_and_set(conn, new, len(batch.events))
        except BaseException:
            # Cancelled mid-batch (drain timeout): psycopg's own rollback may have been cancelled
            # too. Roll back under a shield; if even that fails, the pool discards the connection
            # and the server rolls back when it closes. Nothing of the batch is ever committed.
            with anyio.move_on_after(2, shield=True):
                try:
                    if not conn.closed and conn.info.transaction_status != 0:
                        await conn.rollback()
                except psycopg.Error:
                    pass
            raise
        self._persisted = self._position = new
        self._persisted_at = time.monotonic()
        self.status.checkpoint = new
        self.status.applied_total += len(batch.events)
        self.status.last_error = None
        self.status.record_batch(len(batch.events))
        self._log.debug(
            "batch.applied",
            count=len(batch.events),
            from_position=batch.events[0].global_position,
            to_position=batch.events[-1].global_position,
            duration_ms=round((time.perf_counter() - started) * 1000, 2),
        )

    async def _advance_idle(self, conn: AsyncConnection[Any], batch: Batch) -> None:
        new = self._next_checkpoint(batch)
        if new <= self._position:
            return
        self._position = new
        if time.monotonic() - self._persisted_at >= HORIZON_PERSIST_INTERVAL:
            async with conn.transaction():
                await self._compare_and_set(conn, new, 0)
            self._persisted = new
            self._persisted_at = time.monotonic()
            self.status.checkpoint = new

    async def _compare_and_set(self, conn: AsyncConnection[Any], new: Checkpoint, n: int) -> None:
        assert self._persisted is not None
        cur = await conn.execute(
            self.queries["advance_checkpoint"],
            {
                "name": self.name,
                "new_txid": str(new[0]),
                "new_position": new[1],
                "old_txid": str(self._persisted[0]),
                "old_position": self._persisted[1],
                "applied": n,
            },
        )
        if cur.rowcount != 1:
            raise CheckpointMoved(self.name)

    async def _on_failure(self, exc: Exception, attempts: int) -> None:
        transient = is_transient(exc)
        self.status.state = "degraded" if transient else "retrying"
        error = {
            "type": type(exc).__name__,
            "message": str(exc)[:2000],
            "attempts": attempts,
            "transient": transient,
            "at": time.time(),
        }
        self.status.last_error = error
        event = "projection.database_unavailable" if transient else "projection.failed"
        if attempts == 1 or attempts % 10 == 0:
            self._log.error(
                event,
                error=error["message"],
                error_type=error["type"],
                attempts=attempts,
                position=self._position,
            )
        if transient:
            return
        try:
            async with self.pool.connection(timeout=5) as conn:
                await conn.execute(
                    self.queries["record_error"], {"name": self.name, "error": Jsonb(error)}
                )
        except Exception as record_exc:  # the database may be what failed; the log has it
            self._log.debug("projection.error_not_recorded", error=str(record_exc))


def _commit_position(event: Event) -> Checkpoint:
    return (event.transaction_id, event.global_position)


def _backoff(attempts: int) -> float:
    low, high = RETRY_BACKOFF
    delay = min(high, low * 2 ** min(attempts - 1, 20))
    return delay * random.uniform(0.5, 1.0)
