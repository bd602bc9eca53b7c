"""The projection runner: fetch the next batch in commit order, apply it, move the checkpoint.

One runner per projection. Each batch runs in one transaction that holds the handler's writes and
the checkpoint's compare-and-set, so the read model and the checkpoint commit together or not at
all. What happens when a batch fails is the projection's error policy (projectord/error_policy.py):
transient database errors are retried until the database is back; a handler failure is retried
with backoff up to `max_attempts`, then the batch is bisected, committing the events before the
poison event, and `on_error` decides: stop in state `failed` until an operator acts, or move the
event to the dead letters and go on. The runner never moves past an event it did not apply except
into the dead letters. Other runners are unaffected.

Operator actions that touch the checkpoint (rebuild, skip) run inside the runner's own task,
between batches (`call`), so they never race a batch. Pause needs no cooperation: it is a state in
the positions row that the checkpoint's compare-and-set checks, so no batch commits once a pause
has committed.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import psycopg
from psycopg import AsyncConnection
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from projectord.commit_watch import CommitWatch
from projectord.database import DeadConnection, condemn, deadline
from projectord.dead_letters import dead_letter_params, format_traceback
from projectord.error_policy import ErrorPolicy, backoff, client_side, is_transient
from projectord.event_store import Event
from projectord.fetcher import DEFAULT_BATCH_MAX_BYTES, Batch, Fetcher, ReadAhead
from projectord.foreign_owner import (
    ForeignOwnerError,
    foreign_code,
    foreign_owned,
    refusal,
    refused_by_guard,
)
from projectord.handler_timeout import HandlerClock, handler_of, run_handler
from projectord.heartbeat import Heartbeat
from projectord.listener import NotificationListener
from projectord.logs import get_logger
from projectord.projection import Projection
from projectord.queries import Queries, quote_ident

log = get_logger("projectord.runner")

Checkpoint = tuple[int, int]  # (transaction_id, global_position)
BatchObserver = Callable[[str, int, float], None]  # (projection, events, seconds)

# While committed events wait behind an older open transaction, poll this fast (seconds), doubling
# up to the second figure: that transaction may end without any NOTIFY. The same backoff serves a
# runner that found nothing while the listener cannot be armed (writers are busy: listener.py).
HELD_BACK_POLL = (0.001, 0.25)
# How often an empty batch may persist a checkpoint moved to the horizon (seconds). Only a restart
# gains from it (it rescans less), and every transaction, the daemon's own included, moves the
# horizon: at 5 s, 50 idle projections committed 10 checkpoint transactions a second forever.
HORIZON_PERSIST_INTERVAL = 60.0
# What the checkpoint's compare-and-set raises when the row moved (sql/migrations/0008_…).
CHECKPOINT_MOVED_SQLSTATE = "PJ001"
# After a read while the listener was disarmed, wait at most this long (seconds) for the arming
# it asks for to wake the runner (listener.py; normally within a commit's time). An arming that
# timed out (a writer kept its stripe) wakes nobody: the runner reads again after this pause.
BUSY_READ_PAUSE = 0.02
# A rebuild waits at most this long for the locks on the projection's tables.
REBUILD_LOCK_TIMEOUT = "10s"
# How often a batch also records which tables its handler wrote (seconds; and always a runner's
# first batch): what lets `rebuild` refuse a projection that writes tables it does not declare.
# One statement more in the batch's pipeline, no round trip; sampled, so live batches of one event
# do not pay for it each time.
WRITES_SAMPLE_INTERVAL = 10.0


class CheckpointMoved(Exception):
    """The stored checkpoint is not the one this runner read: someone else moved it."""


class RunnerBusy(Exception):
    """The runner did not take an operator request in time (it is inside a long batch)."""


class UndeclaredWrites(Exception):
    """`rebuild` refused: the projection writes tables it does not declare, which a rebuild does
    not empty, so it would apply every event to them a second time."""


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
        policy: ErrorPolicy | None = None,
        owner: str | None = None,
        batch_max_bytes: int = DEFAULT_BATCH_MAX_BYTES,
        read_model_schema: str | None = None,
        observe_writes: bool = True,
    ) -> None:
        self.projection = projection
        # Where the projection's tables live: checked for a foreign owner whenever the positions
        # row is read (projectord/foreign_owner.py). None: not checked.
        self.read_model_schema = read_model_schema
        # Record which tables the handler writes, now and then (WRITES_SAMPLE_INTERVAL); off for
        # an online rebuild's shadow, whose guard checks every batch instead.
        self.observe_writes = observe_writes
        self._writes_recorded_at: float | None = None
        self.policy = policy or ErrorPolicy()
        # The daemon instance this runner commits for; the compare-and-set checks it against the
        # positions row's owner. None: no ownership (one-off runners such as an online rebuild's).
        self.owner = owner
        self.listener = listener  # None: rely on notifications the listener sends as it is
        self.pool = pool
        self.queries = queries
        self.batch_size = batch_size
        self.batch_max_bytes = batch_max_bytes  # a batch and the one read ahead, together
        self.poll_interval = poll_interval
        self.on_batch = on_batch
        self.types = list(projection.event_types)
        self.fetcher = Fetcher(queries, self.types)
        self._read_ahead = ReadAhead(self.fetcher, pool)
        self.wakeup = Wakeup()  # new events (notifications), operator requests, stop
        self.control = Wakeup()  # operator requests and stop only: ends a pause or a backoff
        self.status = RunnerStatus(projection.name)
        self.heartbeat = Heartbeat(f"runner:{projection.name}")
        self.clock = HandlerClock()  # the handler timeout of every call this runner makes
        # How long a pipelined batch's answer is awaited: while the server works on it.
        self.commit_watch = CommitWatch(pool.conninfo if isinstance(pool.conninfo, str) else "")
        self.paused = False  # as last read from the positions row
        self.failed = False  # stopped on a poison event (on_error = "pause"), as last read
        self.standby = False  # the positions row names another owner: commit nothing, wait
        self.refused: ForeignOwnerError | None = None  # a table another role owns: wait
        self.stuck: StuckEvent | None = None
        self._requests: list[_Request] = []
        self._reload = False  # re-read the positions row before the next batch
        self._failures = 0  # handler failures of the batch at the checkpoint
        self._transient_failures = 0  # database errors in a row; never counted as the above
        self._held_back_wait = HELD_BACK_POLL[0]
        self._stopping = False
        self._persisted: Checkpoint | None = None  # the stored checkpoint, as last read or written
        self._position: Checkpoint = (0, 0)  # may run ahead of it, up to the safe horizon
        self._persisted_at = 0.0
        # Send a batch's statements, the compare-and-set and COMMIT without waiting for each
        # result (psycopg's pipeline mode); off for a projection that says so, or whose handler
        # turns out to use COPY.
        self._pipelined = projection.pipeline
        self._log = log.bind(projection=projection.name)

    @property
    def name(self) -> str:
        return self.projection.name

    def request_stop(self) -> None:
        """Finish the batch in flight, start no other."""
        self._stopping = True
        self.wakeup.set()
        self.control.set()

    def reset(self) -> None:
        """Ready a stopped runner to run again (its daemon owns the projection again): all it
        knew about the projection is read afresh from the positions row."""
        self._stopping = False
        self._persisted = None
        self._reload = False
        self._failures = self._transient_failures = 0
        self.paused = self.failed = self.standby = False
        self.refused = None
        self.stuck = None
        self._read_ahead.discard()
        self.status.state = "starting"
        self.status.last_error = None
        self.status.record_held_back(False)

    def nudge(self) -> None:
        """Make the runner re-read its positions row before its next batch (after a pause or a
        resume). A batch in flight is not disturbed: a pause stops it at its compare-and-set."""
        self._reload = True
        self.control.set()
        self.wakeup.set()

    async def run(self) -> None:
        try:
            async with self.clock.watching(), self.commit_watch.watching():
                while not self._stopping:
                    self.heartbeat.beat()
                    await self._serve_requests()
                    if self._stopping:
                        break
                    await self._turn()
        finally:
            self._refuse_requests()
            self.status.record_held_back(False)
            self._set_state("stopped")

    async def _turn(self) -> None:
        """One turn of the loop: a batch, or a wait."""
        try:
            if self._persisted is None or self._reload:
                await self._load_checkpoint()
            if self.paused or self.failed or self.standby or self.refused:
                await self._wait_paused()
                return
            if self._failures >= self.policy.max_attempts:
                await self._isolate_poison()
                return
            armed = self.listener is None or self.listener.armed
            batch = await self.step()
        except CheckpointMoved:
            self._persisted = None
            await self._load_checkpoint_after_move()
            return
        except BatchFailed as failed:
            await self._on_error(failed.error, failed.batch)
            return
        except Exception as exc:
            await self._on_error(exc, None)
            return
        self._on_success(batch)
        if batch.short:
            await self._wait_for_events(batch.held_back, armed, bool(batch.events))

    async def _load_checkpoint_after_move(self) -> None:
        try:
            await self._load_checkpoint()
        except Exception as exc:  # the next turn retries the read and reports the failure
            self._log.debug("checkpoint.reload_failed", error=str(exc))
            return
        if not (self.paused or self.failed or self.standby):
            self._log.warning("checkpoint.moved", position=self._position)

    async def _load_checkpoint(self) -> None:
        async with self.pool.connection() as conn, deadline(conn, "a checkpoint read"):
            await conn.execute(self.queries["ensure_position"], {"name": self.name})
            cur = await conn.execute(self.queries["read_position"], {"name": self.name})
            row = await cur.fetchone()
            await self._check_owners(conn)
        assert row is not None
        self._persisted = (int(row[0]), int(row[1]))
        self._position = self._persisted
        self.paused = row[2] == "paused"
        failed = row[2] == "failed"
        if self.failed and not failed:  # resumed or skipped: the retries start over
            self._failures = 0
        self.failed = failed
        if failed and row[4]:
            self.status.last_error = row[4]
        self.standby = self.owner is not None and row[5] != self.owner
        self._reload = False
        self.status.checkpoint = self._persisted
        self.status.applied_total = int(row[3])

    async def _check_owners(self, conn: AsyncConnection[Any]) -> None:
        """Refuse to run while a table of the projection is owned by another role: its triggers
        would run as projectord on every batch; so would a trigger or rule on one it owns.
        Re-checked each time the positions row is read (every poll interval while refused), so
        the projection starts once an operator fixed it; each batch checks again (`_guard`)."""
        if self.read_model_schema is None or not self.projection.tables:
            return
        schema, tables = self.read_model_schema, list(self.projection.tables)
        foreign = await foreign_owned(conn, self.queries, schema, tables)
        code = await foreign_code(conn, self.queries, schema, tables)
        refused = refusal(self.name, schema, foreign, code) if foreign or code else None
        if refused is not None and str(refused) != str(self.refused):
            self._log.error(
                "projection.refused_foreign_owner",
                error=str(refused),
                tables={t.table: t.owner for t in foreign},
                code=[f"{c.table}: {c.kind} {c.name}" for c in code],
            )
            self.status.last_error = self._error_record(refused, 0, None)
        elif refused is None and self.refused is not None:
            self._log.info("projection.foreign_owner_resolved")
            self.status.last_error = None
        self.refused = refused

    async def step(self) -> Batch:
        """Fetch one batch and apply it; returns the batch (empty when there was nothing)."""
        async with self.pool.connection() as conn:
            batch = self._read_ahead.take(self._position)
            if batch is None:
                async with deadline(conn, "a batch's fetch"):
                    batch = await self.fetch(conn, self._position)
            if batch.events:
                try:
                    await self._apply_reading_ahead(conn, batch)
                except CheckpointMoved:
                    raise
                except Exception as exc:
                    raise BatchFailed(batch, exc) from exc
            else:
                async with deadline(conn, "an idle checkpoint move"):
                    await self._advance_idle(conn, batch)
        return batch

    async def fetch(self, conn: AsyncConnection[Any], after: Checkpoint) -> Batch:
        return await self.fetcher.fetch(conn, after, self.batch_size, self.batch_max_bytes)

    async def _apply_reading_ahead(self, conn: AsyncConnection[Any], batch: Batch) -> None:
        """Apply a batch; when it is full (a catch-up), read the next one meanwhile on another
        connection (projectord/fetcher.py). Errors are the batch's own, never the read-ahead's.
        The batch read ahead gets what this one leaves of the byte bound, if an event of this
        batch's average size would fit in it."""
        room = self.batch_max_bytes - batch.bytes
        if batch.short or room * len(batch.events) < batch.bytes:
            await self.apply(conn, batch)
            return
        failure: Exception | None = None
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(self._read_ahead.read, batch.last, self.batch_size, room)
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
        of other types are never scanned again. After a full batch, stop at its last event.
        Short means short of the limit the batch was read with (`Batch.limit`), whatever the
        batch size is now."""
        if batch.short:
            return max((batch.horizon, 0), batch.last if batch.events else self._position)
        return batch.last

    async def apply(self, conn: AsyncConnection[Any], batch: Batch) -> None:
        assert self._persisted is not None
        new = self._next_checkpoint(batch)
        started = time.perf_counter()
        try:
            try:
                await self._commit_batch(conn, batch.events, new, pipelined=self._pipelined)
            except psycopg.NotSupportedError as exc:
                # Raised by psycopg itself (no SQLSTATE): the handler uses COPY or a server-side
                # cursor, which pipeline mode cannot run. Nothing was sent; run it as is.
                if not self._pipelined or exc.sqlstate is not None:
                    raise
                self._pipelined = False
                self._log.info("projection.pipeline_off", reason=str(exc))
                await self._commit_batch(conn, batch.events, new, pipelined=False)
        except BaseException as exc:
            # Cancelled mid-batch (drain timeout): psycopg's own rollback may have been cancelled
            # too. Roll back under a shield; if even that fails, the pool discards the connection
            # and the server rolls back when it closes. Nothing of the batch is ever committed.
            with anyio.move_on_after(2, shield=True):
                try:
                    await self._roll_back(conn)
                except psycopg.Error:
                    pass
            if conn.closed:  # its session may live on over there, in its transaction
                condemn(conn)
            deterministic = client_side(exc, conn)  # decided now: the connection is at hand
            if deterministic is not None:
                raise deterministic from exc
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

    async def _commit_batch(
        self, conn: AsyncConnection[Any], events: list[Event], new: Checkpoint, *, pipelined: bool
    ) -> None:
        """A check of the checkpoint, the handler's statements, the checkpoint's compare-and-set
        and COMMIT, in one transaction bounded by the handler timeout. Pipelined, they travel
        together: one round trip for a set-based handler (the check and the compare-and-set fail
        with an error, not a row count, so nothing after them runs when they fail).

        The check comes first. A runner whose last COMMIT landed although its answer was lost
        retries that batch from the checkpoint before it: the moved row must stop the retry
        before the handler runs, or a handler that is not idempotent fails on its own rows and
        the retry is taken for a poison event. The check takes no lock, so a pause answers at
        once and stops the batch at its compare-and-set."""

        observe = self._writes_sample_due()

        async def work() -> None:
            async with self._transaction(conn, pipelined=pipelined):
                await self._compare_and_set(conn, new, 0, query="check_checkpoint")
                await self._guard(conn)
                await self.projection.handle(events, conn)
                if observe:
                    await conn.execute(self.queries["record_tables_written"], {"name": self.name})
                await self._compare_and_set(conn, new, len(events))
            if observe:
                self._writes_recorded_at = time.monotonic()

        what = handler_of(self.projection, events)
        await self.clock.bound(work, conn, self.policy.handler_timeout, what)

    async def _guard(self, conn: AsyncConnection[Any]) -> None:
        """Lock the projection's tables as its writes would, and check in the same statement that
        they are still projectord's, with no trigger or rule: the check at checkpoint reads does
        not stop a table swapped in between two batches by whoever owns the schema. One
        statement more in the batch's pipeline, no round trip; a failure (PJ002) aborts the
        transaction before the handler runs, and `_on_error` refuses the projection."""
        if self.read_model_schema is None or not self.projection.tables:
            return
        await conn.execute(
            self.queries["guard_tables"],
            {"schema": self.read_model_schema, "tables": list(self.projection.tables)},
        )

    def _writes_sample_due(self) -> bool:
        recorded = self._writes_recorded_at
        return self.observe_writes and (
            recorded is None or time.monotonic() - recorded >= WRITES_SAMPLE_INTERVAL
        )

    @asynccontextmanager
    async def _transaction(
        self, conn: AsyncConnection[Any], *, pipelined: bool
    ) -> AsyncIterator[None]:
        """A transaction that moves the checkpoint; a moved checkpoint raises CheckpointMoved.

        Pipelined, BEGIN and COMMIT are sent as plain statements: psycopg's `transaction()`
        would sync the pipeline after BEGIN and around COMMIT, three round trips instead of one.
        A failing statement makes the server skip everything after it up to the sync, COMMIT
        included, so a failed batch is never committed; its transaction is rolled back here."""
        try:
            if pipelined:
                async with self._pipeline(conn):
                    await conn.execute("BEGIN")
                    yield
                    await conn.execute("COMMIT")
            else:
                async with conn.transaction():
                    yield
        except Exception as exc:
            if pipelined:
                await self._roll_back(conn)
            if isinstance(exc, psycopg.Error) and exc.sqlstate == CHECKPOINT_MOVED_SQLSTATE:
                raise CheckpointMoved(self.name) from exc
            raise

    @asynccontextmanager
    async def _pipeline(self, conn: AsyncConnection[Any]) -> AsyncIterator[None]:
        """psycopg's pipeline, except that once the block has queued everything (COMMIT
        included), its outcome is awaited even if this task is cancelled meanwhile: a stopped
        runner (ownership lost, a drain that timed out) must not leave a COMMIT in flight that
        lands after it stopped. The wait includes the server work of the handler's statements,
        so it lasts as long as the server is seen working on them (`handler_timeout` bounds
        that); past that the connection is closed, its outcome unknown (the checkpoint's
        compare-and-set keeps that safe): projectord/commit_watch.py."""
        pipeline = conn.pipeline()
        await pipeline.__aenter__()
        try:
            yield
        except BaseException as exc:
            await pipeline.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        await self.commit_watch.wait(
            conn, lambda: pipeline.__aexit__(None, None, None), "a batch's COMMIT"
        )

    @staticmethod
    async def _roll_back(conn: AsyncConnection[Any]) -> None:
        """End a transaction left open or failed, if the connection is still there."""
        if not conn.closed and conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            await conn.rollback()

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
            async with self._transaction(conn, pipelined=True):
                await self._compare_and_set(conn, new, 0)
            self._persisted = new
            self._persisted_at = time.monotonic()
            self.status.checkpoint = new

    async def _compare_and_set(
        self,
        conn: AsyncConnection[Any],
        new: Checkpoint,
        n: int,
        *,
        even_if_paused: bool = False,
        query: str = "advance_checkpoint",
    ) -> None:
        """Move the stored checkpoint from `_persisted` to `new` (or, with `check_checkpoint`,
        only check that it is still at `_persisted`); where the row does not match, the statement
        fails (SQLSTATE PJ001), which `_transaction` turns into CheckpointMoved."""
        assert self._persisted is not None
        await conn.execute(
            self.queries[query],
            {
                "name": self.name,
                "new_txid": str(new[0]),
                "new_position": new[1],
                "old_txid": str(self._persisted[0]),
                "old_position": self._persisted[1],
                "applied": n,
                "even_if_paused": even_if_paused,
                "owner": self.owner,
            },
        )

    # -- waiting -------------------------------------------------------------------------------

    async def _wait_for_events(self, held_back: bool, armed: bool, applied: bool) -> None:
        if applied:
            self._held_back_wait = HELD_BACK_POLL[0]
        with self.heartbeat.waiting():
            if not armed and self.listener is not None:
                # Appends notify only while the listener is armed, and it was not when this batch
                # was read: an append may have stayed silent since, covered only by the next
                # arming (listener.py). Ask for it and read again once it wakes the runners; a
                # read begun while armed may be followed by a sleep.
                self.listener.request_arm()
                if applied:
                    await self.wakeup.wait(BUSY_READ_PAUSE)
                    return
                held_back = True  # nothing new: poll on the short backoff until armed
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
        """Paused, failed or standing by: ignore notifications; re-read the state on a nudge or
        every poll interval (a resume may also come from another process)."""
        self._set_state(
            "paused"
            if self.paused
            else "failed"
            if self.failed
            else "refused"
            if self.refused
            else "standby"
        )
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
        if self._failures or self._transient_failures:
            self._log.info(
                "projection.recovered", attempts=self._failures + self._transient_failures
            )
            self._failures = self._transient_failures = 0
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

    async def _on_error(self, exc: Exception, batch: Batch | None) -> None:
        """A turn failed: wait as the error policy says. Once a batch's handler has failed
        `max_attempts` times, the next turn isolates its poison event instead of waiting. A
        batch its table check refused is no handler failure: the projection is refused."""
        guard = refused_by_guard(exc)
        if guard is not None:
            await self._refuse_batch(guard)
            return
        if is_transient(exc):
            await self._on_transient(exc)
            return
        await self._on_failure(exc, batch)
        if batch is None or self._failures < self.policy.max_attempts:
            await self._wait_backoff(backoff(self._failures, exc))

    async def _refuse_batch(self, message: str) -> None:
        """A batch's table check failed (rolled back, nothing applied): read the catalog for
        the full picture, as at a checkpoint read, then wait as `refused`; every poll interval
        the check runs again, so the projection starts once an operator fixed the tables."""
        try:
            async with self.pool.connection(timeout=5) as conn, deadline(conn, "a table check"):
                await self._check_owners(conn)
        except Exception as exc:  # the batch's own message says enough
            self._log.debug("projection.table_check_failed", error=str(exc))
        if self.refused is None:
            self.refused = ForeignOwnerError(f"projection {self.name!r}: {message}")
            self.status.last_error = self._error_record(self.refused, 0, None)
            self._log.error("projection.refused_foreign_owner", error=str(self.refused))
        await self._wait_paused()

    async def _on_transient(self, exc: Exception) -> None:
        """The database is away, or refused for concurrency: retry soon, for as long as it
        takes, without counting it against the handler. One log line when it starts, one
        (`projection.recovered`) when it ends."""
        self._transient_failures += 1
        self.status.last_error = self._error_record(exc, self._transient_failures, None)
        if self._transient_failures == 1:
            self._log.warning(
                "projection.database_unavailable",
                error=str(exc)[:500],
                error_type=type(exc).__name__,
                position=self._position,
            )
        self._set_state("degraded")
        if isinstance(exc, DeadConnection):
            # A silent partition: the pool's other connections are as dead as this one, and
            # nothing on them says so. Replace them all rather than wait a deadline for each.
            await self.pool.drain()
        await self._wait_backoff(backoff(self._transient_failures, exc))

    async def _on_failure(self, exc: Exception, batch: Batch | None) -> None:
        """A handler failure (or an error outside the database's and the handler's: a bug):
        count it, name the event when it can, and store the error for status."""
        self._failures += 1
        attempts = self._failures
        self.status.errors_total += 1
        self._set_state("retrying")
        if batch is not None:
            await self._find_stuck_event(batch, exc)
        error = self._error_record(exc, attempts, self.stuck.event if self.stuck else None)
        self.status.last_error = error
        if attempts == 1 or attempts % 10 == 0:
            self._log.error(
                "projection.handler_failed",
                error=error["message"],
                error_type=error["type"],
                attempts=attempts,
                max_attempts=self.policy.max_attempts,
                position=self._position,
                event_id=error["event_id"],
                event_type=error["event_type"],
            )
        await self._store_error(error)

    def _error_record(
        self, exc: BaseException, attempts: int, event: Event | None
    ) -> dict[str, Any]:
        """The error as status, health and the positions row show it."""
        return {
            "type": type(exc).__name__,
            "message": str(exc)[:2000],
            "attempts": attempts,
            "transient": is_transient(exc),
            "at": time.time(),
            "event_id": str(event.event_id) if event else None,
            "event_type": event.type if event else None,
            "global_position": event.global_position if event else None,
            "transaction_id": str(event.transaction_id) if event else None,
        }

    async def _store_error(self, error: dict[str, Any]) -> None:
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
        failed batch, given about two handler timeouts; a batch whose events only fail together
        leaves it unknown (bisection finds it once the retries are used up)."""
        start = batch.events[0].commit_position
        if self.stuck is not None and self.stuck.batch_start == start:
            return
        self.stuck = None
        culprit: Event | None = batch.events[0] if len(batch.events) == 1 else None
        error: BaseException = exc
        if culprit is None:
            timeout = self.policy.handler_timeout
            give_up = time.monotonic() + 2 * timeout  # checked between events, never inside one
            try:
                async with self.pool.connection(timeout=5) as conn:
                    async with conn.transaction(force_rollback=True):
                        await self._guard(conn)  # rolled back, but her trigger would still run
                        for event in batch.events:
                            if time.monotonic() > give_up:
                                break
                            try:
                                await run_handler(
                                    self.projection, [event], conn, timeout, self.clock
                                )
                            except Exception as event_exc:
                                culprit, error = event, event_exc
                                break
            except Exception as search_exc:
                self._log.debug("projection.search_failed", error=str(search_exc))
                return
        if culprit is not None:
            self.stuck = StuckEvent(culprit, start, format_traceback(error))

    # -- the poison event ----------------------------------------------------------------------

    async def _isolate_poison(self) -> None:
        """The batch at the checkpoint failed `max_attempts` times: bisect it, committing the
        events before the poison event, then let `on_error` deal with that event."""
        self._log.info("projection.isolating", attempts=self._failures, position=self._position)
        async with self.pool.connection() as conn:
            batch = await self.fetch(conn, self._position)
        found = await self._bisect(batch.events)
        if self._stopping:
            return
        if found is None:  # every event applied: they only failed together, or not any more
            self._log.info("projection.recovered", attempts=self._failures)
            self._failures = 0
            self._set_state("running")
            return
        event, exc = found
        error = self._error_record(exc, self._failures, event)
        trace = format_traceback(exc)
        self.stuck = StuckEvent(event, event.commit_position, trace)
        if self.policy.on_error == "skip":
            await self._dead_letter(event, [], error, trace, by="on_error")
        else:
            await self._fail_on(event, {**error, "traceback": trace})

    async def _bisect(self, events: list[Event]) -> tuple[Event, Exception] | None:
        """Apply the longest prefix of `events` that applies, half of what is left at a time,
        committing each part with its checkpoint; return the first event that fails alone, and
        its error, or None when all applied. Transient errors and a moved checkpoint end it (the
        next turn starts over from the committed checkpoint)."""
        pending = events
        while pending and not self._stopping:
            self.heartbeat.beat()
            size = max(len(pending) // 2, 1)
            try:
                async with self.pool.connection() as conn:
                    # Horizon 0: the checkpoint stops at the part's last event.
                    part = Batch(pending[:size], horizon=0, held_back=False, limit=size)
                    await self.apply(conn, part)
            except CheckpointMoved:
                raise
            except Exception as exc:
                if is_transient(exc) or refused_by_guard(exc):
                    raise
                if size == 1:
                    return pending[0], exc
                pending = pending[:size]
                continue
            pending = pending[size:]
        return None

    async def _fail_on(self, event: Event, error: dict[str, Any]) -> None:
        """`on_error = "pause"`: state `failed`, stored with the event and the error, so it
        survives a restart and a change of owner; `resume` retries, `skip` dead-letters it."""
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                self.queries["mark_failed"],
                {"name": self.name, "error": Jsonb(error), "owner": self.owner},
            )
            row = await cur.fetchone()
        if row is None:  # another instance owns the projection now
            raise CheckpointMoved(self.name)
        self.failed, self.paused = row[0] == "failed", row[0] == "paused"
        self.status.last_error = error
        self._log.error(
            "projection.failed",
            event_id=error["event_id"],
            event_type=error["event_type"],
            global_position=error["global_position"],
            error=error["message"],
            error_type=error["type"],
            attempts=error["attempts"],
        )

    async def _dead_letter(
        self,
        event: Event,
        ahead: list[Event],
        error: dict[str, Any],
        trace: str,
        *,
        by: str,
    ) -> None:
        """In one transaction: apply the events `ahead` of `event`, record `event` as a dead
        letter and move the checkpoint just past it. An operator's skip passes a pause."""
        attempts = int(error.get("attempts") or self._failures)
        async with self.pool.connection() as conn, self._transaction(conn, pipelined=False):
            # First, as in _commit_batch: a moved checkpoint stops this before the handler runs.
            await self._compare_and_set(
                conn, event.commit_position, 0, even_if_paused=by == "operator",
                query="check_checkpoint",
            )  # fmt: skip
            if ahead:  # events of the failed batch before the stuck one
                await self._guard(conn)
                await run_handler(
                    self.projection, ahead, conn, self.policy.handler_timeout, self.clock
                )
            await conn.execute(
                self.queries["insert_dead_letter"],
                dead_letter_params(self.name, event, error, trace, attempts),
            )
            await self._compare_and_set(
                conn, event.commit_position, len(ahead), even_if_paused=by == "operator"
            )
        self._moved_to(event.commit_position, len(ahead))
        self._failures = 0
        self.failed = False
        self._log.warning(
            "event.dead_lettered",
            event_id=str(event.event_id),
            event_type=event.type,
            global_position=event.global_position,
            applied_before=len(ahead),
            by=by,
        )

    def _set_state(self, state: str) -> None:
        """One log line per change of state, not per turn of the loop. Failures and recoveries
        have their own lines (`projection.handler_failed`, `.database_unavailable`, `.failed`,
        `.recovered`)."""
        old = self.status.state
        if state == old:
            return
        self.status.state = state
        quiet = (
            state in ("retrying", "degraded", "failed", "refused", "stopped")
            or old == "starting"
            or (old in ("retrying", "degraded") and state == "running")
        )
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
            await conn.execute(self.queries["reset_position"], {"name": self.name})
            await conn.execute(self.queries["resolve_by_rebuild"], {"projection": self.name})
            cur = await conn.execute(self.queries["count_unapplied"], params)
            total = int((await cur.fetchone() or (0,))[0])
            cur = await conn.execute(self.queries["latest_event_of_types"], params)
            row = await cur.fetchone()
        target = (int(row[0]), int(row[1])) if row else None
        self._writes_recorded_at = None  # the rebuild's first batch shows what it writes
        self._persisted = self._position = (0, 0)
        self._persisted_at = time.monotonic()
        self.paused = self.failed = False
        self.stuck = None
        self._failures = self._transient_failures = 0
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
