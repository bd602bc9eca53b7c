"""Liveness and lag as health sees them: a heartbeat's staleness, the lag thresholds, a stalled
loop, and the one-line summary systemd shows. Evaluated on status snapshots built by hand; with
the database marked unreachable, `evaluate` asks it nothing."""

from __future__ import annotations

import time
from typing import Any

import anyio
import pytest

from projectord.control.health import HealthCheck, Thresholds
from projectord.control.status import summary_line
from projectord.daemon.heartbeat import Heartbeat

THRESHOLDS = Thresholds(max_lag=100, max_lag_seconds=60.0, horizon_seconds=5.0, stall_timeout=30.0)


# -- heartbeat --------------------------------------------------------------------------------


def test_a_loop_is_stale_for_the_time_since_its_last_beat() -> None:
    beat = Heartbeat("runner balances")
    beat.last = 1000.0
    assert beat.stalled_for(now=1012.5) == 12.5
    beat.beat()
    assert beat.stalled_for(now=beat.last + 1) == 1.0


def test_a_deliberate_wait_is_never_stale_and_ends_with_a_beat() -> None:
    beat = Heartbeat("listener")
    beat.last = 0.0
    with beat.waiting():
        assert beat.stalled_for(now=10_000.0) == 0.0
        with beat.waiting():  # nested waits: still waiting after the inner one ends
            pass
        assert beat.stalled_for(now=10_000.0) == 0.0
    assert beat.last > 0.0  # leaving the wait counts as progress
    assert beat.stalled_for(now=beat.last) == 0.0


def test_a_clock_going_backwards_is_not_negative_staleness() -> None:
    beat = Heartbeat("x")
    beat.last = 50.0
    assert beat.stalled_for(now=10.0) == 0.0


# -- health on a snapshot -----------------------------------------------------------------------


def projection(name: str = "p", **fields: Any) -> dict[str, Any]:
    return {"name": name, "state": "running", "last_error": None, "lag": 0, "lag_seconds": 0.0,
            "rebuild": None} | fields  # fmt: skip


def snapshot(*projections: dict[str, Any]) -> dict[str, Any]:
    return {
        "instance": "host-1",
        "stopping": False,
        "database": {"reachable": False, "error": "connection refused"},
        "listener": {"connected": True},
        "projections": list(projections),
    }


def evaluate(snap: dict[str, Any], *beats: Heartbeat) -> tuple[str, set[str]]:
    check = HealthCheck(reporter=None, heartbeats=beats, thresholds=THRESHOLDS)  # type: ignore[arg-type]
    report = anyio.run(check.evaluate, snap)
    codes = {r["code"] for r in report["reasons"]} - {"database_unreachable"}
    return report["status"], codes


@pytest.mark.parametrize(
    ("lag", "seconds", "lagging"),
    [
        (100, 60.0, False),  # at the thresholds: fine
        (101, 0.0, True),
        (0, 60.5, True),
        (None, None, False),  # lag unknown (database away): not reported as lag
    ],
)
def test_lag_beyond_either_threshold_degrades(
    lag: int | None, seconds: float | None, lagging: bool
) -> None:
    _, codes = evaluate(snapshot(projection(lag=lag, lag_seconds=seconds)))
    assert ("projection_lagging" in codes) is lagging


@pytest.mark.parametrize(
    ("state", "code", "status"),
    [
        ("failed", "projection_failing", "failing"),
        ("refused", "projection_refused", "failing"),
        ("retrying", "projection_retrying", "degraded"),
        ("paused", "projection_paused", "degraded"),
    ],
)
def test_projection_states_that_need_attention(state: str, code: str, status: str) -> None:
    error = {"message": "boom", "attempts": 5, "event_id": "e1", "event_type": "T"}
    worst, codes = evaluate(snapshot(projection(state=state, last_error=error)))
    assert codes == {code}
    assert worst == status  # the database just went away: that alone is only degraded


def test_a_stalled_loop_fails_health_and_a_waiting_one_does_not() -> None:
    stalled, waiting = Heartbeat("runner a"), Heartbeat("runner b")
    stalled.last = waiting.last = time.monotonic() - 10 * THRESHOLDS.stall_timeout
    with waiting.waiting():
        status, codes = evaluate(snapshot(projection()), stalled, waiting)
    assert status == "failing"
    assert codes == {"loop_stalled"}


def test_a_listener_down_and_a_stopping_daemon_degrade() -> None:
    snap = snapshot(projection())
    snap["listener"]["connected"] = False
    snap["stopping"] = True
    assert evaluate(snap)[1] == {"listener_down", "stopping"}


def test_summary_line_counts_failures_and_the_largest_lag() -> None:
    snap = snapshot(
        projection("a", lag=3),
        projection("b", state="failed", lag=12),
        projection("c", state="paused", lag=None),
    )
    snap["database"]["reachable"] = True
    assert summary_line(snap) == "3 projections, 1 failed, 1 paused, max lag 12"
    snap["database"]["reachable"] = False
    assert summary_line(snap) == "3 projections, 1 failed, 1 paused, database unreachable"
