"""Connecting to Postgres: connection settings shared by the pool, the listener and the CLI.

Every connection decodes `jsonb` with orjson (about half the cost of a lean catch-up loop is JSON
decoding, and orjson halves it) and names itself `projectord` in `pg_stat_activity`.
"""

from __future__ import annotations

import select
from typing import Any

import orjson
import psycopg
from psycopg import AsyncConnection
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.types.json import set_json_dumps, set_json_loads
from psycopg_pool import AsyncConnectionPool

from projectord.queries import quote_ident

APPLICATION_NAME = "projectord"


def _orjson_dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def configure_json(conn: psycopg.BaseConnection[Any]) -> None:
    set_json_loads(orjson.loads, conn)
    set_json_dumps(_orjson_dumps, conn)


def redact(dsn: str) -> str:
    """The DSN without its password, for logs and messages."""
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "<unparsable database_url>"
    if "password" in params:
        params["password"] = "***"
    return make_conninfo(**{k: str(v) for k, v in params.items()})


def describe_error(exc: BaseException, dsn: str | None = None) -> str:
    """One line for an operator; never carries the password."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if dsn:
        try:
            password = conninfo_to_dict(dsn).get("password")
        except psycopg.ProgrammingError:
            return (
                f"{type(exc).__name__} (the database_url does not parse, so nothing of it is shown)"
            )
        if password:
            text = text.replace(str(password), "***")
    return text


async def connect(dsn: str, *, autocommit: bool = False, **kwargs: Any) -> AsyncConnection[Any]:
    conn = await AsyncConnection.connect(
        dsn, autocommit=autocommit, application_name=APPLICATION_NAME, **kwargs
    )
    configure_json(conn)
    return conn


async def check_quietly(conn: AsyncConnection[Any]) -> None:
    """The pool's check on checkout, without a round trip when the connection has nothing to say.

    An idle connection the server ended (a restart, `pg_terminate_backend`) has something to read:
    the server's FATAL message, or the end of the stream. Only then is it checked for real (an
    empty query), and the pool replaces it if that fails. A round trip on every checkout would be
    a sixth of a live batch's (projectord/runner.py); a connection that fails without a word (a
    network that drops packets) fails its next statement instead, which the runner retries.
    """
    if conn.closed or conn.pgconn.status != psycopg.pq.ConnStatus.OK:
        raise psycopg.OperationalError("the connection is closed")
    readable, _, _ = select.select([conn.pgconn.socket], [], [], 0)
    if readable:
        await AsyncConnectionPool.check_connection(conn)


def make_pool(
    dsn: str, *, max_size: int, read_model_schema: str, name: str = "projectord"
) -> AsyncConnectionPool:
    """A pool of autocommit connections for batches; each batch opens its own transaction.

    `search_path` is the read-model schema, so unqualified table names in handlers resolve to the
    projections' tables. Closed connections are detected on checkout and replaced.
    """
    search_path = quote_ident(read_model_schema)

    async def configure(conn: AsyncConnection[Any]) -> None:
        configure_json(conn)
        await conn.execute(f"SET search_path TO {search_path}")

    return AsyncConnectionPool(
        dsn,
        min_size=1,
        max_size=max_size,
        name=name,
        open=False,
        configure=configure,
        check=check_quietly,
        kwargs={"application_name": APPLICATION_NAME, "autocommit": True},
        # psycopg_pool's own reconnection backs off exponentially without a cap (1, 2, 4, … s)
        # until reconnect_timeout: after a long outage it would sleep for about as long again.
        # So its attempts stop early and the runners own the retry policy instead: a runner that
        # waits `timeout` for a connection gets PoolTimeout, a transient error, backs off (capped
        # at a few seconds) and asks again, which makes the pool try to connect again.
        reconnect_timeout=2.0,
        timeout=3.0,
    )
