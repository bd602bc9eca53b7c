"""Drift that `drift repair` cannot remove in place takes the path of a version bump.

A type without a safe cast, a primary-key change, a missing table the projection has applied
events to: the tables must be refilled from the events. The repair records that as a **rebuild of
the serving version** N (docs/evolution.md): a row `(NAME, N, building)` in projection_versions,
whose tables are `version_schema(N)`, exactly as a version bump records the build of a new
version. From there the machinery is the version build's (projectord/schema/versioned_build.py):
the unit `NAME#vN` is owned like any build (an advisory lock), fills fresh tables as declared from
the first event under its checkpoint row `NAME#vN`, resumes from it after a crash, shows in
status, health and metrics, and swaps in atomically once caught up. Meanwhile the live tables
serve reads and, the code being the same version, go on being applied. The swap exchanges the two
checkpoints, and the replaced tables are kept as version N (in `replaced_schema(N)`) with the
retention of any kept version: `versions list` shows them, `rollback NAME` brings them back
(caught up), `versions drop NAME N` drops them. A version keeps one copy: a second such repair
drops the copy the first one kept, so a repair records its rebuild only if, looked at again under
the version row's lock, the tables still need one (two repairs at once rebuild once).

Who builds: a running daemon of the projection, which sees the row on its next ownership turn;
`drift repair --apply` waits for its swap, and fails if the rebuild was given up instead (a newer
version swapped in). With no daemon running (a repair before the first start, a CI job), the
repair builds it itself, under the same lock and checkpoint, so a daemon started meanwhile does
not contend and one started after a crash of the repair goes on from its checkpoint.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import anyio
from psycopg import AsyncConnection, sql

from projectord.config import Settings
from projectord.daemon.ownership import INSTANCE, PROJECTION, default_instance_name, take_keyed_lock
from projectord.daemon.versions import drop_version
from projectord.database import connect, make_pool
from projectord.logs import get_logger
from projectord.projection import Projection
from projectord.queries import Queries
from projectord.runner.checkpoint_store import CheckpointStore
from projectord.runner.version_store import (
    BUILDING,
    VersionStore,
    version_row_name,
    version_schema,
)
from projectord.schema.build_schema import build_schema_refusal
from projectord.schema.drift import inspect
from projectord.schema.drift_items import Repair
from projectord.schema.online_rebuild import RebuildError, check_serving_version
from projectord.schema.versioned_build import VersionBuild

log = get_logger("projectord.schema.versioned_repair")

POLL = 0.2  # seconds between two looks at a rebuild a daemon runs


async def request_rebuild(
    conn: AsyncConnection[Any], settings: Settings, projection: Projection
) -> bool:
    """Record the rebuild of the serving version of `projection` (autocommit `conn`, one
    transaction). Asked again while it runs, nothing changes. False when, looked at again under
    the lock, its tables need no rebuild any more: the drift the repair inspected earlier is
    gone (another repair rebuilt them meanwhile), and the copy that one kept must stay."""
    queries = Queries(settings.schema)
    versions, checkpoints = VersionStore(queries), CheckpointStore(queries)
    name, version = projection.name, projection.version
    unit = version_row_name(name, version)
    async with conn.transaction():
        await _lock_live_tables(conn, queries, settings.read_model_schema, projection)
        row = await versions.lock(conn, name, version)
        await checkpoints.ensure(conn, name, version)  # never run yet: this version serves
        await check_serving_version(conn, checkpoints, projection)
        if row is not None and row[0] == BUILDING:
            return True
        if not await _needs_rebuild(conn, settings, projection):
            log.info("drift.rebuild_not_needed", projection=name, version=version)
            return False
        if row is not None:  # the copy an earlier rebuild of this version kept
            await drop_version(conn, versions, checkpoints, name, version, row[1])
        schema = version_schema(settings.read_model_schema, name, version)
        await conn.execute(
            sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema))
        )
        await checkpoints.delete(conn, unit)
        await versions.start_building(conn, name, version, schema)
    log.info("drift.rebuild_requested", projection=name, version=version, tables_schema=schema)
    return True


async def _lock_live_tables(
    conn: AsyncConnection[Any], queries: Queries, schema: str, projection: Projection
) -> None:
    """ACCESS SHARE on the live tables that exist, before the version row: a swap takes its
    table locks before that row, so the look at their contents under the row's lock cannot
    deadlock with one (the swap waits, and retries, until this transaction ends)."""
    cur = await conn.execute(
        queries["table_owners"], {"schema": schema, "tables": list(projection.tables)}
    )
    tables = [sql.Identifier(schema, str(table)) for table, _ in await cur.fetchall()]
    if tables:
        await conn.execute(
            sql.SQL("LOCK TABLE {} IN ACCESS SHARE MODE").format(sql.SQL(", ").join(tables))
        )


async def _needs_rebuild(
    conn: AsyncConnection[Any], settings: Settings, projection: Projection
) -> bool:
    """The live tables still drift in a way only a rebuild repairs (looked at now, in the
    caller's transaction, under its locks: another repair may have rebuilt them since the
    caller's inspection, and a second rebuild would drop the copy that one kept)."""
    inspection = await inspect(conn, settings, [projection])
    return any(item.repair is Repair.REBUILD for item in inspection.items)


async def complete_rebuilds(
    dsn: str, settings: Settings, projections: Sequence[Projection], *, timeout: float
) -> None:
    """Return once every requested rebuild has swapped in: built here when no daemon runs,
    else waited for. RebuildError when one stopped, or has not swapped in by `timeout`."""
    queries = Queries(settings.schema)
    conn = await connect(dsn, autocommit=True, connect_timeout=10)
    async with conn:
        daemons = await _live_daemons(conn, queries)
        for projection in projections:
            if daemons or not await _take_unit(conn, queries, projection):
                await _wait_for_swap(conn, queries, projection, timeout)
            else:
                await _build_here(dsn, settings, queries, projection, conn)
            await _check_swapped_in(conn, queries, projection)


async def _live_daemons(conn: AsyncConnection[Any], queries: Queries) -> int:
    """Daemons of this installation running now: the holders of the shared instance lock."""
    cur = await conn.execute(queries["lock_keys"], {"purposes": [INSTANCE]})
    row = await cur.fetchone()
    if row is None:
        return 0
    cur = await conn.execute(queries["count_instances"], {"key": int(row[2])})
    counted = await cur.fetchone()
    return int(counted[0]) if counted else 0


async def _take_unit(conn: AsyncConnection[Any], queries: Queries, projection: Projection) -> bool:
    """The build unit's ownership lock, held by this session (`conn`) until it ends; False when
    someone holds it (a daemon that started meanwhile: it builds, the repair waits)."""
    unit = version_row_name(projection.name, projection.version)
    await conn.execute(queries["ensure_lock_keys"], {"purpose": PROJECTION, "names": [unit]})
    cur = await conn.execute(queries["lock_keys"], {"purposes": [PROJECTION]})
    key = next(int(k) for _, name, k in await cur.fetchall() if name == unit)
    return await take_keyed_lock(conn, queries, PROJECTION, unit, key) is not None


async def _build_here(
    dsn: str,
    settings: Settings,
    queries: Queries,
    projection: Projection,
    control: AsyncConnection[Any],
) -> None:
    """Run the build in this process, as a daemon would, until it has swapped in. A role that
    may not make the build's schema (no CREATE on the database, or another role made one of
    that name) is told what to run at once: the build would retry it for ever (a daemon's build
    waits for it); the rebuild stays recorded for a daemon."""
    owner = f"drift-repair@{default_instance_name()}"
    unit = version_row_name(projection.name, projection.version)
    schema = version_schema(settings.read_model_schema, projection.name, projection.version)
    if why := await build_schema_refusal(control, queries, schema):
        raise RebuildError(f"the rebuild of {projection.name!r} did not start: {why}")
    conn = await connect(dsn, autocommit=True, connect_timeout=10)
    async with conn:
        await CheckpointStore(queries).record_owner(conn, unit, owner, projection.version)
    pool = make_pool(
        dsn, max_size=2, read_model_schema=settings.read_model_schema, name="projectord-rebuild"
    )
    async with pool:
        build = VersionBuild(
            projection, pool, queries, dsn=dsn, settings=settings, owner=owner, once=True
        )
        done = anyio.Event()
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(_run, build, done)
            while not done.is_set() and not build.failed:
                with anyio.move_on_after(POLL):
                    await done.wait()
            build.request_stop()  # stopped (it waits to be), or finished already
    if build.failed:  # raised outside the task group, which would wrap it
        raise RebuildError(_stopped(projection, build.status.last_error))


async def _run(build: VersionBuild, done: anyio.Event) -> None:
    try:
        await build.run()
    finally:
        done.set()


async def _wait_for_swap(
    conn: AsyncConnection[Any], queries: Queries, projection: Projection, timeout: float
) -> None:
    """Poll until the rebuild's row is no longer `building` (swapped in, its replaced tables
    kept under that row), or its build stopped (its checkpoint row `failed`)."""
    name, version = projection.name, projection.version
    versions, checkpoints = VersionStore(queries), CheckpointStore(queries)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = await versions.rows(conn, [name])
        if not any(r.version == version and r.role == BUILDING for r in rows):
            return
        stored = await checkpoints.read(conn, version_row_name(name, version))
        if stored is not None and stored.state == "failed":
            raise RebuildError(_stopped(projection, stored.last_error))
        await anyio.sleep(POLL)
    raise RebuildError(
        f"the versioned rebuild of {name!r} has not swapped in after {timeout:g}s; it goes on"
        " in the daemon: `projectord status` shows its progress"
    )


async def _check_swapped_in(
    conn: AsyncConnection[Any], queries: Queries, projection: Projection
) -> None:
    """RebuildError unless the rebuild's row is gone from `building` *because it swapped in*.
    A rebuild of version N swaps in as N: N still serves. A rebuild given up (a newer version
    swapped in meanwhile: docs/evolution.md) also leaves `building`, with another version
    serving and N's old tables kept; that is no repair."""
    name, version = projection.name, projection.version
    rows = await VersionStore(queries).rows(conn, [name])
    if any(r.version == version and r.role == BUILDING for r in rows):
        raise RebuildError(f"the versioned rebuild of {name!r} has not swapped in; it goes on")
    serving = (await CheckpointStore(queries).serving_versions(conn, [name])).get(name)
    if serving != version:
        raise RebuildError(
            f"the versioned rebuild of {name!r} was given up, nothing swapped in: version"
            f" {serving} serves now, version {version}'s tables (drift included) are kept"
            f" (`projectord versions list`)"
        )


def _stopped(projection: Projection, error: dict[str, Any] | None) -> str:
    message = (error or {}).get("message") or "no reason recorded"
    return (
        f"the versioned rebuild of {projection.name!r} stopped, its live tables untouched:"
        f" {message}"
    )
