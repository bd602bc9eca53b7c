"""Prometheus metrics on an optional local HTTP address (`metrics_address`, off by default),
served with the `/healthz` probe (projectord/control/http_endpoint.py).

Counters and the batch histogram are fed as batches commit; per-projection lag and the health
gauges come from the monitor's periodic look (it needs the database); states, errors and the
listener are read from the runners when Prometheus scrapes. Every configured projection has its
series from the start, at zero, so that an alert on a projection that never applied anything (or
`absent()`) works. The process and platform collectors give memory, CPU, open files and the
Python version; `projectord_build_info` the version running.
"""

from __future__ import annotations

import platform
from collections.abc import Iterator, Sequence
from importlib import metadata
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from projectord.control.health import SEVERITY
from projectord.control.http_endpoint import (
    EndpointError,
    HealthVerdicts,
    HttpEndpoint,
    endpoint_app,
)
from projectord.daemon.listener import NotificationListener
from projectord.logs import get_logger
from projectord.runner.loop import ProjectionRunner

log = get_logger("projectord.control.metrics")

STATES = (
    "starting",
    "running",
    "rebuilding",
    "paused",
    "retrying",
    "degraded",
    "failed",
    "standby",
    "superseded",
    "stopped",
)
BATCH_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class MetricsError(Exception):
    """The metrics endpoint cannot start; phrased for an operator."""


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


class _RunnerCollector(Collector):
    """What the runners know, read at scrape time."""

    def __init__(self, runners: Sequence[ProjectionRunner], listener: NotificationListener) -> None:
        self.runners = runners
        self.listener = listener

    def collect(self) -> Iterator[Any]:
        errors = CounterMetricFamily(
            "projectord_errors", "Failed batch attempts since start", labels=["projection"]
        )
        state = GaugeMetricFamily(
            "projectord_projection_state",
            "1 for the state the projection is in",
            labels=["projection", "state"],
        )
        for runner in self.runners:
            errors.add_metric([runner.name], runner.status.errors_total)
            for name in STATES:
                state.add_metric([runner.name, name], float(runner.status.state == name))
        yield errors
        yield state
        yield GaugeMetricFamily(
            "projectord_listener_connected",
            "1 while the notification listener is connected",
            value=float(self.listener.connected),
        )


def build_version() -> str:
    try:
        return metadata.version("projectord")
    except metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown"


class Metrics:
    def __init__(self, address: str) -> None:
        self.address = address
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        Gauge(
            "projectord_build_info",
            "Always 1; the labels say which projectord runs on which Python",
            ["version", "python_version"],
            registry=self.registry,
        ).labels(build_version(), platform.python_version()).set(1)
        self.health = Gauge(
            "projectord_health",
            "The daemon's health verdict: 0 ok, 1 degraded, 2 failing (as `projectord health`)",
            registry=self.registry,
        )
        self.projection_health = Gauge(
            "projectord_projection_health",
            "The worst health reason naming the projection: 0 ok, 1 degraded, 2 failing",
            ["projection"],
            registry=self.registry,
        )
        self.verdicts = HealthVerdicts()
        self._projections: list[str] = []
        self.applied = Counter(
            "projectord_events_applied",
            "Events applied since start",
            ["projection"],
            registry=self.registry,
        )
        self.batch_seconds = Histogram(
            "projectord_batch_duration_seconds",
            "Seconds per committed batch",
            ["projection"],
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.lag_events = Gauge(
            "projectord_lag_events",
            "Committed events of the projection's types not applied",
            ["projection"],
            registry=self.registry,
        )
        self.lag_seconds = Gauge(
            "projectord_lag_seconds",
            "Age of the oldest unapplied event (0 when caught up)",
            ["projection"],
            registry=self.registry,
        )
        # Versioned projections (docs/evolution.md): which version the code, the live tables
        # and a build are, and how far the build has to go.
        self.versions = Gauge(
            "projectord_projection_version",
            "A projection's version: role code (this daemon), serving (the live tables) or"
            " building (0 when none)",
            ["projection", "role"],
            registry=self.registry,
        )
        self.build_lag = Gauge(
            "projectord_version_build_lag_events",
            "Events of the projection's types a new version's build has yet to apply (0: none)",
            ["projection"],
            registry=self.registry,
        )
        self._endpoint: HttpEndpoint | None = None

    def watch(self, runners: Sequence[ProjectionRunner], listener: NotificationListener) -> None:
        """Report the runners' states and errors and the listener at every scrape, and give
        every projection its series now, at zero."""
        self.registry.register(_RunnerCollector(runners, listener))
        self._projections = [runner.name for runner in runners]
        for runner in runners:
            self.applied.labels(runner.name)
            self.batch_seconds.labels(runner.name)
            self.lag_events.labels(runner.name)
            self.lag_seconds.labels(runner.name)
            self.projection_health.labels(runner.name)

    def observe_batch(self, projection: str, count: int, seconds: float) -> None:
        self.applied.labels(projection).inc(count)
        self.batch_seconds.labels(projection).observe(seconds)

    def update(self, snapshot: dict[str, Any]) -> None:
        """Lag from a status snapshot; unknown lag (database down) leaves the last value."""
        for projection in snapshot["projections"]:
            if projection["lag"] is not None:
                self.lag_events.labels(projection["name"]).set(projection["lag"])
                self.lag_seconds.labels(projection["name"]).set(projection["lag_seconds"] or 0)
            self._update_versions(projection)

    def _update_versions(self, projection: dict[str, Any]) -> None:
        versions = projection.get("versions")
        if not versions:
            return
        name, build = projection["name"], versions.get("build") or {}
        self.versions.labels(name, "code").set(versions["version"])
        self.versions.labels(name, "serving").set(versions.get("serving_version") or 0)
        self.versions.labels(name, "building").set(build.get("version") or 0)
        if not build or build.get("lag") is not None:
            self.build_lag.labels(name).set(build.get("lag") or 0)

    def record_health(self, verdict: dict[str, Any]) -> None:
        """The monitor's verdict: the health gauges, and what `/healthz` answers."""
        self.health.set(SEVERITY[verdict["status"]])
        worst: dict[str, int] = {}
        for found in verdict["reasons"]:
            if "projection" in found:
                name = found["projection"]
                worst[name] = max(worst.get(name, 0), SEVERITY[found["severity"]])
        for name in self._projections:
            self.projection_health.labels(name).set(worst.get(name, 0))
        self.verdicts.record(verdict)

    def start(self) -> None:
        host, port = split_address(self.address)
        endpoint = HttpEndpoint(host, port, endpoint_app(self.registry, self.verdicts))
        try:
            endpoint.start()
        except EndpointError as exc:
            raise MetricsError(f"metrics_address: {exc}") from None
        self._endpoint = endpoint
        log.info("metrics.listening", address=self.address, paths=["/metrics", "/healthz"])

    def stop(self) -> None:
        if self._endpoint is not None:
            self._endpoint.stop()
            self._endpoint = None
