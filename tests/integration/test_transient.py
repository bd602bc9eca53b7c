"""Which libpq errors without a SQLSTATE are transient: decided by the connection they were raised
on, so this needs a server. The SQLSTATE boundaries of each class, which need none, are in
tests/unit/test_error_policy.py."""

from __future__ import annotations

import anyio
import psycopg

from projectord.database import DeadConnection, connect
from projectord.runner.error_policy import ClientSideError, client_side, is_transient
from tests.support.harness import TestDatabase


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
