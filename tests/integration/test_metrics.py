"""The optional Prometheus endpoint of a real daemon process."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.support.harness import TestDatabase, run_cli, wait_until
from tests.support.ops_support import ask, credit, start

LEDGER = "tests.support.projections:ledger_only"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def scrape(address: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(address: str, name: str, **labels: str) -> float | None:
    return scrape(address).get((name, tuple(sorted(labels.items()))))


def test_metrics_endpoint(db: TestDatabase, state_dir: Path) -> None:
    address = f"127.0.0.1:{free_port()}"
    with start(db, LEDGER, state_dir, {"PROJECTORD_METRICS_ADDRESS": address}) as daemon:
        for _ in range(3):
            credit(db)
        wait_until(
            lambda: value(address, "projectord_events_applied_total", projection="ledger") == 3,
            timeout=10,
        )
        assert value(address, "projectord_batch_duration_seconds_count", projection="ledger")
        assert value(address, "projectord_errors_total", projection="ledger") == 0
        assert value(address, "projectord_listener_connected") == 1
        assert (
            value(address, "projectord_projection_state", projection="ledger", state="running") == 1
        )
        ask(state_dir, "pause", name="ledger")
        credit(db)
        credit(db)
        wait_until(
            lambda: (
                value(address, "projectord_projection_state", projection="ledger", state="paused")
                == 1
            ),
            timeout=10,
        )
        # Lag comes from the monitor's periodic look (every 5 s).
        wait_until(
            lambda: value(address, "projectord_lag_events", projection="ledger") == 2, timeout=15
        )
        assert (value(address, "projectord_lag_seconds", projection="ledger") or 0) > 0
        assert daemon.stop() == 0


def test_metrics_address_is_checked(tmp_path: Path) -> None:
    result = run_cli(
        "run", "--state-dir", str(tmp_path / "s"), env={"PROJECTORD_METRICS_ADDRESS": "localhost"}
    )
    assert result.returncode == 2
    assert "metrics_address" in result.stderr and "HOST:PORT" in result.stderr


def get(address: str, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://{address}{path}", timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def test_series_from_the_start_health_gauges_and_probes(db: TestDatabase, state_dir: Path) -> None:
    """Every configured projection has its series at zero before it applies anything; the
    process, platform and build series are there; `/healthz` follows the verdict (200 while ok,
    503 once a projection fails) and the health gauges name the failing projection; any other
    path is a 404."""
    address = f"127.0.0.1:{free_port()}"
    env = {"PROJECTORD_METRICS_ADDRESS": address, "PROJECTORD_MAX_ATTEMPTS": "1"}
    specs = "tests.support.ops_projections:ledger_and_picky"
    with start(db, specs, state_dir, env) as daemon:
        wait_until(lambda: get(address, "/healthz")[0] == 200, timeout=15)
        assert json.loads(get(address, "/healthz")[1])["status"] == "ok"
        samples = scrape(address)
        for name in ("ledger", "picky"):
            label = (("projection", name),)
            for series in (
                "projectord_events_applied_total",
                "projectord_batch_duration_seconds_count",
                "projectord_lag_events",
                "projectord_lag_seconds",
                "projectord_errors_total",
                "projectord_projection_health",
            ):
                assert samples.get((series, label)) == 0, (series, name)
        assert samples[("projectord_health", ())] == 0
        ((_, build_labels),) = [k for k in samples if k[0] == "projectord_build_info"]
        assert dict(build_labels)["version"] and dict(build_labels)["python_version"]
        assert samples[("process_resident_memory_bytes", ())] > 0
        assert any(name == "python_info" for name, _ in samples)
        for path in ("/", "/metrics/x", "/health", "/favicon.ico"):
            assert get(address, path)[0] == 404, path

        credit(db, poison=True)  # picky stops on it (one attempt): failing
        wait_until(lambda: get(address, "/healthz")[0] == 503, timeout=20)
        verdict = json.loads(get(address, "/healthz")[1])
        assert verdict["status"] == "failing" and any("picky" in r for r in verdict["reasons"])
        assert value(address, "projectord_health") == 2
        assert value(address, "projectord_projection_health", projection="picky") == 2
        assert value(address, "projectord_projection_health", projection="ledger") == 0
        assert value(address, "projectord_events_applied_total", projection="ledger") == 1
        assert daemon.stop() == 0
