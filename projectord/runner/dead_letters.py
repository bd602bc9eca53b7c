"""Dead letters: events a projection could not apply, set aside so that it could go on.

An event gets here by an operator's `skip` or by `on_error = "skip"`, always in the transaction
that moves the projection's checkpoint past it. The event itself stays in the event store; the
row says which projection gave up on it, why (error type, message, traceback) and after how many
attempts.

`retry` re-applies one dead letter after the cause was fixed: in one transaction, the
projection's handler runs on that event alone and the dead letter is marked resolved as
`retried` (the row stays, as a record). It is refused unless the projection's checkpoint is past
the event: a projection still behind it applies the event itself when it gets there, and a retry
then would apply it twice. The checkpoint row is locked for the transaction, so that stays true
until the commit. For the same reason a rebuild, which meets every event again, resolves the
projection's pending dead letters as `rebuilt`.
"""

from __future__ import annotations

import traceback as tb
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import anyio
from psycopg import AsyncConnection

from projectord.checkpoint import START
from projectord.event_store import Event
from projectord.projection import Projection
from projectord.queries import Queries
from projectord.runner.checkpoint_store import CheckpointStore
from projectord.runner.error_policy import ErrorPolicy, backoff, is_transient
from projectord.runner.handler_timeout import run_handler

TRACEBACK_LIMIT = 20_000
RETRY_TRANSIENT_ATTEMPTS = 3  # a deadlock with a batch of the projection, a lost connection


class RetryRefused(Exception):
    """A dead letter that cannot be retried (unknown, done, or not yet passed); one line."""


class RetryFailed(Exception):
    """The handler failed again on the dead-lettered event; the dead letter stays pending."""


def format_traceback(error: BaseException) -> str:
    return "".join(tb.format_exception(error))[-TRACEBACK_LIMIT:]


def dead_letter_params(
    projection: str, event: Event, error: Mapping[str, Any], traceback: str, attempts: int
) -> dict[str, Any]:
    """The parameters of `insert_dead_letter` for `event`, failed with `error`."""
    return {
        "projection": projection,
        "event_id": event.event_id,
        "global_position": event.global_position,
        "transaction_id": str(event.transaction_id),
        "event_type": event.type,
        "error_type": error.get("type"),
        "error_message": error.get("message", ""),
        "traceback": traceback,
        "attempts": attempts,
    }


async def list_dead_letters(
    conn: AsyncConnection[Any],
    queries: Queries,
    *,
    projection: str | None = None,
    include_resolved: bool = False,
) -> list[dict[str, Any]]:
    cur = await conn.execute(
        queries["list_dead_letters"],
        {"projection": projection, "include_resolved": include_resolved},
    )
    columns = [c.name for c in cur.description or ()]
    return [_jsonable(dict(zip(columns, row, strict=True))) for row in await cur.fetchall()]


def _jsonable(letter: dict[str, Any]) -> dict[str, Any]:
    for key in ("created_at", "resolved_at"):
        value = letter[key]
        letter[key] = value.isoformat() if isinstance(value, datetime) else value
    return letter


async def pending_ids(conn: AsyncConnection[Any], queries: Queries, names: list[str]) -> list[int]:
    cur = await conn.execute(queries["pending_dead_letter_ids"], {"names": names})
    return [int(row[0]) for row in await cur.fetchall()]


@dataclass
class DeadLetterRetry:
    """Re-applies dead letters (see the module's docstring) on one connection, in autocommit
    with the read-model schema on its search path."""

    conn: AsyncConnection[Any]
    queries: Queries
    projections: Mapping[str, Projection]
    default_policy: ErrorPolicy

    async def retry(self, letter_id: int) -> dict[str, Any]:
        """Re-apply one dead letter; raises `RetryRefused` or `RetryFailed`. A transient error
        (a deadlock with a batch of the projection, say) is tried again a few times."""
        for attempt in range(1, RETRY_TRANSIENT_ATTEMPTS + 1):
            try:
                return await self._once(letter_id)
            except Exception as exc:
                if not is_transient(exc, self.conn) or attempt == RETRY_TRANSIENT_ATTEMPTS:
                    raise
                await anyio.sleep(backoff(attempt, exc))
        raise AssertionError("unreachable")  # pragma: no cover

    async def _once(self, letter_id: int) -> dict[str, Any]:
        conn, queries = self.conn, self.queries
        handler_error: BaseException | None = None
        async with conn.transaction():
            projection, event = await _lock_letter(conn, queries, self.projections, letter_id)
            await _check_passed(conn, queries, projection.name, event, letter_id)
            policy = ErrorPolicy.of(projection, self.default_policy)
            try:
                async with conn.transaction():  # a savepoint: the failure is recorded below
                    await run_handler(projection, [event], conn, policy.handler_timeout)
            except Exception as exc:
                if is_transient(exc, conn):
                    raise
                handler_error = exc
                await conn.execute(
                    queries["record_retry_failure"],
                    {
                        "id": letter_id,
                        "error_type": type(exc).__name__,
                        "error_message": str(exc)[:2000],
                        "traceback": format_traceback(exc),
                    },
                )
            else:
                await CheckpointStore(queries).count_retried(conn, projection.name)
                await conn.execute(queries["mark_retried"], {"id": letter_id})
        if handler_error is not None:
            raise RetryFailed(
                f"dead letter {letter_id}: {projection.name} failed again on event "
                f"{event.event_id}: {type(handler_error).__name__}: {handler_error}"
            )
        return {
            "id": letter_id,
            "projection": projection.name,
            "event_id": str(event.event_id),
            "event_type": event.type,
            "global_position": event.global_position,
        }


async def _lock_letter(
    conn: AsyncConnection[Any],
    queries: Queries,
    projections: Mapping[str, Projection],
    letter_id: int,
) -> tuple[Projection, Event]:
    cur = await conn.execute(queries["lock_dead_letter"], {"id": letter_id})
    row = await cur.fetchone()
    if row is None:
        raise RetryRefused(f"dead letter {letter_id}: no such dead letter")
    name, resolution, *event_columns = row
    if resolution is not None:
        raise RetryRefused(f"dead letter {letter_id}: already resolved ({resolution})")
    projection = projections.get(name)
    if projection is None:
        raise RetryRefused(
            f"dead letter {letter_id}: projection {name!r} is not configured here "
            "(retry with the configuration that runs it)"
        )
    if event_columns[0] is None:
        raise RetryRefused(f"dead letter {letter_id}: its event is no longer in the event store")
    return projection, Event(*event_columns)


async def _check_passed(
    conn: AsyncConnection[Any], queries: Queries, name: str, event: Event, letter_id: int
) -> None:
    checkpoint = await CheckpointStore(queries).lock(conn, name) or START
    if checkpoint < event.commit_position:
        raise RetryRefused(
            f"dead letter {letter_id}: {name} has not passed event {event.event_id} (position "
            f"{event.global_position}) yet; it applies the event itself when it gets there, so "
            "a retry now would apply it twice. Nothing retried"
        )
