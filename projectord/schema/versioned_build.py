"""Blue/green deployment of a projection's new version (docs/evolution.md).

A daemon whose code declares a projection at `version = N` higher than the version serving reads
builds version N beside it, with the online rebuild's machinery (projectord/schema/
online_rebuild.py): fresh tables as N declares them, in a schema of their own
(`projectord_v_<hash>`, projectord/runner/version_store.py), filled from the first event by a
`ProjectionRunner` of the projection under its own checkpoint row `NAME#vN` (fetch in commit order,
aggregate version order, checkpoint compare-and-set committed with the writes), with the shadow's
guard on every batch. The build is owned like any projection (its own advisory lock: the unit of
ownership is the projection *and* its version), resumes where it stopped after a crash, and its
progress shows in status.

Once it has caught up, one transaction swaps it in, as the online rebuild does: lock the live
tables against writes (EXCLUSIVE: reads go on), let the build apply the last events and stop it,
take ACCESS EXCLUSIVE locks (readers wait for a moment), carry the live tables' SELECT grants over,
move the live tables into the old version's own schema (kept for a rollback, with their checkpoint
as row `NAME#vOLD`) and the new ones in, and make the live positions row continue from the build's
checkpoint as version N. A reader sees the complete old tables until the commit and the complete
new ones after it.

A rollback is the same path backwards: a kept version marked `building` (`projectord rollback`) is
caught up from its kept checkpoint by a daemon whose code is that version, then swapped in.

A rebuild of the *serving* version takes the same path (`drift repair` of a table change it cannot
make in place, projectord/schema/versioned_repair.py): its row `building` is recorded for the
version that serves. Its live runner goes on applying to the live tables meanwhile (same code), the
swap exchanges the two checkpoints, and the replaced tables are kept as that version, in
`replaced_schema`, for a rollback to them (the same path again).
"""

from __future__ import annotations

import time
from typing import Any

import anyio
import psycopg
from psycopg import AsyncConnection, sql
from psycopg_pool import AsyncConnectionPool

from projectord.backoff import jittered_delay
from projectord.config import Settings
from projectord.daemon.listener import NotificationListener
from projectord.database import connect, describe_error
from projectord.logs import get_logger
from projectord.projection import Projection
from projectord.queries import Queries
from projectord.runner.catch_up import latest_positions
from projectord.runner.error_policy import ErrorPolicy
from projectord.runner.loop import BatchObserver, ProjectionRunner
from projectord.runner.version_store import (
    BUILDING,
    VersionStore,
    replaced_schema,
    version_row_name,
    version_schema,
)
from projectord.schema.build_schema import build_schema_exists, create_build_schema
from projectord.schema.migrations import create_projection_tables
from projectord.schema.online_rebuild import (
    FINAL_CATCH_UP_TIMEOUT,
    SWAP_LOCK_TIMEOUT,
    RebuildError,
    ShadowGuard,
    ShadowNames,
    _OnlineRebuild,
    _SwapNotReady,
    shadow_projection,
)
from projectord.schema.security import existing_roles, secure_statements

log = get_logger("projectord.schema.versioned_build")

CATCH_UP_POLL = 0.05  # seconds between two looks at the build's progress
BLOCKED_RETRY = 5.0  # seconds between two tries of a swap that objects on the live tables block


class SwapBlocked(Exception):
    """Views or foreign keys depend on the live tables: the swap would leave them on the old
    version. It is tried again until they are gone; one line for an operator."""


class VersionBuild(ProjectionRunner):
    """The runner of one projection's version `projection.version` while it does not serve:
    builds (or, for a rollback, catches up) its tables, then swaps them in and returns.

    It is a `ProjectionRunner` of the shadow projection (named `NAME#vN`), so the supervisor,
    heartbeats and the runner's failure handling treat it as any runner; `run` wraps the runner's
    loop with the preparation of the tables and the swap."""

    def __init__(
        self,
        live: Projection,
        pool: AsyncConnectionPool,
        queries: Queries,
        *,
        dsn: str,
        settings: Settings,
        owner: str | None,
        listener: NotificationListener | None = None,
        policy: ErrorPolicy | None = None,
        on_batch: BatchObserver | None = None,
        once: bool = False,
    ) -> None:
        self.live = live
        self.once = once
        self.dsn = dsn
        self.settings = settings
        self.schema = settings.read_model_schema
        self.build_schema = version_schema(self.schema, live.name, live.version)
        self.versions = VersionStore(queries)
        # The online rebuild's helpers (grants, table owners, final catch-up, guard check) over
        # this version's names; `retired` is where the old version goes, known at the swap.
        self.rebuild = _OnlineRebuild(dsn, settings, live)
        self.rebuild.names = ShadowNames(
            self.build_schema, self.build_schema, version_row_name(live.name, live.version)
        )
        self.guard = ShadowGuard(live.name, queries["tables_written_outside"], self.build_schema)
        self.rebuild.guard = self.guard
        super().__init__(
            shadow_projection(live, self.rebuild.names, self.schema, self.guard),
            pool,
            queries,
            batch_size=settings.batch_size,
            batch_max_bytes=settings.batch_max_bytes,
            poll_interval=settings.poll_interval,
            on_batch=on_batch,
            listener=listener,
            policy=policy or ErrorPolicy.of(live, ErrorPolicy.configured(settings)),
            owner=owner,
            observe_writes=False,
            read_model_schema=self.build_schema,
        )
        self.target: Any = None  # the last event of its types it must reach (Checkpoint)
        self.swapped_at: float | None = None
        # The last swap, for benchmarks/version_swap.py: monotonic start and end of its
        # transaction, and when its ACCESS EXCLUSIVE locks were asked for.
        self.swap_timing: dict[str, float] = {}
        self._leaving = False  # the daemon asked it to stop (not the swap's own stop)
        self._blog = log.bind(projection=live.name, version=live.version)

    @property
    def version(self) -> int:
        return self.live.version

    def request_stop(self) -> None:
        self._leaving = True
        super().request_stop()

    def reset(self) -> None:
        super().reset()
        self._leaving = False

    async def run(self) -> None:
        """Build and swap; then, in a daemon, stay until ownership gives the unit up: a rollback
        or a drift repair may ask for another build of this version before it does (and nudges
        this runner). `once` (a one-off build): return after the swap."""
        failures = 0
        while not self._leaving:
            try:
                control = await connect(self.dsn, autocommit=True, connect_timeout=10)
                async with control:
                    if await self._prepare(control):
                        await self._read_checkpoint(control)
                        await self._build_and_swap(control)
                # Only a pass that ended without an error (swapped, nothing to build, asked to
                # stop) resets the backoff: a swap that fails the same way on every try after a
                # successful preparation must back off, not lock the live tables at the floor.
                failures = 0
                if self.once:
                    break
                self._set_state("stopped")
                with self.heartbeat.waiting():
                    await self.control.wait(self.poll_interval)
            except RebuildError as exc:
                self._blog.error("version.build_aborted", error=str(exc))
                self.failed = True
                self.status.last_error = {"type": "RebuildError", "message": str(exc)}
                self._set_state("failed")
                with self.heartbeat.waiting():
                    while not self._leaving:
                        await self.control.wait(self.poll_interval)
            except Exception as exc:  # the database, or anything else: never the daemon's end
                failures += 1
                event = "version.build_interrupted"
                if not isinstance(exc, (psycopg.Error, OSError)):
                    event = "version.build_error"
                self._blog.warning(event, error=describe_error(exc))
                self.status.last_error = {"type": type(exc).__name__, "message": str(exc)}
                await self._back_off(failures)
        self._set_state("stopped")

    async def _back_off(self, failures: int) -> None:
        """Wait out the delay of the `failures`th failure in a row, or until asked to stop. Not
        cut short by the runner's control signal otherwise: the stop of the build's own loop sets
        it on every try, and a swap that fails each time would be retried at once."""
        deadline = time.monotonic() + jittered_delay(failures, 0.1, 5.0)
        with self.heartbeat.waiting():
            while not self._leaving and (left := deadline - time.monotonic()) > 0:
                await self.control.wait(left)

    # -- preparing ---------------------------------------------------------------------------------

    async def _prepare(self, control: AsyncConnection[Any]) -> bool:
        """Fresh tables for a new build, or the existing ones of a build that goes on (after a
        crash) or of a kept version to roll back to. False: nothing to build (this version
        serves and no rebuild of it was asked, or is older than the one serving and no rollback
        to it was asked)."""
        name, version = self.live.name, self.version
        async with control.transaction():
            row = await self.versions.lock(control, name, version)
            serving = (await self.checkpoints.serving_versions(control, [name])).get(name)
            building = row is not None and row[0] == BUILDING
            if serving is None or (serving == version and not building):
                return False
            if serving > version and not building:
                return False
            exists = await build_schema_exists(control, self.queries, self.build_schema)
            await self.checkpoints.ensure(control, self.name, version)
            if building and exists:
                self._blog.info("version.build_resumed", serving_version=serving)
                return True
            if serving > version:
                await self.versions.forget(control, name, version)  # its tables are gone
                return False
            await self._fresh_tables(control)
            await self.checkpoints.reset(control, self.name)
            await self.versions.start_building(control, name, version, self.build_schema)
        self._blog.info(
            "version.build_started", serving_version=serving, tables_schema=self.build_schema
        )
        return True

    async def _read_checkpoint(self, control: AsyncConnection[Any]) -> None:
        """What this runner knows of its checkpoint, read afresh: the catch-up waits on it, and
        a runner that built (or ran) before would otherwise wait on the position it had then,
        not the one this build starts from (a kept version's, a fresh build's)."""
        stored = await self.checkpoints.read(control, self.name)
        self._persisted = None  # the loop reads its row again too
        if stored is not None:
            self.status.checkpoint = stored.checkpoint
            self.status.applied_total = stored.applied_total

    async def _fresh_tables(self, control: AsyncConnection[Any]) -> None:
        """Empty tables as this version declares them, secured as declared; what a previous
        build or a kept copy of this version left is dropped."""
        ident = sql.Identifier(self.build_schema)
        await control.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(ident))
        await control.execute(self.queries["delete_shadow_dead_letters"], {"shadow": self.name})
        await create_build_schema(control, self.queries, self.build_schema)
        await create_projection_tables(control, self.build_schema, [self.live])
        readers = await existing_roles(control, self.queries, self.live.read_access)
        for table in self.live.tables:
            target = sql.Identifier(self.build_schema, table)
            for statement in secure_statements(target, self.settings.schema, self.live, readers):
                await control.execute(statement)

    # -- building ----------------------------------------------------------------------------------

    async def _build_and_swap(self, control: AsyncConnection[Any]) -> bool:
        """Run the build's loop until it has caught up, then swap. True once swapped (or once
        there is nothing left to swap); False when asked to stop."""
        while not self._leaving:
            stopped = anyio.Event()
            self._stopping = False
            outcome: bool | None = None
            failure: Exception | None = None
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(self._loop, stopped)
                try:
                    outcome = await self._until_swapped(control, stopped)
                except Exception as exc:  # raised once the group is closed: it would wrap it,
                    failure = exc  # and `run` would not know a RebuildError from the rest
                finally:
                    ProjectionRunner.request_stop(self)
            if failure is not None:
                raise failure
            if outcome is not None:
                return outcome
        return False

    async def _loop(self, stopped: anyio.Event) -> None:
        try:
            await ProjectionRunner.run(self)
        finally:
            stopped.set()

    async def _until_swapped(
        self, control: AsyncConnection[Any], stopped: anyio.Event
    ) -> bool | None:
        """True: swapped; False: asked to stop; None: the loop stopped for a swap that failed
        after stopping it, run it again."""
        attempt = 0
        while not self._leaving:
            if not await self._caught_up(control):
                return False
            attempt += 1
            try:
                return await self._swap(control, stopped)
            except SwapBlocked as exc:
                if self.status.last_error is None:
                    self._blog.warning("version.swap_blocked", error=str(exc))
                self.status.last_error = {"type": "SwapBlocked", "message": str(exc)}
                await self.control.wait(BLOCKED_RETRY)
                continue
            except (
                _SwapNotReady,
                psycopg.errors.LockNotAvailable,
                psycopg.errors.DeadlockDetected,
            ) as exc:
                self._blog.warning("version.swap_retry", attempt=attempt, error=str(exc))
                if stopped.is_set():
                    return None
                await self.control.wait(jittered_delay(attempt, 0.1, 2.0))
        return False

    async def _caught_up(self, control: AsyncConnection[Any]) -> bool:
        """Wait until the build has applied the last event of its types committed when the wait
        began (not a moving target: under steady appends it would never be met; the swap's final
        catch-up takes the rest under the lock); False when asked to stop first."""
        targets = await latest_positions(control, self.queries, [self.live])
        self.target = targets.get(self.live.name)
        while not self._leaving:
            if self.guard.violation is not None:
                raise RebuildError(self.guard.violation)
            if self.target is None or self.status.checkpoint >= self.target:
                return True
            if not (self.failed or self.paused):
                self.wakeup.set()
            with self.heartbeat.waiting():
                await self.control.wait(CATCH_UP_POLL)
        return False

    # -- the swap ----------------------------------------------------------------------------------

    async def _swap(self, control: AsyncConnection[Any], stopped: anyio.Event) -> bool:
        name, version = self.live.name, self.version
        helper = self.rebuild
        started = time.monotonic()
        async with control.transaction():
            # Nothing in this transaction may take a transaction id (a row lock, a write) before
            # the final catch-up: it would hold back the horizon below which the build reads,
            # and the build could never reach events committed after it. Table locks take none.
            await control.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(SWAP_LOCK_TIMEOUT))
            if not await self._still_to_swap(control):
                return True
            owners = await helper._owners(control, self.schema)
            await self._check_dependents(control, list(owners))
            live = [sql.Identifier(self.schema, t) for t in self.live.tables if t in owners]
            if live:
                await control.execute(
                    sql.SQL("LOCK TABLE {} IN EXCLUSIVE MODE").format(sql.SQL(", ").join(live))
                )
            await helper._catch_up(control, self, timeout=FINAL_CATCH_UP_TIMEOUT)
            ProjectionRunner.request_stop(self)
            await stopped.wait()
            helper._check_shadow(self)
            build = [sql.Identifier(self.build_schema, t) for t in self.live.tables]
            locked_at = time.monotonic()
            await control.execute(
                sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(
                    sql.SQL(", ").join(live + build)
                )
            )
            # Now the rows: the old version's checkpoint held still (its runner, elsewhere, is
            # blocked on the tables), and this version still to swap in (a rollback, a drop or
            # another daemon may have changed that since the look above).
            row = await self.versions.lock(control, name, version)
            await self.checkpoints.lock(control, name)
            serving = (await self.checkpoints.serving_versions(control, [name])).get(name)
            if row is None or row[0] != BUILDING or serving is None:
                return True
            kept_schema = self._kept_schema(serving)
            await self._drop_previous_copy(control, serving, kept_schema)
            helper.names = ShadowNames(self.build_schema, kept_schema, self.name)
            await helper._carry_over(control, owners)
            await self._move_tables(control, owners, kept_schema)
            taken = await self._take_over_checkpoint(control, serving)
            await self.versions.forget(control, name, version)
            await self.versions.keep(control, name, serving, kept_schema)
            await self._move_dead_letters(control, serving)
        assert taken is not None
        self.swapped_at = time.time()
        self.swap_timing = {"started": started, "locked": locked_at, "ended": time.monotonic()}
        self._blog.info(
            "version.swapped",
            previous_version=serving,
            applied=taken[1],
            swap_ms=round((time.monotonic() - started) * 1000, 2),
            exclusive_ms=round((time.monotonic() - locked_at) * 1000, 2),
        )
        return True

    def _kept_schema(self, serving: int) -> str:
        """Where the tables leaving service go: their version's schema, or, when this is a
        rebuild of the serving version (built in that schema), the one for replaced tables."""
        if serving == self.version:
            return replaced_schema(self.schema, self.live.name, serving)
        return version_schema(self.schema, self.live.name, serving)

    async def _drop_previous_copy(
        self, control: AsyncConnection[Any], serving: int, kept_schema: str
    ) -> None:
        """A version keeps one copy of its tables: the one a drift rebuild of it replaced, kept
        elsewhere, goes when the version itself leaves service (its row is overwritten)."""
        row = await self.versions.lock(control, self.live.name, serving)
        if row is not None and row[1] not in (kept_schema, self.build_schema):
            await control.execute(
                sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(row[1]))
            )

    async def _move_dead_letters(self, control: AsyncConnection[Any], serving: int) -> None:
        """Dead letters follow the tables that did not apply their events: the leaving tables'
        pending ones are kept with them (unit `NAME#vSERVING`, brought back by a rollback to
        them), the build's become the live projection's. A previous copy of the leaving version
        is gone (_drop_previous_copy): so are its dead letters."""
        kept = version_row_name(self.live.name, serving)
        if kept != self.name:
            await control.execute(self.queries["delete_shadow_dead_letters"], {"shadow": kept})
        await control.execute(
            self.queries["keep_version_dead_letters"],
            {"name": self.live.name, "kept": kept, "shadow": self.name},
        )

    async def _take_over_checkpoint(
        self, control: AsyncConnection[Any], serving: int
    ) -> tuple[Any, int, int] | None:
        """The live row continues from the build's checkpoint; the leaving tables' checkpoint is
        kept as row `NAME#vSERVING`. For a rebuild of the serving version that is the build's
        own row: the two are exchanged."""
        name = self.live.name
        if serving == self.version:
            return await self.checkpoints.exchange(control, name, self.name)
        await self.checkpoints.keep(control, name, version_row_name(name, serving))
        taken = await self.checkpoints.take_over_version(control, name, self.name)
        await self.checkpoints.delete(control, self.name)
        return taken

    async def _check_dependents(self, control: AsyncConnection[Any], tables: list[str]) -> None:
        cur = await control.execute(
            self.queries["dependents"], {"schema": self.schema, "tables": tables}
        )
        found = [str(name) for (name,) in await cur.fetchall()]
        if found:
            raise SwapBlocked(
                f"cannot swap in version {self.version} of {self.live.name}: {'; '.join(found)}"
                " would stay on the old version's table; drop it (the swap is tried again every"
                f" {BLOCKED_RETRY:g}s), then recreate it on the new table"
            )

    async def _still_to_swap(self, control: AsyncConnection[Any]) -> bool:
        """This version is still being built and does not serve (read without a lock)."""
        name, version = self.live.name, self.version
        rows = await self.versions.rows(control, [name])
        building = any(r.version == version and r.role == BUILDING for r in rows)
        serving = (await self.checkpoints.serving_versions(control, [name])).get(name)
        return building and serving is not None

    async def _move_tables(
        self, conn: AsyncConnection[Any], owners: dict[str, bool], kept_schema: str
    ) -> None:
        """The live tables into the old version's schema (kept for a rollback), this version's
        tables in; this version's schema, now empty, dropped."""
        kept = sql.Identifier(kept_schema)
        await build_schema_exists(conn, self.queries, kept_schema)  # not another role's
        await conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(kept))
        await conn.execute(sql.SQL("CREATE SCHEMA {}").format(kept))
        for table in owners:
            await conn.execute(
                sql.SQL("ALTER TABLE {} SET SCHEMA {}").format(
                    sql.Identifier(self.schema, table), kept
                )
            )
        for table in self.live.tables:
            await conn.execute(
                sql.SQL("ALTER TABLE {} SET SCHEMA {}").format(
                    sql.Identifier(self.build_schema, table), sql.Identifier(self.schema)
                )
            )
        await conn.execute(sql.SQL("DROP SCHEMA {}").format(sql.Identifier(self.build_schema)))
