"""What a runner does when applying events fails: the error policy of a projection.

Two kinds of failure are told apart, because they call for opposite answers:

- **Transient** database errors (a lost connection, a serialization failure, a deadlock, a lock
  timeout) say nothing about the handler: the same batch is retried, with a backoff capped at a
  few seconds, for as long as it takes, and never counts as a handler failure.
- **Handler failures** (anything else the handler raises, or running past `handler_timeout`:
  projectord/runner/handler_timeout.py) are retried `max_attempts` times with exponential backoff
  and
  jitter, in case the cause is outside the event (a row another system has not written yet). Then
  the runner isolates the poison event by bisecting the batch: the events before it are applied and
  committed, and the poison event is dealt with by `on_error`: `pause` (the default: the
  projection's state becomes `failed`, with the event and the error stored, until an operator runs
  `resume` or `skip`) or `skip` (the event goes to the dead letters in the transaction that moves
  the checkpoint past it).

Each key has a configuration default (`on_error`, `max_attempts`, `handler_timeout`) that a
projection may override with a class attribute of the same name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import psycopg
import psycopg_pool
from psycopg import AsyncConnection

from projectord.backoff import jittered_delay
from projectord.database import DeadConnection
from projectord.projection import Projection

if TYPE_CHECKING:
    from projectord.config import Settings

OnError = Literal["pause", "skip"]

HANDLER_BACKOFF = (0.1, 30.0)  # seconds: first retry of a handler failure, and the cap
TRANSIENT_BACKOFF = (0.1, 2.0)  # a lost database is asked again at least every 2 s


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


# SQLSTATEs that say nothing about the handler (https://www.postgresql.org/docs/current/errcodes-appendix.html):
# a serialization failure, a deadlock, a lock not available (NOWAIT, lock_timeout), and the server
# shutting down or not yet accepting connections (57P01 admin, 57P02 crash, 57P03 cannot connect).
TRANSIENT_SQLSTATES = frozenset({"40001", "40P01", "55P03", "57P01", "57P02", "57P03"})
# Whole classes: 08 connection exception, 53 insufficient resources (disk full, out of memory,
# too many connections): the server or the network, never the event.
TRANSIENT_CLASSES = frozenset({"08", "53"})


class ClientSideError(Exception):
    """libpq refused a statement on a connection that is still sound ("number of parameters must
    be between 0 and 65535", say): an error without a SQLSTATE that the same event raises every
    time. A handler failure, not a lost connection."""


def is_transient(exc: BaseException, conn: AsyncConnection[Any] | None = None) -> bool:
    """Errors that say nothing about the handler: the connection or the server's concurrency.

    Decided by SQLSTATE against an explicit list, not by psycopg's exception class: psycopg maps
    whole classes to `OperationalError`, among them 54 (an index row too large, stack depth
    exceeded), 55 and 58, which an event causes deterministically and would otherwise be retried
    forever. An `OperationalError` without a SQLSTATE comes from libpq: the connection failing
    (closed, broken, no answer), or a statement libpq refused to send, which is deterministic.
    Given the connection it was raised on, it is transient only if that connection is closed or
    broken; without it (the caller no longer has it), transient: the runner turns the others
    into `ClientSideError` while it still has the connection (`client_side`). A missed deadline
    (`DeadConnection`) and no free connection (`PoolTimeout`) are transient. Everything else
    counts toward `max_attempts`."""
    if isinstance(exc, (psycopg_pool.PoolTimeout, DeadConnection)):
        return True
    if not isinstance(exc, psycopg.Error):
        return False
    sqlstate = exc.sqlstate
    if sqlstate is None:
        if not isinstance(exc, psycopg.OperationalError):
            return False
        return conn is None or conn.closed or conn.broken
    return sqlstate in TRANSIENT_SQLSTATES or sqlstate[:2] in TRANSIENT_CLASSES


def client_side(exc: BaseException, conn: AsyncConnection[Any]) -> ClientSideError | None:
    """`exc` as a `ClientSideError` if it is a libpq error without a SQLSTATE raised on `conn`
    while `conn` stayed sound: open, not broken and out of its transaction again (the rollback
    after the failure worked, so the server answers). Checked by the caller after that rollback,
    while it still holds the connection; later checks (`is_transient` without a connection)
    would take it for a lost connection and retry it for ever."""
    if (
        isinstance(exc, psycopg.OperationalError)
        and exc.sqlstate is None
        and not isinstance(exc, DeadConnection)
        and not is_transient(exc, conn)
        and conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    ):
        return ClientSideError(str(exc))
    return None


def backoff(attempts: int, error: BaseException) -> float:
    """Exponential backoff with jitter; transient errors are retried at least every 2 s, so the
    daemon is back soon after the server is."""
    first, cap = TRANSIENT_BACKOFF if is_transient(error) else HANDLER_BACKOFF
    return jittered_delay(attempts - 1, first, cap)
