"""`projectord health`: ok / degraded / failing, with the reasons an operator acts on.

failing: a projection stopped on a poison event (state `failed`), refusing a table another role
owns (state `refused`, projectord/schema/foreign_owner.py) or superseded by a newer version than
this daemon's code (`superseded`, docs/evolution.md), a new version's build that stopped, the
database has not answered for `health_outage_seconds`, or a loop of the daemon is wedged (it would
stop the systemd watchdog too). degraded: the database does not answer (yet: the daemon reconnects
by itself, so a restart or a failover is degraded, not failing), the listener is down (the runners
still poll), a projection retries after a handler error, is paused, rebuilding, building a new
version or lagging beyond the thresholds, or a transaction (in any database of the cluster) has
held the xmin horizon longer than `health_horizon_seconds` — then the reason names that transaction
(pid, xid, role, database, and where visible its state, age and query), because that is who the
operator must talk to — or another role may create in, or owns code in, the read-model schema or
projectord's (`schema_untrusted`, projectord/schema/schema_trust.py).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import anyio

from projectord.control.status import DB_TIMEOUT, StatusReporter
from projectord.daemon.heartbeat import Heartbeat
from projectord.schema.schema_trust import untrusted_schema_findings

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


def _build_reasons(p: dict[str, Any]) -> list[dict[str, Any]]:
    """A new version being built (docs/evolution.md): degraded while it catches up (with a
    single daemon the serving version is frozen meanwhile), failing once it stopped."""
    build = (p.get("versions") or {}).get("build")
    if not build:
        return []
    name, version = p["name"], build["version"]
    serving = p["versions"].get("serving_version")
    if build["state"] == "failed":
        error = build.get("last_error") or {}
        return [
            reason(
                "failing",
                "version_build_failed",
                f"projection {name}: the build of version {version} stopped: "
                f"{error.get('message')}",
                projection=name,
                version=version,
            )
        ]
    blocked = (build.get("last_error") or {}).get("message")
    return [
        reason(
            "degraded",
            "version_building",
            f"projection {name} is {'re' if version == serving else ''}building version"
            f" {version} ({build.get('applied_total')} applied, {build.get('lag')} to go) while"
            + (
                " its current tables serve reads"
                if version == serving
                else f" version {serving} serves reads"
            )
            + (f"; {blocked}" if blocked else ""),
            projection=name,
            version=version,
            serving_version=serving,
            lag=build.get("lag"),
        )
    ]


class HealthCheck:
    def __init__(
        self,
        reporter: StatusReporter,
        heartbeats: Sequence[Heartbeat],
        thresholds: Thresholds,
        schemas: Sequence[str] = (),
    ) -> None:
        self.reporter = reporter
        self.schemas = tuple(schemas)  # read-model schema and projectord's: who may create there
        self.heartbeats = heartbeats
        self.thresholds = thresholds
        self._unreachable_since: float | None = None  # monotonic; while the database is away
        # (xid, monotonic time first seen) of the transaction holding the horizon
        self._horizon_seen: tuple[str, float] | None = None

    async def check(self) -> dict[str, Any]:
        return await self.evaluate(await self.reporter.snapshot())

    async def evaluate(self, snapshot: dict[str, Any]) -> dict[str, Any]:
        reasons = self._daemon_reasons(snapshot)
        for projection in snapshot["projections"]:
            reasons += self._projection_reasons(projection)
        reasons += self._queue_reasons(snapshot)
        if snapshot["database"]["reachable"]:
            reasons += await self._horizon_reasons()
            reasons += await self._wakeup_reasons()
            reasons += await self._schema_reasons()
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
        return self._state_reasons(p) + _build_reasons(p)

    def _state_reasons(self, p: dict[str, Any]) -> list[dict[str, Any]]:
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
        if state == "superseded":
            return [
                reason(
                    "failing",
                    "projection_superseded",
                    f"projection {name}: {error.get('message')}",
                    projection=name,
                    version=error.get("version"),
                    serving_version=error.get("serving_version"),
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
        """`horizon_held` once a transaction has held the xmin horizon past the threshold.

        Asked of the database on every check, whether or not events wait behind it yet: any event
        committed after that transaction started will wait for it. (It used to be inferred from
        the runners, which see it only once an event committed behind it, and counted from then:
        idle, or with a threshold of 30 s, health said ok while every projection was held.)"""
        now = time.monotonic()
        waiting = {
            runner.name: now - runner.status.held_back_since
            for runner in self.reporter.runners.values()
            if runner.status.held_back_since is not None
        }
        try:
            holder = await self._horizon_holder(now)
        except Exception as exc:  # the runners' view still stands, without a name
            holder = {"kind": "unknown", "error": str(exc), "seconds": None}
        seconds = max([*waiting.values(), (holder or {}).get("seconds") or 0.0])
        if seconds <= self.thresholds.horizon_seconds:
            return []
        names = sorted(waiting)
        held = (
            f"has held {', '.join(names)} back for {seconds:.0f}s: events committed after it "
            "started wait until it ends"
            if names
            else f"has held the xmin horizon for {seconds:.0f}s: events committed after it "
            "started will wait until it ends"
        )
        return [
            reason(
                "degraded",
                "horizon_held",
                f"{_describe_holder(holder)} {held}",
                projections=names,
                seconds=round(seconds, 1),
                holder=holder,
            )
        ]

    async def _horizon_holder(self, now: float) -> dict[str, Any] | None:
        """The transaction holding the horizon, with `seconds`: its age where the database shows
        it, else (another role's session, without pg_read_all_stats) at least as long as this
        daemon has seen it hold the horizon, since `_horizon_seen`."""
        found = await self._rows("horizon_holder")
        if not found:
            self._horizon_seen = None
            return None
        holder = found[0]
        if self._horizon_seen is None or self._horizon_seen[0] != holder["xid"]:
            self._horizon_seen = (holder["xid"], now)
        holder["seconds"] = max(holder["seconds"] or 0.0, now - self._horizon_seen[1])
        return holder

    async def _wakeup_reasons(self) -> list[dict[str, Any]]:
        """`wakeups_obstructed` while sessions of another role hold the wake-up stripes on
        purpose. The stripes' key cannot be secret (the trigger's source and the held stripes
        are readable by every role), so a stranger can take them: held exclusively, arming times
        out and the runners poll (events arrive within about 250 ms); held in share mode, every
        append notifies (the writers' throughput halves). Nothing is lost either way, but the
        operator should know who does it (docs/security-locks.md)."""
        try:
            channel = self.reporter.listener.channel
            found = await self._rows("wakeup_strangers", {"channel": channel})
        except Exception:  # a failed check is the database's problem, reported elsewhere
            return []
        return [
            reason(
                "degraded",
                "wakeups_obstructed",
                f"pid {s['pid']} (user {s['usename']}, database {s['datname']}, application "
                f"{s['application_name']!r}) holds {s['exclusive'] + s['shared']} of the wake-up "
                "locks: "
                + (
                    "arming fails, projections poll (up to about 250 ms behind)"
                    if s["exclusive"]
                    else "every append notifies, which slows the writers"
                ),
                session=s,
            )
            for s in found
        ]

    async def _schema_reasons(self) -> list[dict[str, Any]]:
        """`schema_untrusted` while a role other than the owner (PUBLIC included) may create in
        the read-model schema or projectord's, or owns functions, operators or types there:
        names projectord or a handler resolves could run that role's code as projectord."""
        if not self.schemas:
            return []
        reporter = self.reporter
        try:
            async with reporter.db_limiter:
                with anyio.fail_after(DB_TIMEOUT):
                    async with reporter.pool.connection(timeout=DB_TIMEOUT) as conn:
                        found = await untrusted_schema_findings(
                            conn, reporter.queries, self.schemas
                        )
        except Exception:  # a failed check is the database's problem, reported elsewhere
            return []
        return [
            reason("degraded", "schema_untrusted", f"{item.describe()}: its code would run as"
                   " projectord (docs/security-read-models.md)")
            for item in found
        ]  # fmt: skip

    async def _rows(self, query: str, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """A named query on a pooled connection, bounded like the status reads."""
        reporter = self.reporter
        async with reporter.db_limiter:
            with anyio.fail_after(DB_TIMEOUT):
                async with reporter.pool.connection(timeout=DB_TIMEOUT) as conn:
                    cur = await conn.execute(reporter.queries[query], params)
                    rows = await cur.fetchall()
                    columns = [c.name for c in cur.description or ()]
        return [dict(zip(columns, row, strict=True)) for row in rows]


def _describe_holder(holder: dict[str, Any] | None) -> str:
    """Who holds the horizon, in the words an operator needs to find them."""
    if holder is None or holder["kind"] == "unknown":
        return "an open transaction (not found: the check failed)"
    if holder["kind"] == "prepared":
        return f"prepared transaction xid {holder['xid']} ({holder['query']})"
    who = (
        f"pid {holder['pid']} (xid {holder['xid']}, user {holder['usename']}, "
        f"database {holder['datname']}, application {holder['application_name']!r}"
    )
    if not holder["visible"]:
        return (
            f"{who}; its state and query are not visible to this role: grant it pg_read_all_stats)"
        )
    query = " ".join((holder["query"] or "").split())[:120]
    return f"{who}, {holder['state']}, since {holder['xact_start']}): {query}"
