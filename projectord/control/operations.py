"""The operations of the control socket: status, health, pause, resume, rebuild, skip.

Each operation declares its arguments; the control server checks them before the handler runs, so
a handler only ever sees a configured projection's name. Other parts of projectord add their own
operations to the same table (`table()` returns a plain dict).

Pause and resume are states in the database: any daemon of the installation may set them. Rebuild
and skip run inside the projection's runner, so only the daemon that owns the projection takes
them; the others refuse with `not_owner`.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import anyio
import psycopg
from psycopg import AsyncConnection
from psycopg_pool import PoolTimeout

from projectord.control.health import HealthCheck
from projectord.control.server import Arg, Operation, RequestError
from projectord.control.status import DB_TIMEOUT, StatusReporter
from projectord.database import describe_error
from projectord.logs import get_logger
from projectord.runner.loop import ProjectionRunner
from projectord.runner.operator_requests import NothingToSkip, RunnerBusy, UndeclaredWrites
from projectord.schema.foreign_owner import ForeignOwnerError

log = get_logger("projectord.control.operations")

# How long an operator request waits for a runner to take it between batches.
RUNNER_REQUEST_TIMEOUT = 20.0


@contextmanager
def database_errors(dsn: str) -> Iterator[None]:
    """A database failure becomes a one-line error reply; nothing was changed."""
    try:
        yield
    except (psycopg.Error, PoolTimeout, TimeoutError) as exc:
        message = describe_error(exc, dsn) or "timed out"
        raise RequestError("database_error", f"{message}; nothing was changed") from None


@asynccontextmanager
async def request_connection(reporter: StatusReporter) -> AsyncIterator[AsyncConnection[Any]]:
    """A pool connection for one control request: at most as many requests at once as the
    reporter's limiter lets through, each bounded by DB_TIMEOUT, a failure a one-line reply."""
    async with reporter.db_limiter:
        with database_errors(reporter.dsn), anyio.fail_after(DB_TIMEOUT):
            async with reporter.pool.connection(timeout=DB_TIMEOUT) as conn:
                yield conn


class Operations:
    def __init__(
        self, runners: Sequence[ProjectionRunner], reporter: StatusReporter, health: HealthCheck
    ) -> None:
        self.runners = {runner.name: runner for runner in runners}
        self.reporter = reporter
        self.health_check = health

    def table(self) -> dict[str, Operation]:
        name = {"name": Arg(str, required=True, check=self._known)}
        return {
            "status": Operation(
                self.status, {"names": Arg(list, items=str, check=self._all_known)}
            ),
            "health": Operation(self.health, {}),
            "pause": Operation(self.pause, name, changes_state=True),
            "resume": Operation(self.resume, name, changes_state=True),
            "rebuild": Operation(
                self.rebuild,
                {**name, "allow_undeclared": Arg(bool)},
                changes_state=True,
            ),
            "skip": Operation(self.skip, name, changes_state=True),
        }

    def _known(self, name: str) -> None:
        if name not in self.runners:
            known = ", ".join(sorted(self.runners)) or "none"
            raise RequestError(
                "unknown_projection",
                f"no projection named {name[:100]!r} is configured (configured: {known})",
            )

    def _all_known(self, names: list[str]) -> None:
        for name in names:
            self._known(name)

    def _not_stopping(self) -> None:
        if self.reporter.stopping:
            raise RequestError("stopping", "the daemon is stopping; try again once it runs")

    async def status(self, args: dict[str, Any]) -> dict[str, Any]:
        return await self.reporter.snapshot(args.get("names"))

    async def health(self, args: dict[str, Any]) -> dict[str, Any]:
        return await self.health_check.check()

    async def pause(self, args: dict[str, Any]) -> dict[str, Any]:
        return await self._set_state(args["name"], "paused")

    async def resume(self, args: dict[str, Any]) -> dict[str, Any]:
        return await self._set_state(args["name"], "running")

    async def _set_state(self, name: str, state: str) -> dict[str, Any]:
        """Persist the state in the positions row (it survives a restart), then have the runner
        re-read it. Once this answers `paused`, no batch of the projection commits."""
        self._not_stopping()
        reporter = self.reporter
        async with request_connection(reporter) as conn:
            await reporter.checkpoints.ensure(conn, name)
            now = await reporter.checkpoints.set_state(conn, name, state)
        assert now is not None
        self.runners[name].nudge()
        log.info(
            "projection.paused" if state == "paused" else "projection.resumed", projection=name
        )
        return {"name": name, "state": state}

    def _runs_here(self, name: str) -> None:
        local = self.reporter.local
        if local is not None and name not in local:
            raise RequestError(
                "not_owner",
                f"projection {name!r} does not run in this daemon ({self.reporter.instance}); "
                "`projectord status` names its owner: send the request to that daemon",
            )

    async def rebuild(self, args: dict[str, Any]) -> dict[str, Any]:
        self._not_stopping()
        self._runs_here(args["name"])
        runner = self.runners[args["name"]]
        allow = bool(args.get("allow_undeclared"))
        try:
            progress = await self._ask(
                runner, functools.partial(runner.rebuild, allow_undeclared=allow)
            )
        except UndeclaredWrites as exc:
            raise RequestError("undeclared_tables", str(exc)) from None
        return {"name": runner.name, "rebuild": progress}

    async def skip(self, args: dict[str, Any]) -> dict[str, Any]:
        self._not_stopping()
        self._runs_here(args["name"])
        runner = self.runners[args["name"]]
        try:
            skipped = await self._ask(runner, runner.skip)
        except NothingToSkip as exc:
            raise RequestError("not_stuck", str(exc)) from None
        return {"name": runner.name, "dead_lettered": skipped}

    async def _ask(self, runner: ProjectionRunner, action: Any) -> Any:
        try:
            with database_errors(self.reporter.dsn):
                return await action(timeout=RUNNER_REQUEST_TIMEOUT)
        except RunnerBusy as exc:
            raise RequestError("busy", str(exc)) from None
        except ForeignOwnerError as exc:
            raise RequestError("foreign_owner", str(exc)) from None
