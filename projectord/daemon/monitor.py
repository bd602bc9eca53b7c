"""The daemon's periodic look at itself: every few seconds one status snapshot feeds systemd's
`STATUS=` line, the metrics' lag and health gauges (and `/healthz`), and the log — one
`health.changed` line when the health verdict or its reasons change, never one per look."""

from __future__ import annotations

from typing import Any

import anyio

from projectord.control.health import HealthCheck
from projectord.control.metrics import Metrics
from projectord.control.status import summary_line
from projectord.daemon.systemd import SystemdNotifier
from projectord.logs import get_logger

log = get_logger("projectord.daemon.monitor")

MONITOR_INTERVAL = 5.0


class Monitor:
    def __init__(
        self,
        health: HealthCheck,
        notifier: SystemdNotifier,
        metrics: Metrics | None = None,
        *,
        interval: float = MONITOR_INTERVAL,
    ) -> None:
        self.health = health
        self.notifier = notifier
        self.metrics = metrics
        self.interval = interval
        self.summary = ""
        self._verdict: tuple[str, tuple[str, ...]] = ("ok", ())

    async def run(self) -> None:
        while True:
            await anyio.sleep(self.interval)
            try:
                await self.look()
            except Exception as exc:  # a look that fails must not take the daemon down
                log.warning("monitor.look_failed", error=str(exc))

    async def look(self) -> dict[str, Any]:
        snapshot = await self.health.reporter.snapshot()
        verdict = await self.health.evaluate(snapshot)
        self._log_change(verdict)
        summary = summary_line(snapshot)
        if summary != self.summary:
            self.summary = summary
            self.notifier.status(summary)
        if self.metrics is not None:
            self.metrics.update(snapshot)
            self.metrics.record_health(verdict)
        return snapshot

    def _log_change(self, verdict: dict[str, Any]) -> None:
        key = (verdict["status"], tuple(sorted(r["code"] for r in verdict["reasons"])))
        if key == self._verdict:
            return
        worse = key[0] != "ok"
        self._verdict = key
        (log.warning if worse else log.info)(
            "health.changed",
            status=verdict["status"],
            reasons=[r["message"] for r in verdict["reasons"]],
        )
