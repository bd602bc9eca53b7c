"""A runner's failures: transient database errors, handler failures and their poison event, and
tables another role owns.

What happens when a batch fails is the projection's error policy
(projectord/runner/error_policy.py): transient database errors are retried until the database is
back, without counting against the handler; a handler failure is retried with backoff up to
`max_attempts`, then the batch is bisected, committing the events before the poison event, and
`on_error` decides: stop in state `failed` until an operator acts, or move the event to the dead
letters and go on. The runner never moves past an event it did not apply except into the dead
letters. A projection whose tables another role owns (or carry its triggers or rules) is refused
until an operator fixes them: its triggers would run as projectord.

`FailureHandling` is a part of ProjectionRunner (projectord/runner/loop.py), kept apart because it
is a concern of its own; it shares the runner's state (RunnerState) and uses the runner's
`fetch`, `apply`, `_moved_to`, `_set_state`, `_wait_paused` and `_wait_backoff`.
"""

from __future__ import annotations

import time
from typing import Any

from psycopg import AsyncConnection

from projectord.database import DeadConnection, deadline
from projectord.event_store import Event
from projectord.fetcher import Batch
from projectord.runner.checkpoint_store import CheckpointMoved
from projectord.runner.dead_letters import dead_letter_params, format_traceback
from projectord.runner.error_policy import backoff, is_transient
from projectord.runner.handler_timeout import run_handler
from projectord.runner.runner_state import RunnerState, StuckEvent
from projectord.schema.foreign_owner import (
    ForeignOwnerError,
    foreign_code,
    foreign_owned,
    refusal,
    refused_by_guard,
)
from projectord.upcasting import too_new


class FailureHandling(RunnerState):
    """The runner's reaction to a failed turn, and its search for the poison event."""

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
        if batch is None or (self._failures < self.policy.max_attempts and not self._isolate_now):
            await self._wait_backoff(backoff(self._failures, exc))

    async def _check_owners(self, conn: AsyncConnection[Any]) -> None:
        """Refuse to run while a table of the projection is owned by another role: its triggers
        would run as projectord on every batch; so would a trigger or rule on one it owns.
        Re-checked each time the positions row is read (every poll interval while refused), so
        the projection starts once an operator fixed it; each batch checks again
        (BatchTransaction.guard)."""
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
        self._isolate_now = too_new(exc) is not None
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
                await self.checkpoints.record_error(conn, self.name, error)
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
                        # Rolled back, but her trigger would still run.
                        await self.batches.guard(conn)
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

    async def _isolate_poison(self) -> None:
        """The batch at the checkpoint failed `max_attempts` times: bisect it, committing the
        events before the poison event, then let `on_error` deal with that event."""
        self._log.info("projection.isolating", attempts=self._failures, position=self._position)
        self._isolate_now = False
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
        # An event newer than the code is no bad event: newer code applies it. It stops the
        # projection whatever `on_error` says; an operator may still skip it.
        if self.policy.on_error == "skip" and too_new(exc) is None:
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
            state = await self.checkpoints.mark_failed(conn, self.name, error, owner=self.owner)
        if state is None:  # another instance owns the projection now
            raise CheckpointMoved(self.name)
        self.failed, self.paused = state == "failed", state == "paused"
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
        expected, operator = self._persisted, by == "operator"
        assert expected is not None
        batches = self.batches
        async with self.pool.connection() as conn, batches.transaction(conn, pipelined=False):
            # First, as in a batch: a moved checkpoint stops this before the handler runs.
            await batches.check(conn, expected, even_if_paused=operator)
            if ahead:  # events of the failed batch before the stuck one
                await batches.guard(conn)
                await run_handler(
                    self.projection, ahead, conn, self.policy.handler_timeout, self.clock
                )
            await self.checkpoints.clear_failure(conn, self.name)
            await conn.execute(
                self.queries["insert_dead_letter"],
                dead_letter_params(self.name, event, error, trace, attempts),
            )
            await batches.advance(
                conn, expected, event.commit_position, len(ahead), even_if_paused=operator
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
