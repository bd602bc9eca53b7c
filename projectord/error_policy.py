"""What a runner does when applying events fails: the error policy of a projection.

Two kinds of failure are told apart, because they call for opposite answers:

- **Transient** database errors (a lost connection, a serialization failure, a deadlock, a lock
  timeout) say nothing about the handler: the same batch is retried, with a backoff capped at a
  few seconds, for as long as it takes, and never counts as a handler failure.
- **Handler failures** (anything else the handler raises, or running past `handler_timeout`) are
  retried `max_attempts` times with exponential backoff and jitter, in case the cause is outside
  the event (a row another system has not written yet). Then the runner isolates the poison
  event by bisecting the batch: the events before it are applied and committed, and the poison
  event is dealt with by `on_error`: `pause` (the default: the projection's state becomes
  `failed`, with the event and the error stored, until an operator runs `resume` or `skip`) or
  `skip` (the event goes to the dead letters in the transaction that moves the checkpoint past it).

Each key has a configuration default (`on_error`, `max_attempts`, `handler_timeout`) that a
projection may override with a class attribute of the same name.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import anyio
import psycopg
import psycopg_pool
from psycopg import AsyncConnection

from projectord.event_store import Event
from projectord.projection import Projection

if TYPE_CHECKING:
    from projectord.config import Settings

OnError = Literal["pause", "skip"]

CANCEL_GRACE = 2.0  # seconds a timed-out handler has to return once its statement is cancelled
HANDLER_BACKOFF = (0.1, 30.0)  # seconds: first retry of a handler failure, and the cap
TRANSIENT_BACKOFF = (0.1, 2.0)  # a lost database is asked again at least every 2 s


class HandlerTimeout(Exception):
    """A handler ran longer than its `handler_timeout` and was cancelled."""


@dataclass(frozen=True)
class ErrorPolicy:
    on_error: OnError = "pause"
    max_attempts: int = 5  # handler attempts of a batch before its poison event is isolated
    handler_timeout: float = 60.0  # seconds one handler call may run

    @classmethod
    def configured(cls, settings: Settings) -> ErrorPolicy:
        """The configuration's defaults, for every projection that does not override them."""
        return cls(settings.on_error, settings.max_attempts, settings.handler_timeout)

    @classmethod
    def of(cls, projection: Projection, default: ErrorPolicy) -> ErrorPolicy:
        """The projection's own policy: its class attributes where set, else the default."""
        values: dict[str, Any] = {}
        for key in ("on_error", "max_attempts", "handler_timeout"):
            value = getattr(projection, key, None)
            values[key] = getattr(default, key) if value is None else value
        return cls(**values)


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


def backoff(attempts: int, error: BaseException) -> float:
    """Exponential backoff with jitter; transient errors are retried at least every 2 s, so the
    daemon is back soon after the server is."""
    low, high = TRANSIENT_BACKOFF if is_transient(error) else HANDLER_BACKOFF
    delay = min(high, low * 2 ** min(attempts - 1, 20))
    return delay * random.uniform(0.5, 1.0)


async def run_handler(
    projection: Projection,
    events: Sequence[Event],
    conn: AsyncConnection[Any],
    timeout: float,
) -> None:
    """Call the projection's handler; after `timeout` seconds raise `HandlerTimeout`, and the
    caller's transaction rolls back."""
    await run_bounded(
        lambda: projection.handle(events, conn),
        conn,
        timeout,
        handler_of(projection, events),
    )


def handler_of(projection: Projection, events: Sequence[Event]) -> str:
    """What ran, as a `HandlerTimeout` names it."""
    return f"the handler of {projection.name!r} on {len(events)} event(s)"


async def run_bounded(
    work: Callable[[], Awaitable[None]],
    conn: AsyncConnection[Any],
    timeout: float,
    what: str,
) -> None:
    """Run `work` (a handler, or a whole batch transaction whose statements are pipelined and
    only run on the server when it ends); after `timeout` seconds raise `HandlerTimeout`.

    A statement still running then is cancelled on the server first (a cancel request on a side
    connection): the work sees it fail and returns, and the connection stays usable. Merely
    cancelling the task is not enough, although psycopg 3.3 sends a cancel request when its task
    is cancelled: anyio delivers the cancellation again while psycopg waits for that request,
    and psycopg then closes the connection while the server goes on running the statement,
    holding its locks, which blocks the retry (seen against PostgreSQL 15 over TCP:
    tests/test_error_policy.py, the handler-timeout test, dead-lettered the wrong events).
    Work that does not return within CANCEL_GRACE after that (it waits on something other than
    the database) is cancelled as a task. The task group costs about 150 µs a batch."""
    timed_out = False
    failure: BaseException | None = None

    async def expire(scope: anyio.CancelScope) -> None:
        nonlocal timed_out
        await anyio.sleep(timeout)
        timed_out = True
        try:
            await conn.cancel_safe(timeout=CANCEL_GRACE)
        except Exception:  # nothing to cancel, or the server is away: the task is cancelled
            pass
        await anyio.sleep(CANCEL_GRACE)
        scope.cancel()

    async with anyio.create_task_group() as tasks:
        with anyio.CancelScope() as scope:
            tasks.start_soon(expire, scope)
            try:
                await work()
            except Exception as exc:
                failure = exc
            finally:
                tasks.cancel_scope.cancel()
    if timed_out:
        raise HandlerTimeout(
            f"{what} ran longer than handler_timeout ({timeout:g}s) and was cancelled"
        )
    if failure is not None:
        raise failure
