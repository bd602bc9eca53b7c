"""The systemd watchdog: `WATCHDOG=1` at half of `$WATCHDOG_USEC`, only while the daemon's loops
are alive.

A ping proves more than "the process exists": it is withheld as soon as any runner or the
listener has made no progress for `stall_timeout` seconds outside its deliberate waits, so
systemd restarts a daemon that is wedged (a handler that never returns, a connection that hangs),
and the log says which loop it was.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import anyio

from projectord.daemon.heartbeat import Heartbeat
from projectord.daemon.systemd import SystemdNotifier
from projectord.logs import get_logger

log = get_logger("projectord.daemon.watchdog")


class Watchdog:
    def __init__(
        self, notifier: SystemdNotifier, heartbeats: Sequence[Heartbeat], stall_timeout: float
    ) -> None:
        self.notifier = notifier
        self.heartbeats = heartbeats
        self.stall_timeout = stall_timeout
        self.withheld = False

    def stalled(self) -> list[str]:
        now = time.monotonic()
        return [b.name for b in self.heartbeats if b.stalled_for(now) > self.stall_timeout]

    def tick(self) -> None:
        """Ping if every loop is alive; log once when pings stop and once when they resume."""
        stalled = self.stalled()
        if not stalled:
            self.notifier.watchdog()
            if self.withheld:
                log.info("watchdog.resumed")
                self.withheld = False
        elif not self.withheld:
            log.error("watchdog.withheld", stalled=stalled, stall_timeout=self.stall_timeout)
            self.withheld = True

    async def run(self) -> None:
        interval = self.notifier.watchdog_interval
        if interval is None:
            return
        log.info("watchdog.enabled", interval=interval, stall_timeout=self.stall_timeout)
        while True:
            self.tick()
            await anyio.sleep(interval)
