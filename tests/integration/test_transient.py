"""Which errors are transient (retried for as long as it takes, never counted against the handler)
and which count toward `max_attempts`: decided by SQLSTATE, at the boundaries of each class. No
server needed, but for the connection a libpq error without a SQLSTATE was raised on: psycopg's
error classes carry their SQLSTATE."""

from __future__ import annotations

import anyio
import psycopg
import psycopg_pool
import pytest

from projectord.database import DeadConnection, connect
from projectord.runner.error_policy import ClientSideError, client_side, is_transient
from tests.support.harness import TestDatabase

TRANSIENT = [
    "08000",  # connection_exception
    "08003",  # connection_does_not_exist
    "08006",  # connection_failure
    "08P01",  # protocol_violation: still the connection
    "40001",  # serialization_failure
    "40P01",  # deadlock_detected
    "55P03",  # lock_not_available
    "57P01",  # admin_shutdown
    "57P02",  # crash_shutdown
    "57P03",  # cannot_connect_now
    "53000",  # insufficient_resources
    "53100",  # disk_full
    "53200",  # out_of_memory
    "53300",  # too_many_connections
]
COUNTED = [
    "54000",  # program_limit_exceeded: an index row too large for a btree
    "54001",  # statement_too_complex: stack depth exceeded
    "54011",  # too_many_columns
    "55000",  # object_not_in_prerequisite_state
    "55006",  # object_in_use
    "55P02",  # cant_change_runtime_param
    "58000",  # system_error
    "58030",  # io_error
    "57014",  # query_canceled: a statement_timeout, the event's own doing
    "57P04",  # database_dropped
    "40002",  # transaction_integrity_constraint_violation: class 40, not on the list
    "40003",  # statement_completion_unknown
    "23505",  # unique_violation
    "22P02",  # invalid_text_representation
    "42P01",  # undefined_table
    "XX000",  # internal_error
]


@pytest.mark.parametrize("sqlstate", TRANSIENT)
def test_listed_sqlstates_are_transient(sqlstate: str) -> None:
    assert is_transient(psycopg.errors.lookup(sqlstate)("from the server"))


@pytest.mark.parametrize("sqlstate", COUNTED)
def test_other_sqlstates_count_toward_max_attempts(sqlstate: str) -> None:
    assert not is_transient(psycopg.errors.lookup(sqlstate)("from the server"))


def test_connection_failures_without_a_sqlstate_are_transient() -> None:
    assert is_transient(psycopg.OperationalError("the connection is closed"))
    assert is_transient(psycopg_pool.PoolTimeout("couldn't get a connection after 30 sec"))


def test_errors_outside_the_database_count_toward_max_attempts() -> None:
    assert not is_transient(ValueError("a bug in the handler"))
    assert not is_transient(psycopg.InterfaceError("the handler misused the connection"))
    assert not is_transient(psycopg.NotSupportedError("COPY in pipeline mode"))


def test_without_a_sqlstate_only_a_closed_or_broken_connection_is_transient(
    db: TestDatabase,
) -> None:
    """libpq raises `OperationalError` without a SQLSTATE for a statement it refuses to send
    too; on a connection that is still sound that is the event's doing, not a lost connection."""
    refused = psycopg.OperationalError("number of parameters must be between 0 and 65535")

    async def check() -> None:
        conn = await connect(db.url, autocommit=True)
        assert not is_transient(refused, conn)
        assert isinstance(client_side(refused, conn), ClientSideError)
        assert client_side(DeadConnection("no answer"), conn) is None
        assert is_transient(DeadConnection("no answer"), conn)
        await conn.close()
        assert is_transient(refused, conn)
        assert client_side(refused, conn) is None

    anyio.run(check)
    assert not is_transient(ClientSideError("number of parameters must be between 0 and 65535"))
