"""The daemon: supervises the listener and one runner per projection, and drains on a signal.

On SIGTERM or SIGINT no runner starts a new batch; the batches in flight finish and commit, or
are rolled back once `drain_timeout` passes; then connections close and `run` returns.
"""

from __future__ import annotations

import signal
from collections.abc import Sequence
from contextlib import AsyncExitStack
from typing import Any

import anyio
from anyio.abc import TaskGroup

from projectord.config import Settings
from projectord.database import connect, describe_error, make_pool, redact
from projectord.listener import NotificationListener
from projectord.logs import get_logger
from projectord.projection import Projection
from projectord.queries import Queries
from projectord.runner import ProjectionRunner
from projectord.schema import initialise
from projectord.security import SecurityError, check_write_access

log = get_logger("projectord.daemon")


class StartupError(Exception):
    """The daemon cannot start (database unreachable, schema cannot be created); one line."""


class Daemon:
    def __init__(self, settings: Settings, projections: Sequence[Projection], dsn: str) -> None:
        self.settings = settings
        self.projections = list(projections)
        self.dsn = dsn
        self.queries = Queries(settings.schema)
        self.pool = make_pool(
            dsn,
            max_size=min(settings.pool_size, len(self.projections) + 2),
            read_model_schema=settings.read_model_schema,
        )
        self.runners = [
            ProjectionRunner(
                projection,
                self.pool,
                self.queries,
                batch_size=settings.batch_size,
                poll_interval=settings.poll_interval,
            )
            for projection in self.projections
        ]
        self.listener = NotificationListener(dsn, settings.schema, self.wake_all)
        self.stopping = anyio.Event()
        self.ready = anyio.Event()

    def wake_all(self) -> None:
        for runner in self.runners:
            runner.wakeup.set()

    async def prepare(self) -> None:
        """Check the database answers and bring the schema up to date, before anything runs."""
        try:
            with anyio.fail_after(15):
                conn = await connect(self.dsn, autocommit=True, connect_timeout=10)
        except Exception as exc:
            raise StartupError(
                f"cannot connect to the database ({redact(self.dsn)}): "
                f"{describe_error(exc, self.dsn)}"
            ) from None
        async with conn:
            try:
                created = await initialise(
                    conn,
                    schema=self.settings.schema,
                    read_model_schema=self.settings.read_model_schema,
                    projections=self.projections,
                )
            except Exception as exc:
                raise StartupError(
                    f"cannot create projectord's tables: {describe_error(exc, self.dsn)}"
                ) from None
            try:  # forced row-level security must not stop this role's own writes
                await check_write_access(
                    conn, self.queries, self.settings.read_model_schema, self.projections
                )
            except SecurityError as exc:
                raise StartupError(str(exc)) from None
        for item in created:
            log.info("schema.created", item=item)

    async def run(self) -> None:
        """Run until a stop is requested; drain; return."""
        await self.prepare()
        async with AsyncExitStack() as stack:
            await self.pool.open(wait=True, timeout=15)
            stack.push_async_callback(self.pool.close)
            async with anyio.create_task_group() as services:
                services.start_soon(self._watch_signals)
                services.start_soon(self.listener.run)
                await self._run_runners(services)
                services.cancel_scope.cancel()
        log.info("daemon.stopped")

    async def _run_runners(self, services: TaskGroup) -> None:
        async with anyio.create_task_group() as runners:
            for runner in self.runners:
                runners.start_soon(runner.run)
            log.info(
                "daemon.started",
                projections=[r.name for r in self.runners],
                batch_size=self.settings.batch_size,
                poll_interval=self.settings.poll_interval,
            )
            self.ready.set()
            await self.stopping.wait()
            log.info("daemon.draining", timeout=self.settings.drain_timeout)
            for runner in self.runners:
                runner.request_stop()
            services.start_soon(self._drain_deadline, runners.cancel_scope)

    async def _drain_deadline(self, scope: anyio.CancelScope) -> None:
        await anyio.sleep(self.settings.drain_timeout)
        log.warning("daemon.drain_timeout", timeout=self.settings.drain_timeout)
        scope.cancel()

    async def _watch_signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("daemon.signal", signal=signal.Signals(signum).name)
                self.request_stop()

    def request_stop(self) -> None:
        self.stopping.set()

    def status(self) -> list[dict[str, Any]]:
        return [
            {
                "name": r.name,
                "state": r.status.state,
                "checkpoint": list(r.status.checkpoint),
                "applied_total": r.status.applied_total,
                "last_error": r.status.last_error,
            }
            for r in self.runners
        ]
