"""The reaper: ends the server sessions of connections the daemon gave up as dead.

After a silent partition the server still holds the sessions of the connections the daemon
discarded (projectord/database.py, `deadline`): their locks (ownership's advisory locks, a batch's
row lock on the positions row), their transaction's xid (which holds back every projection's
horizon) and, for the listener, the notification queue. The server's keepalives end them after
about half a minute, and never while something on the path still acknowledges its packets. So as
soon as the server can be reached again, the daemon terminates them itself, matched on pid and
start time.
"""

from __future__ import annotations

import anyio
import psycopg

from projectord.database import condemned, connect, deadline, describe_error, on_condemned, reap
from projectord.logs import get_logger

log = get_logger("projectord.daemon.reaper")

CONNECT_TIMEOUT = 3  # seconds; libpq's minimum is 2
RETRY_AFTER = (0.25, 2.0)  # seconds between attempts while the server cannot be reached


class Reaper:
    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.reaped = 0
        self._wake = anyio.Event()
        on_condemned(lambda: self._wake.set())

    async def run(self) -> None:
        failures = 0
        while True:
            if not condemned():
                await self._wake.wait()
                self._wake = anyio.Event()
                continue
            try:
                ended = await self._reap_once()
            except (psycopg.Error, OSError) as exc:
                failures += 1
                log.debug("reaper.failed", error=describe_error(exc, self.dsn))
                await anyio.sleep(min(RETRY_AFTER[1], RETRY_AFTER[0] * failures))
                continue
            failures = 0
            self.reaped += ended
            if ended:
                log.info("reaper.terminated", sessions=ended)

    async def _reap_once(self) -> int:
        conn = await connect(self.dsn, autocommit=True, connect_timeout=CONNECT_TIMEOUT)
        async with conn:
            async with deadline(conn, "terminating dead sessions"):
                return await reap(conn)
