"""`versions`, `rollback` and `drop_version` on the control socket (docs/evolution.md).

- `versions`: per configured projection, this daemon's code version, the serving version, the
  version being built and the versions kept for a rollback (with when they expire).
- `rollback` (`name`): make the kept version that this daemon's code *is* serve again. It only
  marks that version to be caught up; the daemons whose code is that version build it from its
  kept checkpoint and swap it in (projectord/schema/versioned_build.py). A daemon whose code is
  another version refuses (`code_not_deployed`): old tables are only ever applied by their code.
  When the serving version is this code's and it keeps a copy of its own (the tables a versioned
  drift repair replaced), that copy is what comes back, by the same path.
- `drop_version` (`name`, `version`): drop a kept version's tables now. A version that serves or
  is being built is refused.

The projection name is checked against the configured ones before a handler runs; the version is
an integer bound as a parameter. Nothing from a request is interpolated into SQL.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from psycopg import AsyncConnection

from projectord.control.operations import request_connection
from projectord.control.server import Arg, Operation, RequestError
from projectord.control.status import StatusReporter
from projectord.daemon.versions import VersionPlan, drop_version, move_kept_tables
from projectord.logs import get_logger
from projectord.runner.loop import ProjectionRunner
from projectord.runner.version_store import BUILDING, VersionStore

if TYPE_CHECKING:
    from projectord.schema.versioned_build import VersionBuild

log = get_logger("projectord.control.version_operations")


class VersionOperations:
    def __init__(
        self,
        reporter: StatusReporter,
        plan: VersionPlan,
        builds: Sequence[VersionBuild],
        retention: Any = None,
    ) -> None:
        self.reporter = reporter
        self.plan = plan
        self.builds = list(builds)
        self.store = VersionStore(reporter.queries)
        self.retention = retention  # () -> seconds; None: expiry not reported

    def table(self) -> dict[str, Operation]:
        name = {"name": Arg(str, required=True, check=self._known)}
        return {
            "versions": Operation(self.versions, {}),
            "rollback": Operation(self.rollback, name, changes_state=True),
            "drop_version": Operation(
                self.drop, {**name, "version": Arg(int, required=True)}, changes_state=True
            ),
        }

    def _known(self, name: str) -> None:
        if name not in self.plan.code:
            known = ", ".join(sorted(self.plan.code)) or "none"
            raise RequestError(
                "unknown_projection",
                f"no projection named {name[:100]!r} is configured (configured: {known})",
            )

    async def versions(self, args: dict[str, Any]) -> dict[str, Any]:
        async with request_connection(self.reporter) as conn:
            serving = await self.reporter.checkpoints.serving_versions(conn, list(self.plan.code))
            rows = await self.store.rows(conn, list(self.plan.code))
        retention = self.retention() if self.retention is not None else None
        found = []
        for name, version in sorted(self.plan.code.items()):
            mine = [r for r in rows if r.name == name]
            found.append(
                {
                    "name": name,
                    "code_version": version,
                    "serving_version": serving.get(name),
                    "building": [r.version for r in mine if r.role == BUILDING],
                    "kept": [
                        {
                            **r.report(),
                            "expires_at": (r.since + timedelta(seconds=retention)).isoformat()
                            if retention is not None
                            else None,
                        }
                        for r in mine
                        if r.role != BUILDING
                    ],
                }
            )
        return {"projections": found}

    async def rollback(self, args: dict[str, Any]) -> dict[str, Any]:
        name = args["name"]
        mine = self.plan.code[name]
        async with request_connection(self.reporter) as conn, conn.transaction():
            serving = (await self.reporter.checkpoints.serving_versions(conn, [name])).get(name)
            if serving is None:
                raise RequestError("nothing_to_roll_back", f"{name} has no version serving yet")
            row = await self.store.lock(conn, name, mine)
            own_copy = serving == mine and row is not None and row[0] != BUILDING
            if serving < mine or (serving == mine and not own_copy):
                raise RequestError(
                    "code_not_deployed",
                    f"version {serving} of {name} serves and this daemon runs version {mine}:"
                    " a rollback makes an older, kept version serve again, and must be asked of"
                    " a daemon running that version's code; deploy it, then roll back",
                )
            schema = self._build_schema(name)
            if row is not None and row[0] != BUILDING:
                await self._check_complete(conn, name, mine, row[1])
            if row is not None and row[0] != BUILDING and row[1] != schema:
                await move_kept_tables(conn, row[1], schema)  # where a build of it lives
            if not await self.store.request_rollback(conn, name, mine, schema):
                kept = [
                    r.version for r in await self.store.rows(conn, [name]) if r.role != BUILDING
                ]
                raise RequestError(
                    "not_kept",
                    f"version {mine} of {name} is not kept (kept: "
                    f"{', '.join(map(str, kept)) or 'none'}); only a kept version can be rolled"
                    " back to",
                )
        self._wake(name)
        log.info("version.rollback_requested", projection=name, version=mine, serving=serving)
        return {"name": name, "version": mine, "from_version": serving}

    async def drop(self, args: dict[str, Any]) -> dict[str, Any]:
        name, version = args["name"], int(args["version"])
        async with request_connection(self.reporter) as conn, conn.transaction():
            row = await self.store.lock(conn, name, version)
            if row is None or row[0] == BUILDING:
                raise RequestError(
                    "not_kept",
                    f"version {version} of {name} is not a kept version"
                    + (" (it is being built)" if row is not None else ""),
                )
            await drop_version(conn, self.store, self.reporter.checkpoints, name, version, row[1])
        log.info("version.dropped", projection=name, version=version)
        return {"name": name, "version": version, "dropped": True}

    async def _check_complete(
        self, conn: AsyncConnection[Any], name: str, version: int, schema: str
    ) -> None:
        """A kept copy must hold every table its code declares: one a drift repair kept after a
        table was dropped by hand lacks it, and its swap could never lock it (the copy would stay
        `building` for good, the rollback never end)."""
        declared = list(self._build(name).live.tables)
        cur = await conn.execute(
            self.reporter.queries["missing_tables"], {"schema": schema, "tables": declared}
        )
        missing = [str(table) for (table,) in await cur.fetchall()]
        if missing:
            raise RequestError(
                "incomplete_copy",
                f"the copy of version {version} of {name} that is kept lacks table(s)"
                f" {', '.join(missing)} (dropped before a drift repair kept it): it cannot serve;"
                f" `projectord versions drop {name} {version}` drops it",
            )

    def _build(self, name: str) -> VersionBuild:
        return next(b for b in self.builds if _of(b) == name)

    def _build_schema(self, name: str) -> str:
        """The schema the build of this daemon's version of `name` fills (VersionBuild)."""
        return self._build(name).build_schema

    def _wake(self, name: str) -> None:
        for build in self.builds:
            if _of(build) == name:
                build.nudge()


def _of(build: ProjectionRunner) -> str:
    """The projection a build runner (`NAME#vN`) builds."""
    return build.name.rpartition("#v")[0]
