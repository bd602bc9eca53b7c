"""The batch transaction: a projection's handler and its checkpoint's compare-and-set, committed
together or not at all.

A batch's transaction checks the checkpoint, guards the projection's tables, runs the handler,
now and then records which tables it wrote, moves the checkpoint by compare-and-set and commits.
Pipelined (psycopg's pipeline mode), all of it travels in one round trip for a set-based handler:
the check and the compare-and-set fail with an error (SQLSTATE PJ001), not a row count, so
nothing after them runs when they fail, COMMIT included. The runner (projectord/runner/loop.py)
decides what to commit and keeps its bookkeeping; the statements on the positions row are the
CheckpointStore's (projectord/runner/checkpoint_store.py).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import psycopg
from psycopg import AsyncConnection
from structlog.stdlib import BoundLogger

from projectord.checkpoint import Checkpoint
from projectord.database import condemn
from projectord.event_store import Event
from projectord.fetcher import Batch
from projectord.projection import Projection
from projectord.queries import Queries
from projectord.runner.checkpoint_store import CheckpointMoved, CheckpointStore, is_checkpoint_moved
from projectord.runner.commit_watch import CommitWatch
from projectord.runner.error_policy import ErrorPolicy, client_side
from projectord.runner.handler_timeout import HandlerClock, handler_of

# How often a batch also records which tables its handler wrote (seconds; and always a runner's
# first batch): what lets `rebuild` refuse a projection that writes tables it does not declare.
# One statement more in the batch's pipeline, no round trip; sampled, so live batches of one event
# do not pay for it each time.
WRITES_SAMPLE_INTERVAL = 10.0


class BatchFailed(Exception):
    """Applying a batch raised; carries the batch so the failing event can be found."""

    def __init__(self, batch: Batch, error: Exception) -> None:
        super().__init__(str(error))
        self.batch = batch
        self.error = error


class BatchTransaction:
    """Commits one projection's batches, and the other transactions that move its checkpoint
    (an idle move to the horizon, a dead letter), for the runner that owns it."""

    def __init__(
        self,
        projection: Projection,
        queries: Queries,
        checkpoints: CheckpointStore,
        *,
        owner: str | None,
        policy: ErrorPolicy,
        clock: HandlerClock,
        commit_watch: CommitWatch,
        read_model_schema: str | None,
        observe_writes: bool,
        log: BoundLogger,
    ) -> None:
        self.projection = projection
        self.name = projection.name
        self.queries = queries
        self.checkpoints = checkpoints
        self.owner = owner  # checked by the compare-and-set against the positions row's owner
        self.policy = policy
        self.clock = clock
        self.commit_watch = commit_watch
        self.read_model_schema = read_model_schema
        # Record which tables the handler writes, now and then (WRITES_SAMPLE_INTERVAL); off for
        # an online rebuild's shadow, whose guard checks every batch instead.
        self.observe_writes = observe_writes
        self.writes_recorded_at: float | None = None
        # Send a batch's statements, the compare-and-set and COMMIT without waiting for each
        # result (psycopg's pipeline mode); off for a projection that says so, or whose handler
        # turns out to use COPY.
        self.pipelined = projection.pipeline
        self._log = log

    async def commit(
        self, conn: AsyncConnection[Any], events: list[Event], expected: Checkpoint, new: Checkpoint
    ) -> None:
        """Apply `events` and move the checkpoint from `expected` to `new`, in one transaction;
        raises CheckpointMoved when the row is not at `expected` (nothing is committed)."""
        try:
            try:
                await self._commit(conn, events, expected, new, pipelined=self.pipelined)
            except psycopg.NotSupportedError as exc:
                # Raised by psycopg itself (no SQLSTATE): the handler uses COPY or a server-side
                # cursor, which pipeline mode cannot run. Nothing was sent; run it as is.
                if not self.pipelined or exc.sqlstate is not None:
                    raise
                self.pipelined = False
                self._log.info("projection.pipeline_off", reason=str(exc))
                await self._commit(conn, events, expected, new, pipelined=False)
        except BaseException as exc:
            # Cancelled mid-batch (drain timeout): psycopg's own rollback may have been cancelled
            # too. Roll back under a shield; if even that fails, the pool discards the connection
            # and the server rolls back when it closes. Nothing of the batch is ever committed.
            with anyio.move_on_after(2, shield=True):
                try:
                    await self.roll_back(conn)
                except psycopg.Error:
                    pass
            if conn.closed:  # its session may live on over there, in its transaction
                condemn(conn)
            deterministic = client_side(exc, conn)  # decided now: the connection is at hand
            if deterministic is not None:
                raise deterministic from exc
            raise

    async def _commit(
        self,
        conn: AsyncConnection[Any],
        events: list[Event],
        expected: Checkpoint,
        new: Checkpoint,
        *,
        pipelined: bool,
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
            async with self.transaction(conn, pipelined=pipelined):
                await self.check(conn, expected)
                await self.guard(conn)
                await self.projection.handle(events, conn)
                if observe:
                    await conn.execute(self.queries["record_tables_written"], {"name": self.name})
                await self.advance(conn, expected, new, len(events))
            if observe:
                self.writes_recorded_at = time.monotonic()

        what = handler_of(self.projection, events)
        await self.clock.bound(work, conn, self.policy.handler_timeout, what)

    async def check(
        self, conn: AsyncConnection[Any], expected: Checkpoint, *, even_if_paused: bool = False
    ) -> None:
        """Fail (SQLSTATE PJ001, which `transaction` turns into CheckpointMoved) unless the
        stored checkpoint is still `expected`, runnable and this runner's."""
        await self.checkpoints.check(
            conn,
            self.name,
            expected,
            owner=self.owner,
            even_if_paused=even_if_paused,
            version=self.projection.version,
        )

    async def advance(
        self,
        conn: AsyncConnection[Any],
        expected: Checkpoint,
        new: Checkpoint,
        applied: int,
        *,
        even_if_paused: bool = False,
    ) -> None:
        """Move the stored checkpoint from `expected` to `new`, counting `applied` events; where
        the row does not match, fail as `check` does."""
        await self.checkpoints.advance(
            conn, self.name, expected, new, applied, owner=self.owner,
            even_if_paused=even_if_paused, version=self.projection.version,
        )  # fmt: skip

    async def guard(self, conn: AsyncConnection[Any]) -> None:
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
        recorded = self.writes_recorded_at
        return self.observe_writes and (
            recorded is None or time.monotonic() - recorded >= WRITES_SAMPLE_INTERVAL
        )

    @asynccontextmanager
    async def transaction(
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
                await self.roll_back(conn)
            if is_checkpoint_moved(exc):
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
        compare-and-set keeps that safe): projectord/runner/commit_watch.py."""
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
    async def roll_back(conn: AsyncConnection[Any]) -> None:
        """End a transaction left open or failed, if the connection is still there."""
        if not conn.closed and conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            await conn.rollback()
