"""The projection runner: fetch the next batch in commit order, apply it, move the checkpoint.

One runner per projection. Each batch runs in one transaction that holds the handler's writes and
the checkpoint's compare-and-set, so the read model and the checkpoint commit together or not at
all. A handler that raises rolls its batch back and is retried with backoff; the runner never moves
past an event it did not apply, unless an operator `skip`s it into the dead letters. Other runners
are unaffected.

Operator actions that touch the checkpoint (rebuild, skip) run inside the runner's own task,
between batches (`call`), so they never race a batch. Pause needs no cooperation: it is a state in
the positions row that the checkpoint's compare-and-set checks, so no batch commits once a pause
has committed.
"""

from __future__ import annotations

import random
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import psycopg
import psycopg_pool
from psycopg import AsyncConnection
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from projectord.event_store import Event
from projectord.fetcher import Batch, Fetcher, ReadAhead
from projectord.heartbeat import Heartbeat
from projectord.listener import NotificationListener
from projectord.logs import get_logger
from projectord.projection import Projection
from projectord.queries import Queries, quote_ident

log = get_logger("projectord.runner")

Checkpoint = tuple[int, int]  # (transaction_id, global_position)
BatchObserver = Callable[[str, int, float], None]  # (projection, events, seconds)

# While committed events wait behind an older open transaction, poll this fast (seconds):
# that transaction may end without any NOTIFY.
HELD_BACK_POLL = (0.02, 0.25)
# How often an empty batch may persist a checkpoint moved to the horizon (seconds). Only a restart
# gains from it (it rescans less), and every transaction, the daemon's own included, moves the
# horizon: at 5 s, 50 idle projections committed 10 checkpoint transactions a second forever.
HORIZON_PERSIST_INTERVAL = 60.0
RETRY_BACKOFF = (0.1, 30.0)
TRANSIENT_BACKOFF_CAP = 2.0
# A rebuild waits at most this long for the locks on the projection's tables.
REBUILD_LOCK_TIMEOUT = "10s"
TRACEBACK_LIMIT = 20_000


class CheckpointMoved(Exception):
    """The stored checkpoint is not the one this runner read: someone else moved it."""


class RunnerBusy(Exception):
    """The runner did not take an operator request in time (it is inside a long batch)."""


class NothingToSkip(Exception):
    """`skip` asked of a projection that is not stuck on an event."""


class BatchFailed(Exception):
    """Applying a batch raised; carries the batch so the failing event can be found."""

    def __init__(self, batch: Batch, error: Exception) -> None:
        super().__init__(str(error))
        self.batch = batch
        self.error = error


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
            psycopg_pool.PoolTimeout,
            psycopg.OperationalError,
            psycopg.errors.SerializationFailure,
            psycopg.errors.DeadlockDetected,
            psycopg.errors.LockNotAvailable,
        ),
    ) and not isinstance(exc, psycopg.errors.QueryCanceled)


@dataclass
class StuckEvent:
    """The event a failing projection cannot get past, found by replaying its batch."""

    event: Event
    batch_start: Checkpoint  # first event of the failed batch: identifies the batch
    traceback: str


@dataclass
class RebuildProgress:
    """A rebuild from the first event: how far it has come."""

    total: int  # events of the projection's types committed when the rebuild began
    target: Checkpoint | None  # the last of them; the rebuild is done once the checkpoint passes it
    started_at: float = field(default_factory=time.time)
    finished_at: float | None = None

    def report(self, applied: int, rate: float) -> dict[str, Any]:
        remaining = max(self.total - applied, 0)
        done = self.finished_at is not None
        return {
            "applied": applied,
            "total": self.total,
            "events_per_second": round(rate, 1),
            "eta_seconds": 0.0 if done else (round(remaining / rate, 1) if rate > 0 else None),
            "done": done,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
        }


@dataclass
class RunnerStatus:
    """What a runner reports about itself (status, health, metrics)."""

    name: str
    state: str = "starting"
    checkpoint: Checkpoint = (0, 0)
    applied_total: int = 0
    last_error: dict[str, Any] | None = None
    held_back: bool = False
    held_back_since: float | None = None  # monotonic time the horizon started holding it back
    last_batch_at: float = 0.0
    errors_total: int = 0
    rebuild: RebuildProgress | None = None
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

    def record_held_back(self, held_back: bool) -> None:
        self.held_back = held_back
        if not held_back:
            self.held_back_since = None
        elif self.held_back_since is None:
            self.held_back_since = time.monotonic()


@dataclass
class _Request:
    """An operator action waiting for the runner's task."""

    action: Callable[[], Awaitable[Any]]
    done: anyio.Event = field(default_factory=anyio.Event)
    started: bool = False
    result: Any = None
    error: BaseException | None = None


class ProjectionRunner:
    def __init__(
        self,
        projection: Projection,
        pool: AsyncConnectionPool,
        queries: Queries,
        *,
        batch_size: int,
        poll_interval: float,
        on_batch: BatchObserver | None = None,
        listener: NotificationListener | None = None,
    ) -> None:
        self.projection = projection
        self.listener = listener  # None: rely on notifications the listener sends as it is
        self.pool = pool
        self.queries = queries
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        self.on_batch = on_batch
        self.types = list(projection.event_types)
        self.fetcher = Fetcher(queries, self.types)
        self._read_ahead = ReadAhead(self.fetcher, pool)
        self.wakeup = Wakeup()  # new events (notifications), operator requests, stop
        self.control = Wakeup()  # operator requests and stop only: ends a pause or a backoff
        self.status = RunnerStatus(projection.name)
        self.heartbeat = Heartbeat(f"runner:{projection.name}")
        self.paused = False  # as last read from the positions row
        self.stuck: StuckEvent | None = None
        self._requests: list[_Request] = []
        self._reload = False  # re-read the positions row before the next batch
        self._failures = 0
        self._held_back_wait = HELD_BACK_POLL[0]
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
        self.control.set()

    def nudge(self) -> None:
        """Make the runner re-read its positions row before its next batch (after a pause or a
        resume). A batch in flight is not disturbed: a pause stops it at its compare-and-set."""
        self._reload = True
        self.control.set()
        self.wakeup.set()

    async def run(self) -> None:
        try:
            while not self._stopping:
                self.heartbeat.beat()
                await self._serve_requests()
                if self._stopping:
                    break
                await self._turn()
        finally:
            self._refuse_requests()
            self._set_state("stopped")

    async def _turn(self) -> None:
        """One turn of the loop: a batch, or a wait."""
        try:
            if self._persisted is None or self._reload:
                await self._load_checkpoint()
            if self.paused:
                await self._wait_paused()
                return
            armed = self.listener is None or self.listener.armed
            batch = await self.step()
        except CheckpointMoved:
            self._persisted = None
            await self._load_checkpoint_after_move()
            return
        except BatchFailed as failed:
            await self._on_failure(failed.error, failed.batch)
            await self._wait_backoff(_backoff(self._failures, failed.error))
            return
        except Exception as exc:
            await self._on_failure(exc, None)
            await self._wait_backoff(_backoff(self._failures, exc))
            return
        self._on_success(batch)
        if len(batch.events) < self.batch_size:
            await self._wait_for_events(batch.held_back, armed)

    async def _load_checkpoint_after_move(self) -> None:
        try:
            await self._load_checkpoint()
        except Exception as exc:  # the next turn retries the read and reports the failure
            self._log.debug("checkpoint.reload_failed", error=str(exc))
            return
        if not self.paused:
            self._log.warning("checkpoint.moved", position=self._position)

    async def _load_checkpoint(self) -> None:
        async with self.pool.connection() as conn:
            await conn.execute(self.queries["ensure_position"], {"name": self.name})
            cur = await conn.execute(self.queries["read_position"], {"name": self.name})
            row = await cur.fetchone()
        assert row is not None
        self._persisted = (int(row[0]), int(row[1]))
        self._position = self._persisted
        self.paused = row[2] == "paused"
        self._reload = False
        self.status.checkpoint = self._persisted
        self.status.applied_total = int(row[3])

    async def step(self) -> Batch:
        """Fetch one batch and apply it; returns the batch (empty when there was nothing)."""
        async with self.pool.connection() as conn:
            batch = self._read_ahead.take(self._position)
            if batch is None:
                batch = await self.fetch(conn, self._position)
            if batch.events:
                try:
                    await self._apply_reading_ahead(conn, batch)
                except CheckpointMoved:
                    raise
                except Exception as exc:
                    raise BatchFailed(batch, exc) from exc
            else:
                await self._advance_idle(conn, batch)
        return batch

    async def fetch(self, conn: AsyncConnection[Any], after: Checkpoint) -> Batch:
        return await self.fetcher.fetch(conn, after, self.batch_size)

    async def _apply_reading_ahead(self, conn: AsyncConnection[Any], batch: Batch) -> None:
        """Apply a batch; when it is full (a catch-up), read the next one meanwhile on another
        connection (projectord/fetcher.py). Errors are the batch's own, never the read-ahead's."""
        if len(batch.events) < self.batch_size:
            await self.apply(conn, batch)
            return
        failure: Exception | None = None
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(self._read_ahead.read, batch.last, self.batch_size)
            try:
                await self.apply(conn, batch)
            except Exception as exc:
                failure = exc
                tasks.cancel_scope.cancel()
        if failure is not None:
            self._read_ahead.discard()
            raise failure

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
        duration = time.perf_counter() - started
        self._moved_to(new, len(batch.events))
        if self.on_batch is not None:
            self.on_batch(self.name, len(batch.events), duration)
        self._log.debug(
            "batch.applied",
            count=len(batch.events),
            from_position=batch.events[0].global_position,
            to_position=batch.events[-1].global_position,
            duration_ms=round(duration * 1000, 2),
        )

    def _moved_to(self, new: Checkpoint, applied: int) -> None:
        """Bookkeeping after a committed move of the checkpoint over `applied` events."""
        self._persisted = self._position = new
        self._persisted_at = time.monotonic()
        self.status.checkpoint = new
        self.status.applied_total += applied
        self.status.last_error = None
        self.stuck = None
        self.status.record_batch(applied)

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

    async def _compare_and_set(
        self, conn: AsyncConnection[Any], new: Checkpoint, n: int, *, even_if_paused: bool = False
    ) -> None:
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
                "even_if_paused": even_if_paused,
            },
        )
        if cur.rowcount != 1:
            raise CheckpointMoved(self.name)

    # -- waiting -------------------------------------------------------------------------------

    async def _wait_for_events(self, held_back: bool, armed: bool) -> None:
        with self.heartbeat.waiting():
            if not armed and self.listener is not None:
                # Appends notify only while the listener is armed, and it was not when this batch
                # was read: arm it and read once more before sleeping (listener.py). If it cannot
                # be armed now, poll soon instead, as for events held back.
                if await self.listener.arm():
                    return
                held_back = True
            if held_back:
                await self.wakeup.wait(self._held_back_wait)
                self._held_back_wait = min(self._held_back_wait * 2, HELD_BACK_POLL[1])
            else:
                self._held_back_wait = HELD_BACK_POLL[0]
                idle = self.poll_interval
                if self.listener is not None:  # it polls for every runner (listener.py)
                    idle = self.listener.runner_poll_interval(idle)
                await self.wakeup.wait(idle)

    async def _wait_paused(self) -> None:
        """Paused: ignore notifications; re-read the state on a nudge or every poll interval
        (a resume may also come from another process)."""
        self._set_state("paused")
        self.status.record_held_back(False)
        with self.heartbeat.waiting():
            await self.control.wait(self.poll_interval)
        self._reload = True

    async def _wait_backoff(self, delay: float) -> None:
        """Back off after a failure; an operator request, a pause or a stop ends it early."""
        deadline = time.monotonic() + delay
        with self.heartbeat.waiting():
            while not (self._stopping or self._requests or self._reload):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                await self.control.wait(left)

    # -- success and failure -------------------------------------------------------------------

    def _on_success(self, batch: Batch) -> None:
        if self._failures:
            self._log.info("projection.recovered", attempts=self._failures)
            self._failures = 0
            if self.status.last_error and self.status.last_error.get("transient"):
                self.status.last_error = None
        self.status.record_held_back(batch.held_back)
        rebuild = self.status.rebuild
        if rebuild is not None and rebuild.finished_at is None:
            if rebuild.target is None or self._position >= rebuild.target:
                rebuild.finished_at = time.time()
                self._log.info(
                    "projection.rebuilt",
                    applied=self.status.applied_total,
                    seconds=round(rebuild.finished_at - rebuild.started_at, 3),
                )
            else:
                self._set_state("rebuilding")
                return
        self._set_state("running")

    async def _on_failure(self, exc: Exception, batch: Batch | None) -> None:
        self._failures += 1
        attempts = self._failures
        self.status.errors_total += 1
        transient = is_transient(exc)
        self._set_state("degraded" if transient else "retrying")
        if not transient and batch is not None:
            await self._find_stuck_event(batch, exc)
        event = self.stuck.event if self.stuck is not None else None
        error = {
            "type": type(exc).__name__,
            "message": str(exc)[:2000],
            "attempts": attempts,
            "transient": transient,
            "at": time.time(),
            "event_id": str(event.event_id) if event else None,
            "event_type": event.type if event else None,
            "global_position": event.global_position if event else None,
            "transaction_id": str(event.transaction_id) if event else None,
        }
        self.status.last_error = error
        event_name = "projection.database_unavailable" if transient else "projection.failed"
        if attempts == 1 or attempts % 10 == 0:
            self._log.error(
                event_name,
                error=error["message"],
                error_type=error["type"],
                attempts=attempts,
                position=self._position,
                event_id=error["event_id"],
                event_type=error["event_type"],
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

    async def _find_stuck_event(self, batch: Batch, exc: Exception) -> None:
        """Which event of a failed batch fails: replay the batch one event at a time in a
        transaction that is always rolled back, so nothing of the search commits. Done once per
        failed batch; a batch whose events only fail together leaves it unknown."""
        start = batch.events[0].commit_position
        if self.stuck is not None and self.stuck.batch_start == start:
            return
        self.stuck = None
        culprit: Event | None = batch.events[0] if len(batch.events) == 1 else None
        error: BaseException = exc
        if culprit is None:
            try:
                async with self.pool.connection(timeout=5) as conn:
                    async with conn.transaction(force_rollback=True):
                        for event in batch.events:
                            try:
                                await self.projection.handle([event], conn)
                            except Exception as event_exc:
                                culprit, error = event, event_exc
                                break
            except Exception as search_exc:
                self._log.debug("projection.search_failed", error=str(search_exc))
                return
        if culprit is not None:
            text = "".join(traceback.format_exception(error))[-TRACEBACK_LIMIT:]
            self.stuck = StuckEvent(culprit, start, text)

    def _set_state(self, state: str) -> None:
        """One log line per change of state, not per turn of the loop."""
        old = self.status.state
        if state == old:
            return
        self.status.state = state
        quiet = state in ("retrying", "degraded") or old == "starting" or state == "stopped"
        if not quiet:
            self._log.info("projection.state_changed", previous=old, state=state)

    # -- operator requests ---------------------------------------------------------------------

    async def call(self, action: Callable[[], Awaitable[Any]], *, timeout: float) -> Any:
        """Run `action` in this runner's own task, between two batches, so it never races one.
        Raises `RunnerBusy` when the runner did not take it within `timeout` (nothing was done)."""
        request = _Request(action)
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

    async def rebuild(self, *, timeout: float) -> dict[str, Any]:
        """Empty the projection's tables and reset its checkpoint in one transaction; the runner
        then catches up from the first event. A paused projection is resumed."""
        return await self.call(self._rebuild_now, timeout=timeout)

    async def _rebuild_now(self) -> dict[str, Any]:
        params = {"txid": "0", "position": 0, "types": self.types}
        async with self.pool.connection() as conn, conn.transaction():
            await conn.execute(f"SET LOCAL lock_timeout = '{REBUILD_LOCK_TIMEOUT}'")
            if self.projection.tables:
                tables = ", ".join(quote_ident(t) for t in self.projection.tables)
                await conn.execute(f"TRUNCATE {tables}")
            await conn.execute(self.queries["reset_position"], {"name": self.name})
            cur = await conn.execute(self.queries["count_unapplied"], params)
            total = int((await cur.fetchone() or (0,))[0])
            cur = await conn.execute(self.queries["latest_event_of_types"], params)
            row = await cur.fetchone()
        target = (int(row[0]), int(row[1])) if row else None
        self._persisted = self._position = (0, 0)
        self._persisted_at = time.monotonic()
        self.paused = False
        self.stuck = None
        self._failures = 0
        self.status.checkpoint = (0, 0)
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
        stuck = self.stuck
        if stuck is None or self._persisted is None:
            raise NothingToSkip(f"projection {self.name!r} is not stuck on an event")
        event = stuck.event
        error = self.status.last_error or {}
        async with self.pool.connection() as conn:
            batch = await self.fetch(conn, self._position)
            ahead = [e for e in batch.events if e.commit_position < event.commit_position]
            if not any(e.event_id == event.event_id for e in batch.events):
                raise NothingToSkip(f"projection {self.name!r} has moved on; nothing skipped")
            async with conn.transaction():
                if ahead:  # events of the failed batch before the stuck one
                    await self.projection.handle(ahead, conn)
                await conn.execute(
                    self.queries["insert_dead_letter"],
                    {
                        "projection": self.name,
                        "event_id": event.event_id,
                        "global_position": event.global_position,
                        "transaction_id": str(event.transaction_id),
                        "event_type": event.type,
                        "error_type": error.get("type"),
                        "error_message": error.get("message", ""),
                        "traceback": stuck.traceback,
                        "attempts": int(error.get("attempts") or self._failures),
                    },
                )
                await self._compare_and_set(
                    conn, event.commit_position, len(ahead), even_if_paused=True
                )
        self._moved_to(event.commit_position, len(ahead))
        self._failures = 0
        self._log.warning(
            "event.dead_lettered",
            event_id=str(event.event_id),
            event_type=event.type,
            global_position=event.global_position,
            applied_before=len(ahead),
        )
        return {
            "event_id": str(event.event_id),
            "event_type": event.type,
            "global_position": event.global_position,
            "applied_before": len(ahead),
        }


def _backoff(attempts: int, error: BaseException) -> float:
    """Exponential backoff with jitter. A lost database is retried at least every
    TRANSIENT_BACKOFF_CAP seconds, so the daemon is back soon after the server is."""
    low, high = RETRY_BACKOFF
    if is_transient(error):
        high = TRANSIENT_BACKOFF_CAP
    delay = min(high, low * 2 ** min(attempts - 1, 20))
    return delay * random.uniform(0.5, 1.0)
