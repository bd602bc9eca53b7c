"""Dispatching commands: store, route, load, decide, append, record the outcome.

`Dispatcher.dispatch` first stores the command as `pending` (its own short transaction), then
decides it in one transaction that locks the command row, loads the target aggregate from its
events, lets the aggregate's handler decide, appends the new events with the next versions and
records the outcome. The events and the `consumed` status commit together, so a command id is
decided once: a second dispatch of the id waits for the row lock and reads the stored outcome.

Optimistic concurrency: the UNIQUE (aggregate_id, version) constraint makes the second of two
writers of one aggregate fail (`ConcurrencyError`, nothing written), and the store refuses (40001)
an append from a transaction older than the one that wrote the aggregate's latest version
(docs/ordering.md). Either way the dispatcher rolls back and decides again in a fresh transaction
(which reloads the aggregate with the winner's events and has a newer id), up to `max_attempts`
times, then fails the command with a clear error. A dispatcher that dies between
the two transactions leaves the command `pending`; dispatching the same id again completes it.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Sequence
from typing import Any

import anyio
import psycopg
from psycopg import AsyncConnection

from projectord.backoff import nominal_delay
from projectord.checkpoint import Checkpoint
from projectord.commands.aggregate import (
    Change,
    CommandHandler,
    CommandPayload,
    CommandRegistry,
    CommandRejected,
    InvalidPayload,
)
from projectord.commands.store import Command, CommandStatus, CommandStore
from projectord.event_store import ConcurrencyError, EventStore, NewEvent
from projectord.logs import get_logger
from projectord.projection import Projection
from projectord.queries import Queries
from projectord.runner.catch_up import wait_for_positions
from projectord.tracing import dispatch_span, record_dispatch
from projectord.upcasting import SchemaVersionTooNew, UpcastFailed

log = get_logger("projectord.commands.dispatch")

DEFAULT_MAX_ATTEMPTS = 10
CONFLICT_BACKOFF = (0.001, 0.05)  # seconds: first and largest jittered pause after a conflict


class CommandIdReused(Exception):
    """A command id that was stored before for a different request (type, tenant or payload)."""

    def __init__(self, command_id: uuid.UUID) -> None:
        super().__init__(
            f"command id {command_id} was already used for a different command;"
            " a command id may be reused only to resend the same command"
        )


class ReadModelTimeout(TimeoutError):
    """The command was consumed, but the named projections had not applied its events in time."""

    def __init__(self, command: Command, behind: Sequence[str], timeout: float) -> None:
        super().__init__(
            f"command {command.id} was consumed, but after {timeout:g}s these projections had not"
            f" applied its events yet: {', '.join(behind)}"
        )
        self.command = command
        self.behind = list(behind)


class Dispatcher:
    """Dispatches commands to the aggregates of a `CommandRegistry`.

    Every method takes an autocommit connection: the dispatcher opens its own transactions.
    """

    def __init__(
        self,
        registry: CommandRegistry,
        *,
        schema: str = "projectord",
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    ) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        self.registry = registry
        self.max_attempts = max_attempts
        self.events = EventStore(schema)
        self.commands = CommandStore(schema)
        self._queries = Queries(schema)

    async def dispatch(self, conn: AsyncConnection[Any], command: Command) -> Command:
        """Decide `command` once and return it as stored, with its status and result or error.

        Raises `CommandIdReused` when the id was stored for a different command; database errors
        propagate (the command then stays `pending`, and dispatching it again completes it).
        """
        if not conn.autocommit:
            raise ValueError("dispatch needs an autocommit connection (it runs its transactions)")
        # One span per dispatch, current while the events are appended: their metadata carries
        # its trace context, which the projections' batch spans link to (projectord/tracing.py).
        with dispatch_span(command) as span:
            await self.commands.store(conn, command)
            for attempt in range(1, self.max_attempts + 1):
                outcome = await self._attempt(conn, command, attempt)
                if outcome is not None:
                    record_dispatch(span, outcome)
                    return outcome
                log.info("command.conflict", command_id=str(command.id), attempt=attempt)
                await anyio.sleep(conflict_backoff(attempt))
        raise AssertionError("unreachable: the last attempt returns an outcome")

    async def _attempt(
        self, conn: AsyncConnection[Any], command: Command, attempt: int
    ) -> Command | None:
        """One deciding transaction: lock, decide, append, record. Returns the command as stored
        (a duplicate as found), or None when another writer got in first: then retry.

        The retry needs a *fresh* transaction, not a savepoint: this one took its id when it
        locked the command row, and the winner may have taken a newer one. The next version
        appended with this older id would come before the winner's in commit order, which the
        store refuses (40001). The last attempt records the failure in the transaction it has.
        """
        decided: Command | None = None
        async with conn.transaction():
            await conn.execute(self._queries["read_committed"])
            stored = await self.commands.lock(conn, command.id)
            if not stored.same_request_as(command):
                raise CommandIdReused(command.id)
            if stored.status is not CommandStatus.PENDING:
                log.info("command.duplicate", command_id=str(command.id), status=stored.status)
                return stored
            try:
                decided = await self._decide(conn, stored, attempt)
            except (ConcurrencyError, psycopg.errors.SerializationFailure) as exc:
                if attempt < self.max_attempts:
                    raise psycopg.Rollback() from None  # leaves the block, rolled back
                decided = failed(stored, f"gave up after {attempt} attempt(s): {conflict(exc)}")
            await self.commands.finish(conn, decided)
        if decided is not None:
            self._log_outcome(decided)
        return decided

    async def dispatch_and_wait(
        self,
        conn: AsyncConnection[Any],
        command: Command,
        projections: Sequence[Projection],
        *,
        timeout: float = 30.0,
    ) -> Command:
        """Read your writes: dispatch, then return once each of `projections` has applied the
        command's events of its types, so a read of their tables shows the new state.

        A command that failed returns at once. On success the command is marked `processed`.
        Raises `ReadModelTimeout` (the command stays `consumed`) when `timeout` runs out.
        """
        outcome = await self.dispatch(conn, command)
        if not outcome.status.succeeded:
            return outcome
        targets = event_positions(outcome, projections)
        behind = await wait_for_positions(conn, self._queries, targets, timeout=timeout)
        if behind:
            raise ReadModelTimeout(outcome, behind, timeout)
        if outcome.status is CommandStatus.CONSUMED:
            await self.commands.mark_processed(conn, outcome.id)
            outcome.status = CommandStatus.PROCESSED
        return outcome

    async def _decide(self, conn: AsyncConnection[Any], command: Command, attempt: int) -> Command:
        """Route, validate, load, decide and append. Another writer that got in first raises
        `ConcurrencyError` (same version) or `SerializationFailure` (newer transaction)."""
        handler = self.registry.route(command.type)
        if handler is None:
            known = ", ".join(self.registry.command_types) or "none configured"
            return failed(command, f"unknown command type {command.type!r} (known: {known})")
        try:
            payload = handler.parse(command.payload)
        except InvalidPayload as exc:
            return failed(command, str(exc))
        command.aggregate_id = payload.target_id
        command.attempts = attempt
        try:
            version, changes = await self._decide_once(conn, handler, command, payload)
        except CommandRejected as exc:
            return failed(command, str(exc))
        new_events = self._new_events(handler, command, version, changes)
        positions = await self.events.append(conn, new_events)
        return await self._consumed(conn, handler, command, new_events, positions)

    async def _decide_once(
        self,
        conn: AsyncConnection[Any],
        handler: CommandHandler,
        command: Command,
        payload: CommandPayload,
    ) -> tuple[int, list[Change]]:
        """Load the aggregate from its events and let it decide; returns its version and the
        changes. A handler that crashes rejects the command: it must not take the caller down."""
        aggregate = handler.aggregate(payload.target_id, command.tenant_id)
        try:
            aggregate.replay(await self.events.load(conn, payload.target_id))
        except (SchemaVersionTooNew, UpcastFailed) as exc:
            # `apply` sees only current shapes; one this code cannot produce fails the command
            # (nothing appended) rather than deciding on state folded from a guess.
            raise CommandRejected(f"cannot load aggregate {payload.target_id}: {exc}") from exc
        try:
            changes = aggregate.handle(payload)
        except CommandRejected:
            raise
        except Exception as exc:
            log.error(
                "command.handler_crashed",
                command_id=str(command.id),
                handler=f"{handler.aggregate.__name__}.{handler.method}",
                exc_info=True,
            )
            raise CommandRejected(
                f"handler {handler.aggregate.__name__}.{handler.method} raised"
                f" {type(exc).__name__}: {exc}"
            ) from exc
        for change in changes:
            if not isinstance(change, Change):
                raise CommandRejected(
                    f"handler {handler.aggregate.__name__}.{handler.method} returned {change!r},"
                    " not a Change"
                )
        return aggregate.version, changes

    @staticmethod
    def _new_events(
        handler: CommandHandler, command: Command, version: int, changes: Sequence[Change]
    ) -> list[NewEvent]:
        assert command.aggregate_id is not None
        metadata = {**command.metadata, "command_id": str(command.id), "command_type": command.type}
        return [
            NewEvent(
                tenant_id=command.tenant_id,
                aggregate_id=command.aggregate_id,
                version=version + offset,
                type=change.type,
                payload=change.payload,
                metadata=metadata,
                aggregate_type=handler.aggregate.aggregate_type,
            )
            for offset, change in enumerate(changes, start=1)
        ]

    async def _consumed(
        self,
        conn: AsyncConnection[Any],
        handler: CommandHandler,
        command: Command,
        new_events: Sequence[NewEvent],
        positions: Sequence[int],
    ) -> Command:
        cur = await conn.execute(self._queries["current_transaction_id"])
        row = await cur.fetchone()
        command.status = CommandStatus.CONSUMED
        command.error = None
        command.result = {
            "aggregate_id": str(command.aggregate_id),
            "aggregate_type": handler.aggregate.aggregate_type,
            "version": new_events[-1].version if new_events else None,
            "transaction_id": row[0] if row and new_events else None,
            "events": [
                {
                    "event_id": str(event.event_id),
                    "type": event.type,
                    "version": event.version,
                    "global_position": position,
                }
                for event, position in zip(new_events, positions, strict=True)
            ],
        }
        return command

    @staticmethod
    def _log_outcome(command: Command) -> None:
        context = {
            "command_id": str(command.id),
            "type": command.type,
            "aggregate_id": str(command.aggregate_id) if command.aggregate_id else None,
            "attempts": command.attempts,
        }
        if command.status is CommandStatus.FAILED:
            log.debug("command.failed", error=command.error, **context)
        else:
            log.debug("command.consumed", **context)


def failed(command: Command, error: str) -> Command:
    command.status = CommandStatus.FAILED
    command.error = error
    command.result = None
    return command


def event_positions(command: Command, projections: Sequence[Projection]) -> dict[str, Checkpoint]:
    """Per projection, the commit position of the last of the command's events it consumes."""
    result = command.result or {}
    if not result.get("events"):
        return {}
    txid = int(result["transaction_id"])
    targets: dict[str, Checkpoint] = {}
    for projection in projections:
        mine = [
            e["global_position"] for e in result["events"] if e["type"] in projection.event_types
        ]
        if mine:
            targets[projection.name] = Checkpoint(txid, max(mine))
    return targets


def conflict(exc: Exception) -> str:
    """What the losing writer is told: the store's one-line message, without its hint."""
    if isinstance(exc, psycopg.Error) and exc.diag.message_primary:
        return exc.diag.message_primary
    return str(exc)


def conflict_backoff(attempt: int) -> float:
    """A short jittered pause, so writers that lost the same race do not collide again in step."""
    first, largest = CONFLICT_BACKOFF
    return random.uniform(0, nominal_delay(attempt, first, largest))
