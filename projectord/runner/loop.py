"""The projection runner: fetch the next batch in commit order, apply it, move the checkpoint.

One runner per projection. Each batch runs in one transaction that holds the handler's writes and
the checkpoint's compare-and-set, so the read model and the checkpoint commit together or not at
all (projectord/runner/batch.py). This module is the loop: read the checkpoint, fetch and apply a
batch, move to the horizon when idle, and wait for events, a request or the end of a pause. The
runner's other concerns are its parts: failures, bisection and dead letters
(projectord/runner/failures.py), operator requests run inside its own task
(projectord/runner/operator_requests.py). Every statement on the positions row is the
CheckpointStore's (projectord/runner/checkpoint_store.py). Other runners are unaffected by one
that fails.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import anyio
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from projectord.checkpoint import START, Checkpoint
from projectord.daemon.heartbeat import Heartbeat
from projectord.daemon.listener import BUSY_BATCH, BUSY_FOR, NotificationListener
from projectord.database import deadline
from projectord.fetcher import DEFAULT_BATCH_MAX_BYTES, Batch, Fetcher, ReadAhead
from projectord.logs import get_logger
from projectord.projection import Projection
from projectord.queries import Queries
from projectord.runner.batch import BatchFailed, BatchTransaction
from projectord.runner.checkpoint_store import CheckpointMoved, CheckpointStore
from projectord.runner.commit_watch import CommitWatch
from projectord.runner.error_policy import ErrorPolicy
from projectord.runner.failures import FailureHandling
from projectord.runner.handler_timeout import HandlerClock
from projectord.runner.operator_requests import OperatorRequests, PendingRequest
from projectord.runner.runner_state import RunnerStatus, StuckEvent, Wakeup
from projectord.schema.foreign_owner import ForeignOwnerError
from projectord.tracing import batch_span

log = get_logger("projectord.runner.loop")

BatchObserver = Callable[[str, int, float], None]  # (projection, events, seconds)

# While committed events wait behind an older open transaction, poll this fast (seconds), doubling
# up to the second figure: that transaction may end without any NOTIFY. The same backoff serves a
# runner that found nothing while the listener cannot be armed (writers are busy: listener.py).
HELD_BACK_POLL = (0.001, 0.25)
# How often an empty batch may persist a checkpoint moved to the horizon (seconds). Only a restart
# gains from it (it rescans less), and every transaction, the daemon's own included, moves the
# horizon: at 5 s, 50 idle projections committed 10 checkpoint transactions a second forever.
HORIZON_PERSIST_INTERVAL = 60.0
# While the listener is disarmed (writers are busy: it waits up to ARM_PAUSE between armings,
# see listener.py), a runner whose last batch brought events waits before reading again as long as
# that batch took, within these bounds (seconds): at most half its time goes to reading and
# applying small batches, the rest gathers events for the next one, and a fast projection trails
# the writers by little more than two of its batches. An arming, or a notification, cuts the wait
# short.
BUSY_READ_PAUSE = (0.002, 0.02)


class ProjectionRunner(OperatorRequests, FailureHandling):
    """Applies one projection's events, batch after batch, in its own task (`run`); its failure
    handling and its operator requests are the parts it is made of."""

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
        # row is read (projectord/schema/foreign_owner.py). None: not checked.
        self.read_model_schema = read_model_schema
        self.policy = policy or ErrorPolicy()
        # The daemon instance this runner commits for; the compare-and-set checks it against the
        # positions row's owner. None: no ownership (one-off runners such as an online rebuild's).
        self.owner = owner
        self.listener = listener  # None: rely on notifications the listener sends as it is
        self.pool = pool
        self.queries = queries
        self.checkpoints = CheckpointStore(queries)
        self.batch_size = batch_size
        self.batch_max_bytes = batch_max_bytes  # a batch and the one read ahead, together
        self.poll_interval = poll_interval
        self.on_batch = on_batch
        self.types = list(projection.event_types)
        self.fetcher = Fetcher(queries, self.types)
        self._read_ahead = ReadAhead(self.fetcher, pool)
        self.wakeup = Wakeup()  # new events (notifications), operator requests, stop
        self._batch_took = BUSY_READ_PAUSE[1]  # seconds the last batch's commit took
        self.control = Wakeup()  # operator requests and stop only: ends a pause or a backoff
        self.status = RunnerStatus(projection.name)
        self.heartbeat = Heartbeat(f"runner:{projection.name}")
        self.clock = HandlerClock()  # the handler timeout of every call this runner makes
        # How long a pipelined batch's answer is awaited: while the server works on it.
        self.commit_watch = CommitWatch(pool.conninfo if isinstance(pool.conninfo, str) else "")
        self._log = log.bind(projection=projection.name)
        self.batches = BatchTransaction(
            projection,
            queries,
            self.checkpoints,
            owner=owner,
            policy=self.policy,
            clock=self.clock,
            commit_watch=self.commit_watch,
            read_model_schema=read_model_schema,
            observe_writes=observe_writes,
            log=self._log,
        )
        self.paused = False  # as last read from the positions row
        self.failed = False  # stopped on a poison event (on_error = "pause"), as last read
        self.standby = False  # the positions row names another owner: commit nothing, wait
        self.refused: ForeignOwnerError | None = None  # a table another role owns: wait
        # The live tables are a newer version than this code (docs/evolution.md): never touch
        # them. The version they are.
        self.superseded: int | None = None
        self.stuck: StuckEvent | None = None
        self._requests: list[PendingRequest] = []
        self._reload = False  # re-read the positions row before the next batch
        self._failures = 0  # handler failures of the batch at the checkpoint
        # The batch failed on an event newer than the code (projectord/upcasting.py): retrying
        # cannot help, so the next turn isolates it without using up `max_attempts`.
        self._isolate_now = False
        self._transient_failures = 0  # database errors in a row; never counted as the above
        self._held_back_wait = HELD_BACK_POLL[0]
        self._stopping = False
        self._persisted: Checkpoint | None = None  # the stored checkpoint, as last read or written
        self._position: Checkpoint = START  # may run ahead of it, up to the safe horizon
        self._persisted_at = 0.0

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
        self._isolate_now = False
        self.paused = self.failed = self.standby = False
        self.refused = None
        self.superseded = None
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
            if self.paused or self.failed or self.standby or self.refused or self.superseded:
                await self._wait_paused()
                return
            if self._failures >= self.policy.max_attempts or self._isolate_now:
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
            await self._wait_for_events(batch.held_back, armed, len(batch.events))

    async def _load_checkpoint_after_move(self) -> None:
        try:
            await self._load_checkpoint()
        except Exception as exc:  # the next turn retries the read and reports the failure
            self._log.debug("checkpoint.reload_failed", error=str(exc))
            return
        if not (self.paused or self.failed or self.standby or self.superseded):
            self._log.warning("checkpoint.moved", position=self._position)

    async def _load_checkpoint(self) -> None:
        async with self.pool.connection() as conn, deadline(conn, "a checkpoint read"):
            await self.checkpoints.ensure(conn, self.name, self.projection.version)
            stored = await self.checkpoints.read(conn, self.name)
            await self._check_owners(conn)
        assert stored is not None
        self._persisted = stored.checkpoint
        self._position = self._persisted
        self.paused = stored.state == "paused"
        failed = stored.state == "failed"
        if self.failed and not failed:  # resumed or skipped: the retries start over
            self._failures = 0
        self.failed = failed
        if failed and stored.last_error:
            self.status.last_error = stored.last_error
        self.standby = self.owner is not None and stored.owner != self.owner
        self._check_version(stored.version)
        self._reload = False
        self.status.checkpoint = self._persisted
        self.status.applied_total = stored.applied_total

    def _check_version(self, stored: int) -> None:
        """Tables of a newer version than this code: superseded, for good (the compare-and-set
        refuses this code's batches anyway). Of an older one: stand by until the new version's
        build is swapped in (docs/evolution.md)."""
        mine = self.projection.version
        if stored > mine:
            if self.superseded != stored:
                self._log.warning("projection.superseded", version=mine, serving_version=stored)
            self.superseded = stored
            self.status.last_error = superseded_error(self.name, mine, stored)
        else:
            self.superseded = None
            self.standby = self.standby or stored < mine

    async def step(self) -> Batch:
        """Fetch one batch and apply it; returns the batch (empty when there was nothing)."""
        async with self.pool.connection() as conn:
            batch = self._read_ahead.take(self._position)
            if batch is None:
                async with deadline(conn, "a batch's fetch"):
                    batch = await self.fetch(conn, self._position)
            if batch.events:
                try:
                    attempt = self._failures + 1  # projectord/tracing.py: one span per batch
                    with batch_span(self.name, batch.events, attempt, (CheckpointMoved,)):
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
        batch's average size would fit in it.

        The read-ahead is let run up to its first wait before the batch is applied, so its query
        is sent before the handler folds: the server reads the next batch while this process
        folds this one, instead of once the fold is done (runner client CPU on the catch-up
        benchmark about 2.36 -> 2.20 µs per event, 299k -> 335k events/s)."""
        room = self.batch_max_bytes - batch.bytes
        if batch.short or room * len(batch.events) < batch.bytes:
            await self.apply(conn, batch)
            return
        failure: Exception | None = None
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(self._read_ahead.read, batch.last, self.batch_size, room)
            await anyio.lowlevel.checkpoint()  # the read-ahead sends its query
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
            return max(
                Checkpoint.at_horizon(batch.horizon),
                batch.last if batch.events else self._position,
            )
        return batch.last

    async def apply(self, conn: AsyncConnection[Any], batch: Batch) -> None:
        assert self._persisted is not None
        new = self._next_checkpoint(batch)
        started = time.perf_counter()
        await self.batches.commit(conn, batch.events, self._persisted, new)
        duration = time.perf_counter() - started
        self._batch_took = duration
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
            assert self._persisted is not None
            async with self.batches.transaction(conn, pipelined=True):
                await self.batches.advance(conn, self._persisted, new, 0)
            self._persisted = new
            self._persisted_at = time.monotonic()
            self.status.checkpoint = new

    # -- waiting -------------------------------------------------------------------------------

    def _busy_pause(self) -> float:
        """How long to gather events while writers are busy: as long as the last batch took,
        within BUSY_READ_PAUSE."""
        return min(max(self._batch_took, BUSY_READ_PAUSE[0]), BUSY_READ_PAUSE[1])

    async def _wait_for_events(self, held_back: bool, armed: bool, applied: int) -> None:
        if applied:
            self._held_back_wait = HELD_BACK_POLL[0]
        with self.heartbeat.waiting():
            if not armed and self.listener is not None:
                # Appends notify only while the listener is armed, and it was not when this batch
                # was read, so the runner may not sleep: it reads again soon. After a batch that
                # brought events it reads again after BUSY_READ_PAUSE; a batch of BUSY_BATCH or
                # more says the writers outpace the wake-ups, and no arming starts meanwhile
                # (listener.note_busy): it would only cost them a notifying commit to say what the
                # next read finds anyway. A runner that found nothing asks for an arming (granted
                # unless a runner noted busy writers) and polls on a short backoff, no longer
                # apart than BUSY_FOR while the writers are busy: nothing notifies under load.
                if applied:
                    if applied >= BUSY_BATCH:
                        self.listener.note_busy(self._batch_took + self._busy_pause())
                    await self.wakeup.wait(self._busy_pause())
                    return
                self.listener.request_arm()
                held_back = True
            if held_back:
                wait = self._held_back_wait
                if self.listener is not None and self.listener.busy():
                    wait = min(wait, BUSY_FOR)
                await self.wakeup.wait(wait)
                self._held_back_wait = min(self._held_back_wait * 2, HELD_BACK_POLL[1])
            else:
                self._held_back_wait = HELD_BACK_POLL[0]
                idle = self.poll_interval
                if self.listener is not None:  # it polls for every runner (listener.py)
                    idle = self.listener.runner_poll_interval(idle)
                await self.wakeup.wait(idle)

    async def _wait_paused(self) -> None:
        """Paused, failed or standing by: ignore notifications; re-read the state on a nudge or
        every poll interval (a resume may also come from another process). A batch read ahead
        is dropped: while the runner waits, an operator may repair the events it holds (a
        poison event's payload, erased personal data), and after the wait they are read again."""
        self._read_ahead.discard()
        self._set_state(
            "paused"
            if self.paused
            else "failed"
            if self.failed
            else "refused"
            if self.refused
            else "superseded"
            if self.superseded
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

    # -- the state shown -----------------------------------------------------------------------

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

    def _set_state(self, state: str) -> None:
        """One log line per change of state, not per turn of the loop. Failures and recoveries
        have their own lines (`projection.handler_failed`, `.database_unavailable`, `.failed`,
        `.recovered`)."""
        old = self.status.state
        if state == old:
            return
        self.status.state = state
        quiet = (
            state in ("retrying", "degraded", "failed", "refused", "superseded", "stopped")
            or old == "starting"
            or (old in ("retrying", "degraded") and state == "running")
        )
        if not quiet:
            self._log.info("projection.state_changed", previous=old, state=state)


def superseded_error(name: str, version: int, serving: int) -> dict[str, Any]:
    """The error a runner whose code is older than the live tables shows (status, health)."""
    return {
        "type": "Superseded",
        "message": (
            f"superseded by version {serving}: this daemon runs version {version} of {name},"
            f" whose code never touches the tables of version {serving}; deploy version"
            f" {serving}'s code, or `projectord rollback {name}` if version {version} is kept"
        ),
        "version": version,
        "serving_version": serving,
    }
