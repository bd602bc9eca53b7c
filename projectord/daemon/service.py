"""The daemon: supervises the listener and one runner per projection, and drains on a signal.

On SIGTERM or SIGINT no runner starts a new batch; the batches in flight finish and commit, or
are rolled back once `drain_timeout` passes; then connections close and `run` returns. A second
signal during the drain rolls the batches in flight back at once. SIGHUP re-reads the settings
that can change at runtime (see `projectord.daemon.reload`).

Which projections it runs is decided with the other daemons on the same database through advisory
locks (projectord/daemon/ownership.py): the supervisor (projectord/daemon/supervisor.py) runs a
runner for each
projection this instance owns, drains one it gives up and cancels at once the ones it lost.

Around the runners it serves the control socket, tells systemd how it is doing (`READY=1`,
`STATUS=`, `WATCHDOG=1` while its loops are alive, `STOPPING=1`) and, when configured, exposes
Prometheus metrics.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Sequence
from contextlib import AsyncExitStack

import anyio
from anyio.abc import TaskGroup

from projectord.config import ConfigError, Settings
from projectord.control.drift_operations import DriftOperations
from projectord.control.health import HealthCheck, Thresholds
from projectord.control.metrics import Metrics, MetricsError
from projectord.control.operations import Operations
from projectord.control.server import ControlServer, ControlSocketError
from projectord.control.status import StatusReporter, summary_line
from projectord.control.version_operations import VersionOperations
from projectord.daemon.foreign_ids import ForeignTransactionIds
from projectord.daemon.gc_tuning import tune_for_batches
from projectord.daemon.listener import NotificationListener
from projectord.daemon.monitor import Monitor
from projectord.daemon.ownership import Ownership, default_instance_name
from projectord.daemon.reaper import Reaper
from projectord.daemon.reload import compare_settings
from projectord.daemon.supervisor import Supervisor
from projectord.daemon.systemd import SystemdNotifier
from projectord.daemon.versions import VersionPlan, sweep_kept_versions
from projectord.daemon.watchdog import Watchdog
from projectord.database import connect, describe_error, make_pool, redact
from projectord.logs import get_logger, set_level
from projectord.projection import Projection
from projectord.queries import Queries
from projectord.runner.error_policy import ErrorPolicy
from projectord.runner.loop import ProjectionRunner
from projectord.schema.bootstrap import bootstrap
from projectord.schema.security import SecurityError, check_write_access
from projectord.schema.versioned_build import VersionBuild

log = get_logger("projectord.daemon.service")


class StartupError(Exception):
    """The daemon cannot start (database unreachable, schema cannot be created); one line, and
    the exit status that says so."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


# `projectord run` exits with this when the store holds transaction ids from another cluster: a
# restart cannot help, so systemd is told not to try (RestartPreventExitStatus in the unit).
EXIT_FOREIGN_TRANSACTION_IDS = 4


# After the drain timeout has cancelled the batches in flight, how long to wait for them to give
# up before exiting anyway (a handler that ignores cancellation); the server rolls back.
DRAIN_GRACE = 5.0
READY_WAIT = 10.0  # seconds READY=1 waits for the listener's first connection


class Daemon:
    def __init__(
        self,
        settings: Settings,
        projections: Sequence[Projection],
        dsn: str,
        *,
        notifier: SystemdNotifier | None = None,
        reload_settings: Callable[[], Settings] | None = None,
    ) -> None:
        self.settings = settings
        self.projections = list(projections)
        self.dsn = dsn
        self.queries = Queries(settings.schema)
        self.instance = settings.instance_name or default_instance_name()
        policy = ErrorPolicy.configured(settings)
        self.pool = make_pool(
            dsn,
            # A build of a new version may run beside its live runner (several daemons).
            max_size=min(settings.pool_size, len(self.projections) + 3),
            read_model_schema=settings.read_model_schema,
        )
        self.metrics = Metrics(settings.metrics_address) if settings.metrics_address else None
        self.reaper = Reaper(dsn)  # ends the server sessions of connections given up as dead
        self.listener = NotificationListener(
            dsn, settings.schema, self.wake_all, poll_interval=settings.poll_interval
        )
        self.runners = [
            ProjectionRunner(
                projection,
                self.pool,
                self.queries,
                batch_size=settings.batch_size,
                batch_max_bytes=settings.batch_max_bytes,
                poll_interval=settings.poll_interval,
                on_batch=self.metrics.observe_batch if self.metrics else None,
                listener=self.listener,
                policy=ErrorPolicy.of(projection, policy),
                owner=self.instance,
                read_model_schema=settings.read_model_schema,
            )
            for projection in self.projections
        ]
        # The build of each projection's version in this code, run only while that version does
        # not serve (projectord/daemon/versions.py, projectord/schema/versioned_build.py).
        self.plan = VersionPlan(self.projections, self.queries)
        self.builds = [
            VersionBuild(
                projection,
                self.pool,
                self.queries,
                dsn=dsn,
                settings=settings,
                owner=self.instance,
                listener=self.listener,
                policy=ErrorPolicy.of(projection, policy),
                on_batch=self.metrics.observe_batch if self.metrics else None,
            )
            for projection in self.projections
        ]
        self.stopping = anyio.Event()
        self.ready = anyio.Event()
        self.listener_up = anyio.Event()
        self.reload_settings = reload_settings
        self.notifier = notifier or SystemdNotifier.from_environment()
        self._wire_operations()
        self._runners_scope: anyio.CancelScope | None = None

    def _wire_operations(self) -> None:
        """Ownership and the supervisor; status, health, the control socket, the watchdog, the
        monitor and metrics."""
        settings = self.settings
        # Live: the supervisor adds the heartbeat of each runner while it runs here.
        heartbeats = [self.listener.heartbeat]
        self.supervisor = Supervisor(
            [*self.runners, *self.builds], heartbeats, lambda: self.settings.drain_timeout
        )
        self.ownership = Ownership(
            self.dsn,
            settings.schema,
            self.instance,
            [runner.name for runner in [*self.runners, *self.builds]],
            acquired=self.supervisor.start,
            released=self.supervisor.drain,
            lost=self.supervisor.stop_at_once,
            eligible=self.plan.eligible,
            extra=self.plan.builds(),
            versions=self.plan.units(),
        )
        self.reporter = StatusReporter(
            self.runners,
            self.pool,
            self.queries,
            self.listener,
            dsn=self.dsn,
            instance=self.instance,
            local=self.supervisor.local,
            plan=self.plan,
            builds=self.builds,
        )
        self.health = HealthCheck(
            self.reporter,
            heartbeats,
            thresholds(settings),
            schemas=(settings.read_model_schema, settings.schema),
        )
        self.operations = Operations(self.runners, self.reporter, self.health).table()
        self.operations |= DriftOperations(self.dsn, settings, self.projections).table()
        self.operations |= VersionOperations(
            self.reporter, self.plan, self.builds, lambda: self.settings.version_retention
        ).table()
        self.control = ControlServer(
            settings.socket_path(),
            self.operations,
            idle_timeout=settings.control_idle_timeout,
            max_clients=settings.control_max_clients,
        )
        self.watchdog = Watchdog(self.notifier, heartbeats, settings.stall_timeout)
        if self.metrics is not None:
            self.metrics.watch(self.runners, self.listener)
        self.monitor = Monitor(self.health, self.notifier, self.metrics)

    def wake_all(self) -> None:
        self.listener_up.set()  # the listener wakes everyone when it (re)connects
        for runner in [*self.runners, *self.builds]:
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
                created = await bootstrap(conn, self.settings, self.projections)
            except ForeignTransactionIds as exc:
                raise StartupError(
                    f"refusing to run: {exc}", EXIT_FOREIGN_TRANSACTION_IDS
                ) from None
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
        tune_for_batches()
        async with AsyncExitStack() as stack:
            try:
                await self.control.bind()
            except ControlSocketError as exc:
                raise StartupError(str(exc)) from None
            stack.callback(self.control.close)
            await self.pool.open(wait=True, timeout=15)
            stack.push_async_callback(self.pool.close)
            if self.metrics is not None:
                try:
                    self.metrics.start()
                except MetricsError as exc:
                    raise StartupError(str(exc)) from None
                stack.callback(self.metrics.stop)
            async with anyio.create_task_group() as services:
                services.start_soon(self._watch_signals)
                services.start_soon(self.listener.run)
                services.start_soon(self.control.serve)
                services.start_soon(self.watchdog.run)
                services.start_soon(self.monitor.run)
                services.start_soon(self.reaper.run)
                services.start_soon(
                    sweep_kept_versions,
                    self.dsn,
                    self.queries,
                    lambda: self.settings.version_retention,
                )
                await self._run_runners(services)
                services.cancel_scope.cancel()
        self.notifier.close()
        log.info("daemon.stopped")

    async def _run_runners(self, services: TaskGroup) -> None:
        async with anyio.create_task_group() as runners:
            self._runners_scope = runners.cancel_scope
            self.supervisor.attach(runners)
            services.start_soon(self.ownership.run)
            with anyio.move_on_after(READY_WAIT):  # this instance's share, before READY=1
                await self.ownership.balanced.wait()
            log.info(
                "daemon.started",
                instance=self.instance,
                projections=[r.name for r in self.runners],
                owned=sorted(self.supervisor.local),
                batch_size=self.settings.batch_size,
                poll_interval=self.settings.poll_interval,
            )
            self.ready.set()
            services.start_soon(self._announce_ready)
            await self.stopping.wait()
            log.info("daemon.draining", timeout=self.settings.drain_timeout)
            self.supervisor.stop_all()
            services.start_soon(self._drain_deadline, runners.cancel_scope)

    async def _announce_ready(self) -> None:
        """READY=1 once the runners run and the listener has connected (or READY_WAIT passed)."""
        with anyio.move_on_after(READY_WAIT):
            await self.listener_up.wait()
        try:
            snapshot = await self.monitor.look()
            self.notifier.ready(summary_line(snapshot))
        except Exception as exc:  # the database may be down right now; ready all the same
            log.debug("daemon.ready_without_summary", error=str(exc))
            self.notifier.ready(f"{len(self.runners)} projections")

    async def _drain_deadline(self, scope: anyio.CancelScope) -> None:
        await anyio.sleep(self.settings.drain_timeout)
        log.warning("daemon.drain_timeout", timeout=self.settings.drain_timeout)
        scope.cancel()
        await anyio.sleep(DRAIN_GRACE)
        # Still here: a handler ignores cancellation. Exit; the server rolls its batch back.
        log.error("daemon.drain_stuck", waited=self.settings.drain_timeout + DRAIN_GRACE)
        os._exit(1)

    async def _watch_signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                log.info("daemon.signal", signal=signal.Signals(signum).name)
                if signum == signal.SIGHUP:
                    self.reload()
                elif self.stopping.is_set() and self._runners_scope is not None:
                    log.warning("daemon.drain_abandoned")  # a second signal: roll back now
                    self._runners_scope.cancel()
                else:
                    self.request_stop()

    def request_stop(self) -> None:
        if not self.stopping.is_set():
            self.reporter.stopping = True
            self.notifier.stopping()
        self.stopping.set()

    def reload(self) -> None:
        """SIGHUP: re-read the configuration, apply what can change while running, and log what
        changed and what would need a restart. Invalid settings are logged and ignored."""
        self.notifier.reloading()
        outcome = "configuration reload failed (see the log)"
        try:
            outcome = self._reload()
        finally:
            # READY=1 ends systemd's reload whatever happened; the monitor's next STATUS= follows.
            self.notifier.reloaded(f"{len(self.runners)} projections, {outcome}")

    def _reload(self) -> str:
        """The reload itself; returns what happened, for systemd's STATUS= line."""
        if self.reload_settings is None:
            log.warning("config.reload_unavailable")
            return "configuration reload unavailable"
        try:
            new = self.reload_settings()
        except ConfigError as exc:
            log.error("config.reload_failed", error=str(exc))
            return "configuration reload failed (see the log)"
        changed, needs_restart = compare_settings(self.settings, new)
        self.settings = self.settings.model_copy(update={k: v[1] for k, v in changed.items()})
        self._apply_runtime_settings()
        log.info(
            "config.reloaded",
            changed={key: list(values) for key, values in changed.items()},
            needs_restart=needs_restart,
        )
        return "configuration reloaded"

    def _apply_runtime_settings(self) -> None:
        settings = self.settings
        set_level(settings.log_level)
        for runner in [*self.runners, *self.builds]:
            runner.batch_size = settings.batch_size
            runner.batch_max_bytes = settings.batch_max_bytes
            runner.poll_interval = settings.poll_interval
        self.listener.poll_interval = settings.poll_interval
        self.control.idle_timeout = settings.control_idle_timeout
        self.control.max_clients = settings.control_max_clients
        self.health.thresholds = thresholds(settings)
        self.watchdog.stall_timeout = settings.stall_timeout


def thresholds(settings: Settings) -> Thresholds:
    return Thresholds(
        max_lag=settings.health_max_lag,
        max_lag_seconds=settings.health_max_lag_seconds,
        horizon_seconds=settings.health_horizon_seconds,
        stall_timeout=settings.stall_timeout,
        outage_seconds=settings.health_outage_seconds,
        notify_queue_usage=settings.health_notify_queue_usage,
    )
