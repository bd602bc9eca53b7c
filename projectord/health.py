"""`projectord health`: ok / degraded / failing, with the reasons an operator acts on.

failing: a projection stopped on a poison event (state `failed`) or refusing a table another role
owns (state `refused`, projectord/foreign_owner.py), the database has not answered
for `health_outage_seconds`, or a loop of the daemon is wedged (it would stop the systemd watchdog
too). degraded: the database does not answer (yet: the daemon reconnects by itself, so a restart or
a failover is degraded, not failing), the listener is down (the runners still poll), a projection
retries after a handler error, is paused, rebuilding or lagging beyond the thresholds, or an
open transaction has held the xmin horizon back longer than `health_horizon_seconds` — then the
reason names that transaction (pid, xid, age, state, start of its query), because that is who the
operator must talk to.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import anyio

from projectord.heartbeat import Heartbeat
from projectord.status import DB_TIMEOUT, StatusReporter

SEVERITY = {"ok": 0, "degraded": 1, "failing": 2}


@dataclass(frozen=True)
class Thresholds:
    max_lag: int
    max_lag_seconds: float
    horizon_seconds: float
    stall_timeout: float
    outage_seconds: float = 60.0
    notify_queue_usage: float = 0.1  # fraction of the server's notification queue


def reason(severity: str, code: str, message: str, **detail: Any) -> dict[str, Any]:
    return {"severity": severity, "code": code, "message": message, **detail}


class HealthCheck:
    def __init__(
        self, reporter: StatusReporter, heartbeats: Sequence[Heartbeat], thresholds: Thresholds
    ) -> None:
        self.reporter = reporter
        self.heartbeats = heartbeats
        self.thresholds = thresholds
        self._unreachable_since: float | None = None  # monotonic; while the database is away

    async def check(self) -> dict[str, Any]:
        return await self.evaluate(await self.reporter.snapshot())

    async def evaluate(self, snapshot: dict[str, Any]) -> dict[str, Any]:
        reasons = self._daemon_reasons(snapshot)
        for projection in snapshot["projections"]:
            reasons += self._projection_reasons(projection)
        reasons += self._queue_reasons(snapshot)
        if snapshot["database"]["reachable"]:
            reasons += await self._horizon_reasons()
        worst = max((SEVERITY[r["severity"]] for r in reasons), default=0)
        status = next(name for name, level in SEVERITY.items() if level == worst)
        return {"status": status, "reasons": reasons, "instance": snapshot["instance"]}

    def _daemon_reasons(self, snapshot: dict[str, Any]) -> list[dict[str, Any]]:
        found = []
        now = time.monotonic()
        if snapshot["database"]["reachable"]:
            self._unreachable_since = None
        else:
            if self._unreachable_since is None:
                self._unreachable_since = now
            away = now - self._unreachable_since
            long = away >= self.thresholds.outage_seconds
            found.append(
                reason(
                    "failing" if long else "degraded",
                    "database_unreachable",
                    f"the database does not answer (for {away:.0f}s; reconnecting): "
                    f"{snapshot['database']['error']}",
                    seconds=round(away, 1),
                )
            )
        if not snapshot["listener"]["connected"]:
            found.append(
                reason(
                    "degraded",
                    "listener_down",
                    "the notification listener is not connected; projections only poll",
                )
            )
        for beat in self.heartbeats:
            stalled = beat.stalled_for(now)
            if stalled > self.thresholds.stall_timeout:
                found.append(
                    reason(
                        "failing",
                        "loop_stalled",
                        f"{beat.name} has made no progress for {stalled:.0f}s",
                        loop=beat.name,
                        seconds=round(stalled, 1),
                    )
                )
        if snapshot["stopping"]:
            found.append(reason("degraded", "stopping", "the daemon is draining to stop"))
        return found

    def _queue_reasons(self, snapshot: dict[str, Any]) -> list[dict[str, Any]]:
        """The server's notification queue fills up when a session LISTENs and does not read
        (a client that vanished without closing, an open transaction): at 100 % every NOTIFY,
        and with it every append that notifies, fails."""
        usage = snapshot["database"].get("notification_queue_usage")
        limit = self.thresholds.notify_queue_usage
        if usage is None or usage <= limit:
            return []
        return [
            reason(
                "degraded",
                "notify_queue_filling",
                f"the server's notification queue is {usage:.2%} full (threshold {limit:.2%}): "
                "a session LISTENs without reading; see pg_stat_activity for a LISTEN session "
                "idle in transaction or of a client that is gone",
                usage=usage,
            )
        ]

    def _projection_reasons(self, p: dict[str, Any]) -> list[dict[str, Any]]:
        name, state, error = p["name"], p["state"], p["last_error"] or {}
        at = (
            f" at event {error['event_id']} ({error['event_type']}, position "
            f"{error.get('global_position')})"
            if error.get("event_id")
            else ""
        )
        if state == "failed":
            return [
                reason(
                    "failing",
                    "projection_failing",
                    f"projection {name} stopped{at}: {error.get('message')} (after "
                    f"{error.get('attempts')} attempts; `projectord resume {name}` retries, "
                    f"`projectord skip {name}` moves the event to the dead letters)",
                    projection=name,
                    error=error,
                )
            ]
        if state == "refused":
            return [
                reason(
                    "failing",
                    "projection_refused",
                    f"projection {name} does not run: {error.get('message')}",
                    projection=name,
                    error=error,
                )
            ]
        if state == "retrying":
            return [
                reason(
                    "degraded",
                    "projection_retrying",
                    f"projection {name} retries{at}: {error.get('message')} "
                    f"(attempt {error.get('attempts')})",
                    projection=name,
                    error=error,
                )
            ]
        if state == "degraded":
            return [
                reason(
                    "degraded",
                    "projection_degraded",
                    f"projection {name} cannot reach the database: {error.get('message')}",
                    projection=name,
                )
            ]
        if state == "paused":
            return [
                reason(
                    "degraded", "projection_paused", f"projection {name} is paused", projection=name
                )
            ]
        if state == "rebuilding":
            progress = p["rebuild"] or {}
            return [
                reason(
                    "degraded",
                    "projection_rebuilding",
                    f"projection {name} is rebuilding ({progress.get('applied')}/"
                    f"{progress.get('total')})",
                    projection=name,
                )
            ]
        return self._lag_reasons(p)

    def _lag_reasons(self, p: dict[str, Any]) -> list[dict[str, Any]]:
        lag, seconds = p["lag"], p["lag_seconds"]
        t = self.thresholds
        if (lag is not None and lag > t.max_lag) or (
            seconds is not None and seconds > t.max_lag_seconds
        ):
            return [
                reason(
                    "degraded",
                    "projection_lagging",
                    f"projection {p['name']} is {lag} events / {seconds:.0f}s behind "
                    f"(thresholds {t.max_lag} / {t.max_lag_seconds:g}s)",
                    projection=p["name"],
                    lag=lag,
                    lag_seconds=seconds,
                )
            ]
        return []

    async def _horizon_reasons(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        held = [
            (runner.name, now - runner.status.held_back_since)
            for runner in self.reporter.runners.values()
            if runner.status.held_back_since is not None
            and now - runner.status.held_back_since > self.thresholds.horizon_seconds
        ]
        if not held:
            return []
        seconds = max(s for _, s in held)
        names = sorted(name for name, _ in held)
        try:
            holder = await self._horizon_holder()
        except Exception as exc:  # the reason still stands without its name
            holder = {"kind": "unknown", "error": str(exc)}
        if holder is None or holder["kind"] == "unknown":
            who = "an open transaction (not visible to this role: grant it pg_read_all_stats)"
        elif holder["kind"] == "prepared":
            who = f"prepared transaction xid {holder['xid']} ({holder['query']})"
        else:
            query = " ".join((holder["query"] or "").split())[:120]
            who = (
                f"pid {holder['pid']} (xid {holder['xid']}, {holder['state']}, "
                f"user {holder['usename']}, since {holder['xact_start']}): {query}"
            )
        return [
            reason(
                "degraded",
                "horizon_held",
                f"{who} has held {', '.join(names)} back for {seconds:.0f}s: "
                "events committed after it started wait until it ends",
                projections=names,
                seconds=round(seconds, 1),
                holder=holder,
            )
        ]

    async def _horizon_holder(self) -> dict[str, Any] | None:
        reporter = self.reporter
        async with reporter.db_limiter:
            with anyio.fail_after(DB_TIMEOUT):
                async with reporter.pool.connection(timeout=DB_TIMEOUT) as conn:
                    cur = await conn.execute(reporter.queries["horizon_holder"])
                    row = await cur.fetchone()
                    columns = [c.name for c in cur.description or ()]
        return dict(zip(columns, row, strict=True)) if row else None
