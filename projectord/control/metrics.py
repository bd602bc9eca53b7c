"""Prometheus metrics on an optional local HTTP address (`metrics_address`, off by default).

Counters and the batch histogram are fed as batches commit; per-projection lag comes from the
monitor's periodic status snapshot (it needs the database); states, errors and the listener are
read from the runners when Prometheus scrapes. The endpoint runs in prometheus-client's own
thread, so a busy event loop does not make scrapes time out.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

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


class Metrics:
    def __init__(self, address: str) -> None:
        self.address = address
        self.registry = CollectorRegistry()
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
        self._server: Any = None

    def watch(self, runners: Sequence[ProjectionRunner], listener: NotificationListener) -> None:
        """Report the runners' states and errors and the listener at every scrape."""
        self.registry.register(_RunnerCollector(runners, listener))

    def observe_batch(self, projection: str, count: int, seconds: float) -> None:
        self.applied.labels(projection).inc(count)
        self.batch_seconds.labels(projection).observe(seconds)

    def update(self, snapshot: dict[str, Any]) -> None:
        """Lag from a status snapshot; unknown lag (database down) leaves the last value."""
        for projection in snapshot["projections"]:
            if projection["lag"] is not None:
                self.lag_events.labels(projection["name"]).set(projection["lag"])
                self.lag_seconds.labels(projection["name"]).set(projection["lag_seconds"] or 0)

    def start(self) -> None:
        host, port = split_address(self.address)
        try:
            self._server, _ = start_http_server(port, host, registry=self.registry)
        except OSError as exc:
            raise MetricsError(f"metrics_address: cannot listen on {self.address}: {exc}") from None
        log.info("metrics.listening", address=self.address)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
