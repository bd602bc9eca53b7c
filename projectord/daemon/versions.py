"""Which units of work this daemon's code may own, by projection *and* version (docs/evolution.md).

Each projection is two units of ownership, each with its own advisory lock
(projectord/daemon/ownership.py):

- `NAME`, its live runner: eligible only while the version serving reads is this code's version
  (or no version is recorded yet). Code of an older version never takes it: that projection is
  *superseded* here (status and health say by which version) and its runner never runs, so it
  never writes the newer tables; the compare-and-set, which checks the version, refuses it anyway.
  Code of a newer version never takes it either: it would apply new code to old tables.
- `NAME#vN` (N: this code's version), the build of version N: eligible while N is newer than the
  serving version, or older with a rollback to it asked (`projectord rollback`), or the serving
  version itself with a rebuild of it asked (a versioned `drift repair`, or a rollback to the
  tables that repair replaced): then the daemon may own both units, and the live runner goes on
  applying to the live tables while the build fills new ones.

So in a rolling deploy, old-code daemons keep applying live events to the old version while
new-code daemons build the new one, and the two never contend for one checkpoint. With a single
daemon of the new code, the old version is frozen (stale but consistent) until the swap.

The retention sweep drops kept versions older than `version_retention`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import anyio
import psycopg
from psycopg import sql

from projectord.database import connect, describe_error
from projectord.logs import get_logger
from projectord.projection import Projection
from projectord.queries import Queries
from projectord.runner.checkpoint_store import CheckpointStore
from projectord.runner.version_store import (
    BUILDING,
    VersionRow,
    VersionStore,
    version_row_name,
)

log = get_logger("projectord.daemon.versions")

SWEEP_INTERVAL = 60.0  # seconds between two looks for kept versions past their retention


class VersionPlan:
    """What the database says about each projection's versions, read on every ownership turn,
    and which units this daemon's code may therefore own."""

    def __init__(self, projections: Sequence[Projection], queries: Queries) -> None:
        self.code = {p.name: p.version for p in projections}
        self.queries = queries
        self.checkpoints = CheckpointStore(queries)
        self.versions = VersionStore(queries)
        self.serving: dict[str, int] = {}  # as last read
        self.rows: dict[str, list[VersionRow]] = {}  # building and kept versions, as last read

    def build_name(self, name: str) -> str:
        return version_row_name(name, self.code[name])

    def units(self) -> dict[str, int]:
        """Every unit this daemon may ever own → the version its positions row is created as."""
        found: dict[str, int] = {}
        for name, version in self.code.items():
            found[name] = version
            found[self.build_name(name)] = version
        return found

    def builds(self) -> set[str]:
        return {self.build_name(name) for name in self.code}

    async def eligible(self, conn: psycopg.AsyncConnection[Any]) -> set[str]:
        """The units this daemon may own now (one round trip for the versions, one for the
        building and kept ones)."""
        self.serving = await self.checkpoints.serving_versions(conn, list(self.code))
        rows: dict[str, list[VersionRow]] = {}
        for row in await self.versions.rows(conn, list(self.code)):
            rows.setdefault(row.name, []).append(row)
        self.rows = rows
        return eligible_units(self.code, self.serving, rows)

    def superseded(self, name: str) -> int | None:
        """The serving version, when it is newer than this code's; else None."""
        serving = self.serving.get(name)
        if serving is not None and serving > self.code[name]:
            return serving
        return None

    def report(self, name: str) -> dict[str, Any]:
        """The versions of a projection, for status."""
        rows = self.rows.get(name, [])
        return {
            "version": self.code[name],
            "serving_version": self.serving.get(name),
            "building_versions": [r.version for r in rows if r.role == BUILDING],
            "kept_versions": [r.report() for r in rows if r.role != BUILDING],
        }


def eligible_units(
    code: dict[str, int], serving: dict[str, int], rows: dict[str, list[VersionRow]]
) -> set[str]:
    """The units code of these versions may own: the live one while its version serves (or none
    is recorded), the build of its version while that is newer than the serving one, or while
    its row says `building` (a rollback to an older version, or a rebuild of the serving one)."""
    units: set[str] = set()
    for name, version in code.items():
        current = serving.get(name)
        if current is None or current == version:
            units.add(name)
        asked = any(r.version == version and r.role == BUILDING for r in rows.get(name, []))
        if current is not None and (current < version or asked):
            units.add(version_row_name(name, version))
    return units


async def sweep_kept_versions(dsn: str, queries: Queries, retention: Callable[[], float]) -> None:
    """Every SWEEP_INTERVAL, drop the kept versions older than `retention` seconds: their tables,
    their positions row and their record, in one transaction each; a daemon that finds one taken
    by another skips it."""
    store = VersionStore(queries)
    while True:
        try:
            conn = await connect(dsn, autocommit=True, connect_timeout=10)
            async with conn:
                await _sweep_once(conn, store, retention())
        except (psycopg.Error, OSError) as exc:
            log.warning("version.sweep_failed", error=describe_error(exc, dsn))
        await anyio.sleep(SWEEP_INTERVAL)


async def _sweep_once(
    conn: psycopg.AsyncConnection[Any], store: VersionStore, retention: float
) -> None:
    """Drop the expired kept versions one transaction each: one whose drop fails (its schema
    given to another role, say) is logged and left for the next sweep, and holds no other back."""
    checkpoints = CheckpointStore(store.queries)
    failed: set[tuple[str, int]] = set()
    while True:
        taken: tuple[str, int] | None = None
        try:
            async with conn.transaction():
                expired = await store.expired(conn, retention)
                left = [row for row in expired if (row[0], row[1]) not in failed]
                if not left:
                    return
                name, version, schema = left[0]
                taken = (name, version)
                await drop_version(conn, store, checkpoints, name, version, schema)
            log.info("version.expired", projection=name, version=version)
        except psycopg.Error as exc:
            if taken is None or conn.closed:
                raise
            failed.add(taken)
            log.warning(
                "version.drop_failed", projection=taken[0], version=taken[1], error=str(exc)
            )


async def drop_version(
    conn: psycopg.AsyncConnection[Any],
    store: VersionStore,
    checkpoints: CheckpointStore,
    name: str,
    version: int,
    schema: str,
) -> None:
    """A kept version's tables, checkpoint and record, gone (in the caller's transaction)."""
    await conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
    await checkpoints.delete(conn, version_row_name(name, version))
    await conn.execute(  # the dead letters its tables kept (VersionBuild._move_dead_letters)
        store.queries["delete_shadow_dead_letters"], {"shadow": version_row_name(name, version)}
    )
    await store.forget(conn, name, version)


async def move_kept_tables(conn: psycopg.AsyncConnection[Any], kept: str, target: str) -> None:
    """A kept copy's tables into `target`, the schema a build of their version fills: a rollback
    to the tables a versioned drift repair replaced catches them up there (in the caller's
    transaction). What a finished build left in `target` is gone already; dropped to be sure."""
    await conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(target)))
    await conn.execute(
        sql.SQL("ALTER SCHEMA {} RENAME TO {}").format(sql.Identifier(kept), sql.Identifier(target))
    )
