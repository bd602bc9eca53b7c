"""The notification listener: one dedicated LISTEN connection that wakes the runners.

It lives outside the pool, in autocommit (a listener inside a transaction holds notifications back
and fills the server's queue). It never gives up: a lost connection is retried with capped backoff,
and every (re)connection wakes every runner for a catch-up read, because notifications sent while
it was away are gone. A notification it sends itself every `probe_interval` proves the path still
works; a listener that cannot hear itself reconnects.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

import anyio
import psycopg

from projectord.database import connect, describe_error
from projectord.heartbeat import Heartbeat
from projectord.logs import get_logger

log = get_logger("projectord.listener")

PROBE_PAYLOAD = "probe"


def channel_name(schema: str) -> str:
    """The channel the events trigger notifies (see sql/migrations/0001_event_store.sql)."""
    return f"projectord_{schema}"


class NotificationListener:
    def __init__(
        self,
        dsn: str,
        schema: str,
        wake: Callable[[], None],
        *,
        probe_interval: float = 10.0,
        max_backoff: float = 5.0,
    ) -> None:
        self.dsn = dsn
        self.channel = channel_name(schema)
        self.wake = wake
        self.probe_interval = probe_interval
        self.max_backoff = max_backoff
        self.connected = False
        self.last_heard = 0.0  # monotonic time of the last notification or successful probe
        self.reconnects = 0
        self.heartbeat = Heartbeat("listener")  # beats at least every probe_interval / 2

    async def run(self) -> None:
        failures = 0
        while True:
            self.heartbeat.beat()
            try:
                await self._listen(failures)
            except (psycopg.Error, OSError, TimeoutError) as exc:
                if self.connected or failures == 0:
                    log.warning("listener.disconnected", error=describe_error(exc, self.dsn))
                self.connected = False
                failures += 1
                delay = min(self.max_backoff, 0.05 * 2 ** min(failures, 10))
                with self.heartbeat.waiting():
                    await anyio.sleep(delay * random.uniform(0.5, 1.0))
            else:  # pragma: no cover - _listen only returns by raising
                failures = 0

    def _connected(self, failures: int) -> None:
        self.connected = True
        self.last_heard = time.monotonic()
        if failures:
            self.reconnects += 1
            log.info("listener.reconnected", attempts=failures)
        else:
            log.info("listener.connected", channel=self.channel)
        self.wake()  # catch up on anything notified while no one listened

    async def _listen(self, failures: int) -> None:
        conn = await connect(self.dsn, autocommit=True, connect_timeout=5)
        async with conn:
            await conn.execute(f'LISTEN "{self.channel}"')
            self._connected(failures)
            probe_sent = 0.0
            while True:
                self.heartbeat.beat()
                # A deliberate wait, bounded: the probe below catches a connection gone silent.
                with self.heartbeat.waiting():
                    async for notify in conn.notifies(timeout=self.probe_interval / 2):
                        self.last_heard = time.monotonic()
                        if notify.payload == PROBE_PAYLOAD:
                            probe_sent = 0.0
                        else:
                            self.wake()
                now = time.monotonic()
                if probe_sent and now - probe_sent > self.probe_interval:
                    raise TimeoutError("the listener did not hear its own probe notification")
                if not probe_sent and now - self.last_heard >= self.probe_interval / 2:
                    await conn.execute("SELECT pg_notify(%s, %s)", (self.channel, PROBE_PAYLOAD))
                    probe_sent = now
