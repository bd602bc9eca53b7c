"""Connecting to Postgres: connection settings shared by the pool, the listener and the CLI.

Every connection decodes `jsonb` with orjson (about half the cost of a lean catch-up loop is JSON
decoding, and orjson halves it) and names itself `projectord` in `pg_stat_activity`.

Every connection also has bounded timeouts (docs/reliability.md): a silent network partition
(packets dropped, nothing closed) must never leave a connect, a statement or a session hanging.
`CLIENT_DEFAULTS` are libpq's connect timeout, TCP keepalives and user timeout, and
`SERVER_SETTINGS` the server's side of the same, set per session, so that the server drops a dead
client's session (and its LISTEN, which pins the notification queue). A value the user's own
conninfo gives wins. A kernel only notices a dead path after tens of seconds, and not at all when
something on the path still acknowledges the packets, so the daemon's statements have deadlines
too (`deadline`): a connection that misses one is discarded, and its server session, still alive
over there, is terminated once the server can be reached again (`condemn`, `reap`).
"""

from __future__ import annotations

import os
import select
import time
import weakref
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

import anyio
import orjson
import psycopg
from psycopg import AsyncConnection
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.types.json import set_json_dumps, set_json_loads
from psycopg_pool import AsyncConnectionPool

from projectord.queries import Queries, quote_ident

APPLICATION_NAME = "projectord"

# libpq's side (docs/reliability.md). connect_timeout: a connect during a partition gives up after
# 10 s instead of psycopg's 130 s. Keepalives: an idle connection whose peer is gone is closed
# after 10 + 3 x 5 = 25 s of silence. tcp_user_timeout (ms): sent data unacknowledged for 30 s
# closes the connection (keepalives do not cover a connection with data in flight).
CLIENT_DEFAULTS = {
    "connect_timeout": "10",
    "keepalives": "1",
    "keepalives_idle": "10",
    "keepalives_interval": "5",
    "keepalives_count": "3",
    "tcp_user_timeout": "30000",
}
# The server's side, per session: a LISTEN session of a client that vanished is ended within about
# 25 s (30 s with data in flight) instead of the kernel's two hours, releasing the notification
# queue, its locks and its transaction. Ignored by the server on a unix socket.
SERVER_SETTINGS = {
    "tcp_keepalives_idle": "10",
    "tcp_keepalives_interval": "5",
    "tcp_keepalives_count": "3",
    "tcp_user_timeout": "30000",
}
# Seconds a statement that should take milliseconds (a fetch, a checkpoint read, the listener's
# and ownership's round trips) may go unanswered before its connection is taken for dead.
QUERY_DEADLINE = 10.0
# Seconds after which a condemned session is forgotten: by then the server's keepalives ended it.
CONDEMNED_FOR = 600.0

_QUERIES = Queries("projectord")  # only schema-free queries are used from here
# The identity (pid, backend start) of every session opened through this module.
_sessions: weakref.WeakKeyDictionary[AsyncConnection[Any], tuple[int, datetime]] = (
    weakref.WeakKeyDictionary()
)
# Sessions of connections given up as dead, to terminate on the server: identity -> when.
_condemned: dict[tuple[int, datetime], float] = {}
_on_condemned: list[Callable[[], None]] = []


class DeadConnection(psycopg.OperationalError):
    """A connection missed a deadline and was discarded; a transient error (retried)."""


def with_defaults(dsn: str, **overrides: str) -> str:
    """The DSN with `CLIENT_DEFAULTS` (`overrides` replacing some) for every parameter it does not
    set itself (nor the environment, for the connect timeout: PGCONNECT_TIMEOUT)."""
    params = conninfo_to_dict(dsn)
    defaults = {**CLIENT_DEFAULTS, **overrides}
    if "PGCONNECT_TIMEOUT" in os.environ:
        del defaults["connect_timeout"]
    return make_conninfo(**{**defaults, **{k: str(v) for k, v in params.items()}})


def server_settings(dsn: str) -> dict[str, str]:
    """`SERVER_SETTINGS` except those the user's own `options` (or PGOPTIONS) set."""
    options = f"{conninfo_to_dict(dsn).get('options') or ''} {os.environ.get('PGOPTIONS', '')}"
    return {k: v for k, v in SERVER_SETTINGS.items() if k not in options}


async def set_up_session(
    conn: AsyncConnection[Any], dsn: str, extra: dict[str, str] | None = None
) -> None:
    """Session settings and the session's identity, in one round trip (sql/queries/session.sql)."""
    settings = {**server_settings(dsn), **(extra or {})}
    cur = await conn.execute(
        _QUERIES["session_setup"], {"names": list(settings), "values": list(settings.values())}
    )
    row = await cur.fetchone()
    if row is not None and row[2] is not None:
        _sessions[conn] = (int(row[1]), row[2])


def condemn(conn: AsyncConnection[Any]) -> None:
    """Remember the server session of a connection given up as dead, to be terminated (`reap`)."""
    identity = _sessions.pop(conn, None)
    if identity is None:
        return
    _condemned[identity] = time.monotonic()
    for wake in _on_condemned:
        wake()


def on_condemned(wake: Callable[[], None]) -> None:
    _on_condemned.append(wake)


def condemned() -> int:
    """How many dead sessions wait to be terminated."""
    return len(_condemned)


async def reap(conn: AsyncConnection[Any]) -> int:
    """Terminate the condemned sessions still alive on the server, over a working connection;
    returns how many there were. A session that has ended already is simply forgotten."""
    now = time.monotonic()
    for identity, since in list(_condemned.items()):
        if now - since > CONDEMNED_FOR:
            del _condemned[identity]
    if not _condemned:
        return 0
    identities = list(_condemned)
    cur = await conn.execute(
        _QUERIES["terminate_sessions"],
        {"pids": [i[0] for i in identities], "starts": [i[1] for i in identities]},
    )
    row = await cur.fetchone()
    for identity in identities:
        _condemned.pop(identity, None)
    return int(row[0]) if row else 0


async def session_working(conn: AsyncConnection[Any], conninfo: str, seconds: float) -> bool:
    """Whether `conn`'s server session is running a statement, asked over a new connection to
    `conninfo`, all within `seconds`. No answer, or a session of unknown identity, is `False`:
    the question is how a silent partition is told from a server that is merely busy."""
    identity = _sessions.get(conn)
    if identity is None:
        return False
    try:
        with anyio.fail_after(seconds):
            probe = await connect(conninfo, autocommit=True, connect_timeout=max(int(seconds), 2))
            try:
                cur = await probe.execute(
                    _QUERIES["session_working"], {"pid": identity[0], "started": identity[1]}
                )
                row = await cur.fetchone()
            finally:
                await probe.close()
    except Exception:  # no answer in time (TimeoutError), no connection: not seen working
        return False
    return bool(row and row[0])


async def discard(conn: AsyncConnection[Any]) -> None:
    """Close a connection taken for dead and condemn its server session."""
    condemn(conn)
    await conn.close()


@asynccontextmanager
async def deadline(
    conn: AsyncConnection[Any], what: str, seconds: float = QUERY_DEADLINE
) -> AsyncIterator[None]:
    """Bound the round trips of the block: past `seconds`, the connection is discarded (a
    silent partition never answers, and nothing else would end the wait) and DeadConnection,
    a transient error, is raised."""
    with anyio.move_on_after(seconds) as scope:
        yield
    if scope.cancelled_caught:
        await discard(conn)
        raise DeadConnection(f"no answer to {what} within {seconds:g}s; connection discarded")


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
    """A connection with the bounded timeouts of `CLIENT_DEFAULTS` and `SERVER_SETTINGS` (a
    `connect_timeout` given here wins over the default, the user's conninfo over both)."""
    timeout = kwargs.pop("connect_timeout", None)
    if "options" in kwargs:  # read by `server_settings`: the caller's options win too
        dsn = make_conninfo(dsn, options=kwargs.pop("options"))
    dsn = with_defaults(dsn, **({"connect_timeout": str(timeout)} if timeout else {}))
    conn = await AsyncConnection.connect(
        dsn, autocommit=autocommit, application_name=APPLICATION_NAME, **kwargs
    )
    configure_json(conn)
    try:
        async with deadline(conn, "the session's set-up"):
            await set_up_session(conn, dsn)
            if not autocommit:
                await conn.commit()
    except BaseException:
        await conn.close()
        raise
    return conn


async def check_quietly(conn: AsyncConnection[Any]) -> None:
    """The pool's check on checkout, without a round trip when the connection has nothing to say.

    An idle connection the server ended (a restart, `pg_terminate_backend`) has something to read:
    the server's FATAL message, or the end of the stream. Only then is it checked for real (an
    empty query), and the pool replaces it if that fails. A round trip on every checkout would be
    a sixth of a live batch's (projectord/runner/loop.py); a connection that fails without a word (a
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

    dsn = with_defaults(dsn)

    async def configure(conn: AsyncConnection[Any]) -> None:
        configure_json(conn)
        async with deadline(conn, "the session's set-up"):
            await set_up_session(conn, dsn, {"search_path": search_path})

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
