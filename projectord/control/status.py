"""What `projectord status` reports: per projection, where it is and how far behind.

The in-memory view of each runner (state, rate, last error, rebuild progress) is joined with what
only the database knows: the lag, counted as committed events of the projection's types beyond its
stored checkpoint, and the age of the oldest of them. The lag is counted, not estimated from
positions, so a frozen daemon cannot look caught up (Marten #4982). When the database does not
answer, the report still comes back, with the lag unknown and the error said.

With several daemons on one database, each reports every configured projection: the owner comes
from the positions row, `local` marks the ones this daemon runs, and for the others the state,
count and last error are what the positions row says (their owner has the live details).

Each projection also reports its versions (docs/evolution.md): the version of this daemon's code,
the version serving reads, the build of a newer version (its state, count, lag, owner) and the
versions kept for a rollback. A projection whose serving version is newer than this code is
`superseded` here.
"""

from __future__ import annotations

import time
from collections.abc import Container, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import anyio
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from projectord.checkpoint import START
from projectord.daemon.listener import NotificationListener
from projectord.daemon.ownership import default_instance_name
from projectord.database import describe_error
from projectord.queries import Queries
from projectord.runner.checkpoint_store import CheckpointStore
from projectord.runner.loop import ProjectionRunner, superseded_error

if TYPE_CHECKING:
    from projectord.daemon.versions import VersionPlan

DB_TIMEOUT = 5.0  # seconds a status or health request waits for the database


class StatusReporter:
    def __init__(
        self,
        runners: Sequence[ProjectionRunner],
        pool: AsyncConnectionPool,
        queries: Queries,
        listener: NotificationListener,
        *,
        dsn: str | None = None,
        instance: str | None = None,
        local: Container[str] | None = None,
        plan: VersionPlan | None = None,
        builds: Sequence[ProjectionRunner] = (),
    ) -> None:
        self.runners = {runner.name: runner for runner in runners}
        self.plan = plan  # None: versions are not reported (a one-off reporter)
        # The build of each projection's version in this code, by projection name.
        self.builds = {b.name.rpartition("#v")[0]: b for b in builds}
        self.pool = pool
        self.queries = queries
        self.checkpoints = CheckpointStore(queries)
        self.listener = listener
        self.dsn = dsn
        self.instance = instance or default_instance_name()
        self.local = local  # names of the projections run here; None: all of them
        self.started_at = time.time()
        self.stopping = False
        # Operator requests share two connections at most: the runners keep theirs.
        self.db_limiter = anyio.CapacityLimiter(2)

    async def snapshot(self, names: Sequence[str] | None = None) -> dict[str, Any]:
        chosen = [self.runners[n] for n in names] if names else list(self.runners.values())
        database: dict[str, Any] = {
            "reachable": True,
            "error": None,
            "notification_queue_usage": None,
        }
        rows: dict[str, dict[str, Any]] = {}
        try:
            rows, database["notification_queue_usage"] = await self._read_database(chosen)
        except (TimeoutError, PoolTimeout):
            database = {"reachable": False, "error": f"no connection within {DB_TIMEOUT:g}s"}
        except Exception as exc:
            database = {"reachable": False, "error": describe_error(exc, self.dsn)}
        return {
            "instance": self.instance,
            "started_at": _iso(self.started_at),
            "stopping": self.stopping,
            "database": database,
            "listener": {
                "connected": self.listener.connected,
                "reconnects": self.listener.reconnects,
            },
            "projections": [
                {**self._report(runner, rows.get(runner.name)), **self._versions(runner, rows)}
                for runner in chosen
            ],
        }

    async def _read_database(
        self, runners: Sequence[ProjectionRunner]
    ) -> tuple[dict[str, Any], float | None]:
        """Each projection's row and lag, and the notification queue's usage."""
        # The deadline covers the wait for the limiter too: requests queued behind one that
        # waits on a dead connection must answer as promptly as it does.
        with anyio.fail_after(DB_TIMEOUT):
            async with self.db_limiter, self.pool.connection(timeout=DB_TIMEOUT) as conn:
                found = await self._read_positions(conn)
                usage = await self._read_lags(conn, runners, found)
        return found, usage

    async def _read_positions(self, conn: AsyncConnection[Any]) -> dict[str, dict[str, Any]]:
        found: dict[str, dict[str, Any]] = {}
        for stored in await self.checkpoints.read_all(conn):
            # A projection's own row, and the rows of its versions being built or kept
            # (`NAME#vN`, by this daemon or by daemons of another version).
            if stored.name in self.runners or stored.name.rpartition("#v")[0] in self.runners:
                found[stored.name] = {
                    "checkpoint": stored.checkpoint,
                    "state": stored.state,
                    "applied_total": stored.applied_total,
                    "last_error": stored.last_error,
                    "updated_at": stored.updated_at,
                    "owner": stored.owner,
                    "version": stored.version,
                }
        return found

    async def _read_lags(
        self,
        conn: AsyncConnection[Any],
        runners: Sequence[ProjectionRunner],
        found: dict[str, dict[str, Any]],
    ) -> float | None:
        """Each projection's lag beyond its stored checkpoint, all in one round trip (pipeline
        mode): the monitor asks every few seconds, and in an idle daemon a round trip per
        projection was a wake-up each, which cost more of its CPU than anything else. Returns
        the notification queue's usage, asked in the same round trip."""
        asked = []
        async with conn.pipeline():
            usage = await conn.execute(self.queries["notification_queue_usage"])
            for runner in runners:
                found.setdefault(runner.name, {"checkpoint": START})
                versions = [n for n in found if n.rpartition("#v")[0] == runner.name]
                for name in [runner.name, *versions]:
                    row = found[name]
                    txid, position = row["checkpoint"]
                    params = {"txid": str(txid), "position": position, "types": runner.types}
                    lag = await conn.execute(self.queries["projection_lag"], params)
                    asked.append((row, lag))
        for row, cur in asked:
            lag = await cur.fetchone()
            assert lag is not None
            row["lag"], row["lag_seconds"] = int(lag[0]), lag[1]
        used = await usage.fetchone()
        return float(used[0]) if used else None

    def _report(self, runner: ProjectionRunner, row: dict[str, Any] | None) -> dict[str, Any]:
        row = row or {}
        lag, lag_seconds = row.get("lag"), row.get("lag_seconds")
        txid, position = row.get("checkpoint", runner.status.checkpoint)
        updated_at = row.get("updated_at")
        common = {
            "name": runner.name,
            "lag": lag,
            "lag_seconds": round(lag_seconds, 3) if lag_seconds is not None else None,
            "caught_up": lag == 0,
            "checkpoint": {"transaction_id": str(txid), "global_position": position},
            "updated_at": updated_at.isoformat() if updated_at else None,
        }
        if self.local is None or runner.name in self.local:
            return {**common, **self._local_report(runner, row)}
        return {
            **common,
            "state": row.get("state", "unknown"),
            "applied_total": row.get("applied_total"),
            "events_per_second": None,
            "held_back": None,
            "last_error": row.get("last_error"),
            "owner": row.get("owner"),
            "local": False,
            "rebuild": None,
        }

    def _versions(
        self, runner: ProjectionRunner, rows: dict[str, dict[str, Any]]
    ) -> dict[str, Any]:
        """The projection's versions; `superseded` overrides the state of a projection whose
        serving version is newer than this code (its runner never runs here)."""
        if self.plan is None:
            return {}
        name = runner.name
        found: dict[str, Any] = {"versions": self.plan.report(name)}
        row = rows.get(name) or {}
        serving = row.get("version") or self.plan.serving.get(name)
        found["versions"]["serving_version"] = serving
        if serving is not None and serving > runner.projection.version:
            found["state"] = "superseded"
            found["last_error"] = superseded_error(name, runner.projection.version, serving)
        found["versions"]["build"] = self._build(name, rows)
        return found

    def _build(self, name: str, rows: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
        """The build of a new version: this daemon's (its live details when it runs here), or
        one that daemons of another version run (what its positions row says)."""
        assert self.plan is not None
        build = self.builds.get(name)
        local = build is not None and build.name in self._local_names()
        building = self.plan.report(name)["building_versions"]  # a kept row is no build
        if build is not None and (
            local or (build.name in rows and build.projection.version in building)
        ):
            version, row = build.projection.version, rows.get(build.name) or {}
        else:
            others = [v for v in building if f"{name}#v{v}" in rows]
            if not others:
                return None
            version, row = others[-1], rows[f"{name}#v{others[-1]}"]
        lag = row.get("lag")
        status = build.status if local and build is not None else None
        return {
            "version": version,
            "state": status.state if status else row.get("state"),
            "applied_total": status.applied_total if status else row.get("applied_total"),
            "lag": lag,
            "caught_up": lag == 0,
            "owner": self.instance if local else row.get("owner"),
            "local": local,
            "last_error": status.last_error if status else row.get("last_error"),
        }

    def _local_names(self) -> Container[str]:
        return self.local if self.local is not None else {b.name for b in self.builds.values()}

    def _local_report(self, runner: ProjectionRunner, row: dict[str, Any]) -> dict[str, Any]:
        status = runner.status
        state = status.state
        if state == "starting" and row.get("state") in ("paused", "failed"):
            state = row["state"]
        rate = status.events_per_second()
        rebuild = status.rebuild.report(status.applied_total, rate) if status.rebuild else None
        return {
            "state": state,
            "applied_total": status.applied_total,
            "events_per_second": round(rate, 1),
            "held_back": status.held_back,
            "last_error": status.last_error,
            "owner": self.instance,
            "local": True,
            "rebuild": rebuild,
        }


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat()


def summary_line(snapshot: dict[str, Any]) -> str:
    """One line for systemd's STATUS= and the console: '3 projections, 0 failed, max lag 12'."""
    projections = snapshot["projections"]
    failed = sum(p["state"] in ("failed", "refused", "superseded", "retrying") for p in projections)
    paused = sum(p["state"] == "paused" for p in projections)
    lags = [p["lag"] for p in projections if p["lag"] is not None]
    parts = [f"{len(projections)} projections", f"{failed} failed"]
    if paused:
        parts.append(f"{paused} paused")
    if not snapshot["database"]["reachable"]:
        parts.append("database unreachable")
    else:
        parts.append(f"max lag {max(lags, default=0)}")
    return ", ".join(parts)
