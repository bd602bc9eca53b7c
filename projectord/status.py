"""What `projectord status` reports: per projection, where it is and how far behind.

The in-memory view of each runner (state, rate, last error, rebuild progress) is joined with what
only the database knows: the lag, counted as committed events of the projection's types beyond its
stored checkpoint, and the age of the oldest of them. The lag is counted, not estimated from
positions, so a frozen daemon cannot look caught up (Marten #4982). When the database does not
answer, the report still comes back, with the lag unknown and the error said.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import anyio
from psycopg_pool import AsyncConnectionPool

from projectord.database import describe_error
from projectord.listener import NotificationListener
from projectord.queries import Queries
from projectord.runner import ProjectionRunner

DB_TIMEOUT = 5.0  # seconds a status or health request waits for the database


def instance_id() -> str:
    """Names this daemon process in status output and logs: host and pid."""
    return f"{socket.gethostname()}:{os.getpid()}"


class StatusReporter:
    def __init__(
        self,
        runners: Sequence[ProjectionRunner],
        pool: AsyncConnectionPool,
        queries: Queries,
        listener: NotificationListener,
        *,
        dsn: str | None = None,
    ) -> None:
        self.runners = {runner.name: runner for runner in runners}
        self.pool = pool
        self.queries = queries
        self.listener = listener
        self.dsn = dsn
        self.instance = instance_id()
        self.started_at = time.time()
        self.stopping = False
        # Operator requests share two connections at most: the runners keep theirs.
        self.db_limiter = anyio.CapacityLimiter(2)

    async def snapshot(self, names: Sequence[str] | None = None) -> dict[str, Any]:
        chosen = [self.runners[n] for n in names] if names else list(self.runners.values())
        database: dict[str, Any] = {"reachable": True, "error": None}
        rows: dict[str, dict[str, Any]] = {}
        try:
            rows = await self._read_database(chosen)
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
            "projections": [self._report(runner, rows.get(runner.name)) for runner in chosen],
        }

    async def _read_database(self, runners: Sequence[ProjectionRunner]) -> dict[str, Any]:
        found: dict[str, dict[str, Any]] = {}
        async with self.db_limiter:
            with anyio.fail_after(DB_TIMEOUT):
                async with self.pool.connection(timeout=DB_TIMEOUT) as conn:
                    cur = await conn.execute(self.queries["read_positions"])
                    for name, txid, position, state, _, _, updated_at in await cur.fetchall():
                        if name in self.runners:
                            found[name] = {
                                "checkpoint": (int(txid), int(position)),
                                "state": state,
                                "updated_at": updated_at,
                            }
                    for runner in runners:
                        row = found.setdefault(runner.name, {"checkpoint": (0, 0)})
                        txid, position = row["checkpoint"]
                        cur = await conn.execute(
                            self.queries["projection_lag"],
                            {"txid": str(txid), "position": position, "types": runner.types},
                        )
                        lag = await cur.fetchone()
                        assert lag is not None
                        row["lag"], row["lag_seconds"] = int(lag[0]), lag[1]
        return found

    def _report(self, runner: ProjectionRunner, row: dict[str, Any] | None) -> dict[str, Any]:
        status = runner.status
        lag = row.get("lag") if row else None
        lag_seconds = row.get("lag_seconds") if row else None
        state = status.state
        if state == "starting" and row and row.get("state") == "paused":
            state = "paused"
        rate = status.events_per_second()
        txid, position = row["checkpoint"] if row else status.checkpoint
        updated_at = row.get("updated_at") if row else None
        rebuild = status.rebuild.report(status.applied_total, rate) if status.rebuild else None
        return {
            "name": runner.name,
            "state": state,
            "lag": lag,
            "lag_seconds": round(lag_seconds, 3) if lag_seconds is not None else None,
            "caught_up": lag == 0,
            "applied_total": status.applied_total,
            "events_per_second": round(rate, 1),
            "checkpoint": {"transaction_id": str(txid), "global_position": position},
            "held_back": status.held_back,
            "last_error": status.last_error,
            "owner": self.instance,
            "updated_at": updated_at.isoformat() if updated_at else None,
            "rebuild": rebuild,
        }


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat()


def summary_line(snapshot: dict[str, Any]) -> str:
    """One line for systemd's STATUS= and the console: '3 projections, 0 failed, max lag 12'."""
    projections = snapshot["projections"]
    failed = sum(p["state"] == "retrying" for p in projections)
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
