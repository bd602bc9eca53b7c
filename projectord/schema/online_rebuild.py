"""`projectord rebuild NAME --online`: rebuild a projection while its live tables serve reads.

1. **Shadow.** Fresh tables, as declared and with the row-level security `read_access` implies,
   are created in a shadow schema. A second `ProjectionRunner` (the same fetch-in-commit-order
   and apply-with-compare-and-set machinery as the daemon's) applies the projection from the first
   event into them, under its own checkpoint row. The live tables keep serving reads and the live
   runner keeps applying to them.
2. **Catch-up.** Wait until the shadow has applied every event of the projection's types
   committed so far.
3. **Swap**, in one transaction: lock the live tables against writes (EXCLUSIVE: reads go on),
   let the shadow apply the last events and stop it; then take ACCESS EXCLUSIVE locks (readers
   wait for a moment), carry the live tables' SELECT grants over, move the live tables out and
   the shadow tables in, drop the old ones, and move the live checkpoint to the shadow's.
   A reader sees the complete old tables until the commit and the complete new ones after it.

The shadow runs under the projection's own error policy, pipeline setting and the configured
defaults, like the live runner. Its handler's unqualified table names resolve to the shadow tables
through `search_path`; a schema-qualified name would escape into a live table, so every shadow batch
ends with a guard: the tables its transaction holds a write lock on (`tables_written()`,
sql/migrations/0013_tables_written.sql). A write outside the shadow schema rolls the batch back and
aborts the rebuild, naming the table: the live data is never touched by a shadow run.

The live runner's next compare-and-set then fails (its checkpoint moved under it), so it rolls its
batch back, reloads the checkpoint and continues from the shadow's position: no event is applied
twice, none is skipped. A rebuild that fails leaves the live tables untouched and drops the shadow.

Caveat (Postgres DDL is not MVCC-safe): a REPEATABLE READ transaction whose snapshot predates the
swap but which reads the table only after it sees the new table as of its snapshot. Readers in
READ COMMITTED (the default) always see one complete version.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import anyio
import psycopg
from psycopg import AsyncConnection, sql
from psycopg_pool import AsyncConnectionPool

from projectord.checkpoint import Checkpoint
from projectord.config import Settings
from projectord.daemon.ownership import take_keyed_lock
from projectord.database import connect, make_pool
from projectord.event_store import Event
from projectord.logs import get_logger
from projectord.projection import Projection
from projectord.queries import Queries
from projectord.runner.catch_up import latest_positions
from projectord.runner.checkpoint_store import CheckpointStore
from projectord.runner.error_policy import ErrorPolicy
from projectord.runner.loop import ProjectionRunner
from projectord.runner.version_store import BUILDING, VersionStore
from projectord.schema.build_schema import build_schema_exists, create_build_schema
from projectord.schema.migrations import create_projection_tables
from projectord.schema.security import existing_roles, secure_statements

log = get_logger("projectord.schema.online_rebuild")

SWAP_LOCK_TIMEOUT = "5s"  # per lock; a swap that cannot get its locks is retried
SWAP_ATTEMPTS = 5
FINAL_CATCH_UP_TIMEOUT = 30.0  # seconds the live writes may be held while the shadow finishes
POLL_INTERVAL = 0.05
PROGRESS_INTERVAL = 2.0
CARRIED_PRIVILEGES = frozenset({"SELECT"})  # from the live tables to the rebuilt ones


class RebuildError(Exception):
    """The online rebuild cannot go on; one line for an operator. The live tables are untouched."""


class _SwapNotReady(Exception):
    """The shadow did not catch up while the live writes were held: retry the swap."""


@dataclass(frozen=True)
class ShadowNames:
    schema: str  # where the fresh tables are built
    retired: str  # where the old tables go for the moment of the swap
    checkpoint: str  # the name of the shadow runner's checkpoint (its positions row)

    @classmethod
    def of(cls, read_model_schema: str, projection: str) -> ShadowNames:
        """Derived from the names, so a rebuild interrupted by a crash is cleaned up by the next
        one; hashed, because identifiers are limited to 63 bytes."""
        digest = hashlib.sha1(f"{read_model_schema}.{projection}".encode()).hexdigest()[:12]
        return cls(
            f"projectord_shadow_{digest}", f"projectord_retired_{digest}", f"{projection}#shadow"
        )


class ShadowGuard:
    """What the shadow's guard found: the first table outside the shadow schema a shadow batch
    wrote. Set once; the rebuild aborts when it sees it, whatever the error policy does with the
    failed batch meanwhile."""

    def __init__(self, projection: str, query: str, shadow_schema: str) -> None:
        self.projection = projection
        self.query = query
        self.shadow_schema = shadow_schema
        self.violation: str | None = None

    async def check(self, conn: AsyncConnection[Any]) -> None:
        """Raise (rolling the batch back) if this transaction wrote outside the shadow schema.
        Reading the answer syncs a pipelined batch: one round trip more per shadow batch."""
        cur = await conn.execute(self.query, {"shadow": self.shadow_schema})
        written = [name for (name,) in await cur.fetchall()]
        if written:
            if self.violation is None:
                self.violation = (
                    f"projection {self.projection!r} wrote {', '.join(written)} during its online"
                    " rebuild, outside its shadow tables (a schema-qualified or undeclared table);"
                    " rebuild aborted, live tables untouched: write the projection's declared"
                    " tables by unqualified name"
                )
            raise LiveTableWritten(self.violation)


class LiveTableWritten(Exception):
    """A shadow batch wrote a table outside the shadow schema; the batch is rolled back."""


def shadow_projection(
    live: Projection, names: ShadowNames, read_model_schema: str, guard: ShadowGuard
) -> Projection:
    """The live projection, writing into the shadow tables under its own checkpoint, with the
    live projection's own settings (pipeline, error policy).

    Its handler runs with the shadow schema first on the search_path, set for the batch
    transaction only, so the projection's unqualified table names resolve to the shadow tables;
    `guard` then checks that nothing else was written.
    """
    set_path = sql.SQL("SET LOCAL search_path TO {}, {}").format(
        sql.Identifier(names.schema), sql.Identifier(read_model_schema)
    )

    class Shadow(Projection):
        name = names.checkpoint
        event_types = tuple(live.event_types)
        tables = live.tables
        read_access = live.read_access
        pipeline = live.pipeline
        on_error = live.on_error
        max_attempts = live.max_attempts
        handler_timeout = live.handler_timeout
        version = live.version

        async def handle(self, events: Sequence[Event], conn: AsyncConnection[Any]) -> None:
            await conn.execute(set_path)
            await live.handle(events, conn)
            await guard.check(conn)

    return Shadow()


async def rebuild_online(dsn: str, settings: Settings, projection: Projection) -> dict[str, Any]:
    """Rebuild `projection` into shadow tables and swap them in; returns what was done."""
    if not projection.tables:
        raise RebuildError(f"projection {projection.name!r} has no tables to rebuild")
    rebuild = _OnlineRebuild(dsn, settings, projection)
    control = await connect(dsn, autocommit=True, connect_timeout=10)
    async with control:
        return await rebuild.run(control)


async def check_serving_version(
    conn: AsyncConnection[Any], checkpoints: CheckpointStore, projection: Projection
) -> None:
    """Only the code of the serving version may rebuild the live tables: newer code builds its
    own version beside them (docs/evolution.md), older code never touches them."""
    name, mine = projection.name, projection.version
    serving = (await checkpoints.serving_versions(conn, [name])).get(name)
    if serving is not None and serving != mine:
        raise RebuildError(
            f"version {serving} of {name!r} serves and this code is version {mine}: "
            + (
                f"a daemon running it builds version {mine} beside the live tables and swaps"
                " it in by itself (docs/evolution.md)"
                if mine > serving
                else "older code never touches newer tables (roll back with"
                f" `projectord rollback {name}`)"
            )
        )


class _OnlineRebuild:
    def __init__(self, dsn: str, settings: Settings, projection: Projection) -> None:
        self.dsn = dsn
        self.settings = settings
        self.projection = projection
        self.schema = settings.read_model_schema
        self.names = ShadowNames.of(self.schema, projection.name)
        self.queries = Queries(settings.schema)
        self.checkpoints = CheckpointStore(self.queries)
        self.tables = list(projection.tables)
        self.guard = ShadowGuard(
            projection.name, self.queries["tables_written_outside"], self.names.schema
        )
        self._log = log.bind(projection=projection.name)

    async def run(self, control: AsyncConnection[Any]) -> dict[str, Any]:
        started = time.monotonic()
        await self._take_lock(control)
        await self._check_version(control)
        self._log.info("rebuild.started", shadow_schema=self.names.schema)
        await self._build_shadow(control)
        try:
            pool = make_pool(
                self.dsn, max_size=2, read_model_schema=self.schema, name="projectord-rebuild"
            )
            async with pool:
                checkpoint, applied = await self._fill_and_swap(control, pool)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._discard_shadow(control)
            raise
        seconds = round(time.monotonic() - started, 3)
        self._log.info("rebuild.swapped", applied=applied, seconds=seconds)
        return {
            "projection": self.projection.name,
            "applied": applied,
            "checkpoint": list(checkpoint),
            "seconds": seconds,
        }

    async def _take_lock(self, control: AsyncConnection[Any]) -> None:
        key = f"{self.settings.schema}.{self.schema}.{self.projection.name}"
        cur = await control.execute(self.queries["rebuild_lock_key"], {"key": key})
        row = await cur.fetchone()
        assert row is not None  # RETURNING of an upsert
        if await take_keyed_lock(control, self.queries, "rebuild", key, int(row[0])) is None:
            raise RebuildError(f"an online rebuild of {self.projection.name!r} is already running")

    async def _check_version(self, control: AsyncConnection[Any]) -> None:
        """The serving version's code only, and not while a daemon rebuilds that version (a
        versioned drift repair, or a rollback to the tables it replaced): two swaps would race."""
        await check_serving_version(control, self.checkpoints, self.projection)
        name, mine = self.projection.name, self.projection.version
        rows = await VersionStore(self.queries).rows(control, [name])
        if any(row.version == mine and row.role == BUILDING for row in rows):
            raise RebuildError(
                f"version {mine} of {name!r} is being rebuilt by a daemon (a versioned drift"
                " repair or a rollback): `projectord status` shows its progress"
            )

    async def _build_shadow(self, control: AsyncConnection[Any]) -> None:
        """Fresh, empty tables as declared, secured as declared, and a checkpoint at the start."""
        for schema in (self.names.schema, self.names.retired):  # never another role's
            await build_schema_exists(control, self.queries, schema)
        await self._discard_shadow(control)  # what an interrupted rebuild left
        async with control.transaction():
            await create_build_schema(control, self.queries, self.names.schema)
            await create_projection_tables(control, self.names.schema, [self.projection])
            readers = await existing_roles(control, self.queries, self.projection.read_access)
            for table in self.tables:
                ident = sql.Identifier(self.names.schema, table)
                for statement in secure_statements(
                    ident, self.settings.schema, self.projection, readers
                ):
                    await control.execute(statement)
            for name in (self.projection.name, self.names.checkpoint):
                await self.checkpoints.ensure(control, name, self.projection.version)

    async def _discard_shadow(self, control: AsyncConnection[Any]) -> None:
        try:
            await control.execute(
                sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(self._shadow_schema)
            )
            await self.checkpoints.delete(control, self.names.checkpoint)
            await control.execute(
                self.queries["delete_shadow_dead_letters"], {"shadow": self.names.checkpoint}
            )
        except psycopg.Error as exc:  # the database may be what failed; say so and go on
            self._log.warning("rebuild.shadow_not_discarded", error=str(exc))

    @property
    def _shadow_schema(self) -> sql.Identifier:
        return sql.Identifier(self.names.schema)

    async def _fill_and_swap(
        self, control: AsyncConnection[Any], pool: AsyncConnectionPool
    ) -> tuple[Checkpoint, int]:
        for attempt in range(1, SWAP_ATTEMPTS + 1):
            runner = self.shadow_runner(pool)
            stopped = anyio.Event()
            outcome: tuple[Checkpoint, int] | None = None
            failure: Exception | None = None
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(_run_until_stopped, runner, stopped)
                try:
                    await self._catch_up(control, runner, timeout=None)
                    self._log.info("rebuild.caught_up", applied=runner.status.applied_total)
                    outcome = await self._swap(control, runner, stopped)
                except (
                    _SwapNotReady,
                    psycopg.errors.LockNotAvailable,
                    psycopg.errors.DeadlockDetected,
                ) as exc:
                    self._log.warning("rebuild.swap_retry", attempt=attempt, error=str(exc))
                except Exception as exc:  # raised once the task group is closed, unwrapped
                    failure = exc
                finally:
                    runner.request_stop()
            if failure is not None:
                raise failure
            if outcome is not None:
                return outcome
        raise RebuildError(
            f"could not swap in the rebuilt tables of {self.projection.name!r} after"
            f" {SWAP_ATTEMPTS} attempts (locks held by long readers, or events arriving faster"
            " than the projection applies them)"
        )

    def shadow_runner(self, pool: AsyncConnectionPool) -> ProjectionRunner:
        """A runner of the shadow with the settings the live runner has: the projection's error
        policy over the configured defaults, its pipeline setting (carried by the shadow)."""
        return ProjectionRunner(
            shadow_projection(self.projection, self.names, self.schema, self.guard),
            pool,
            self.queries,
            batch_size=self.settings.batch_size,
            batch_max_bytes=self.settings.batch_max_bytes,
            poll_interval=self.settings.poll_interval,
            policy=ErrorPolicy.of(self.projection, ErrorPolicy.configured(self.settings)),
            observe_writes=False,
            read_model_schema=self.names.schema,
        )

    def _check_shadow(self, runner: ProjectionRunner) -> None:
        """Abort when the shadow wrote outside its tables, or stopped on a poison event
        (on_error = "pause"); a shadow still retrying is waited for, as its policy says."""
        if self.guard.violation is not None:
            raise RebuildError(self.guard.violation)
        error = runner.status.last_error
        if runner.failed and error:
            raise RebuildError(
                f"projection {self.projection.name!r} failed in the shadow tables:"
                f" {error['type']}: {error['message']}"
            )

    async def _catch_up(
        self, conn: AsyncConnection[Any], runner: ProjectionRunner, *, timeout: float | None
    ) -> None:
        """Wait until the shadow has applied the last event of the projection's types committed
        now. The shadow runner hears no notifications, so it is nudged while waited for."""
        targets = await latest_positions(conn, self.queries, [self.projection])
        target = targets.get(self.projection.name)
        deadline = None if timeout is None else time.monotonic() + timeout
        reported = time.monotonic()
        while target is not None and runner.status.checkpoint < target:
            self._check_shadow(runner)
            if deadline is not None and time.monotonic() > deadline:
                raise _SwapNotReady(f"the shadow did not catch up within {timeout}s")
            if time.monotonic() - reported >= PROGRESS_INTERVAL:
                reported = time.monotonic()
                self._log.info("rebuild.progress", applied=runner.status.applied_total)
            runner.wakeup.set()
            await anyio.sleep(POLL_INTERVAL)

    async def _swap(
        self, control: AsyncConnection[Any], runner: ProjectionRunner, stopped: anyio.Event
    ) -> tuple[Checkpoint, int]:
        async with control.transaction():
            await control.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(SWAP_LOCK_TIMEOUT))
            owners = await self._owners(control, self.schema)
            live = [sql.Identifier(self.schema, t) for t in self.tables if t in owners]
            if live:
                await control.execute(
                    sql.SQL("LOCK TABLE {} IN EXCLUSIVE MODE").format(sql.SQL(", ").join(live))
                )
            await self._catch_up(control, runner, timeout=FINAL_CATCH_UP_TIMEOUT)
            runner.request_stop()
            await stopped.wait()
            self._check_shadow(runner)
            shadow = [sql.Identifier(self.names.schema, t) for t in self.tables]
            await control.execute(
                sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(
                    sql.SQL(", ").join(live + shadow)
                )
            )
            await self._carry_over(control, owners)
            await self._move_tables(control, owners)
            taken = await self.checkpoints.take_over(
                control, self.projection.name, self.names.checkpoint
            )
            await self.checkpoints.delete(control, self.names.checkpoint)
            await control.execute(
                self.queries["resolve_by_rebuild"], {"projection": self.projection.name}
            )
            await control.execute(
                self.queries["adopt_shadow_dead_letters"],
                {"name": self.projection.name, "shadow": self.names.checkpoint},
            )
        assert taken is not None
        return taken

    async def _owners(self, conn: AsyncConnection[Any], schema: str) -> dict[str, bool]:
        """The live tables that exist → whether projectord's role owns them."""
        cur = await conn.execute(
            self.queries["table_owners"], {"schema": schema, "tables": self.tables}
        )
        return {name: bool(ours) for name, ours in await cur.fetchall()}

    async def _carry_over(self, conn: AsyncConnection[Any], owners: dict[str, bool]) -> None:
        """The new tables, owned by projectord's role which created them, get the live tables'
        SELECT grants, so whoever could read the old tables still can after the swap. Nothing else
        is carried over: other privileges (TRUNCATE, TRIGGER, writes) are drift, and a table
        another role owns passes on neither that owner nor the grants it made."""
        for table, ours in owners.items():
            if not ours:
                self._log.warning("rebuild.foreign_owner_not_carried", table=table)
                continue
            target = sql.Identifier(self.names.schema, table)
            cur = await conn.execute(
                self.queries["table_grants"], {"schema": self.schema, "table": table}
            )
            for grantee, privilege in await cur.fetchall():
                if privilege not in CARRIED_PRIVILEGES:
                    continue
                who = sql.SQL("PUBLIC") if grantee == "public" else sql.Identifier(grantee)
                await conn.execute(
                    sql.SQL("GRANT {} ON {} TO {}").format(sql.SQL(privilege), target, who)
                )

    async def _move_tables(self, conn: AsyncConnection[Any], owners: dict[str, bool]) -> None:
        """Old tables out, new tables in, old tables dropped. Dropping without CASCADE: a view or
        foreign key on an old table makes the swap fail instead of disappearing with it."""
        retired = sql.Identifier(self.names.retired)
        await conn.execute(sql.SQL("CREATE SCHEMA {}").format(retired))
        for table in self.tables:
            if table in owners:
                await conn.execute(
                    sql.SQL("ALTER TABLE {} SET SCHEMA {}").format(
                        sql.Identifier(self.schema, table), retired
                    )
                )
            await conn.execute(
                sql.SQL("ALTER TABLE {} SET SCHEMA {}").format(
                    sql.Identifier(self.names.schema, table), sql.Identifier(self.schema)
                )
            )
        for table in owners:
            try:
                await conn.execute(
                    sql.SQL("DROP TABLE {}").format(sql.Identifier(self.names.retired, table))
                )
            except psycopg.errors.DependentObjectsStillExist as exc:
                detail = "; ".join((exc.diag.message_detail or str(exc)).splitlines())
                raise RebuildError(
                    f"cannot replace {self.schema}.{table}: {detail}"
                    " (drop it first, then recreate it on the rebuilt table)"
                ) from None
        await conn.execute(sql.SQL("DROP SCHEMA {}").format(retired))
        await conn.execute(sql.SQL("DROP SCHEMA {}").format(self._shadow_schema))


async def _run_until_stopped(runner: ProjectionRunner, stopped: anyio.Event) -> None:
    try:
        await runner.run()
    finally:
        stopped.set()
