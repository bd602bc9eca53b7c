"""Tracing off costs one check (issue 15 §6): without the `otel` extra, or with it but no SDK,
the runner's batch span and the append's trace context return before they look at any event."""

from __future__ import annotations

import subprocess
import sys
import uuid

from projectord import tracing
from projectord.event_store import Event
from tests.support.harness import ROOT

# Events whose metadata is not JSON: decoding it (which tracing must not do when off) raises.
UNREADABLE = [
    Event(n, uuid.uuid4(), uuid.uuid4(), uuid.uuid4(), "", 1, "T", b"{}", b"not json", 0)
    for n in (1, 2)
]


def test_no_sdk_configured() -> None:
    with tracing.batch_span("p", UNREADABLE, 1) as span:
        assert span is None
    metadata = {"command_id": "c"}
    assert tracing.with_trace_context(metadata) is metadata
    assert tracing.dispatch_span(object()).__enter__() is None


def test_without_the_extra() -> None:
    """opentelemetry cannot be imported at all (sys.modules blocks it)."""
    script = """
import sys
sys.modules["opentelemetry"] = None
from projectord import tracing
from tests.unit.test_tracing_off import UNREADABLE
assert tracing.trace is None
with tracing.batch_span("p", UNREADABLE, 1) as span:
    assert span is None
m = {}
assert tracing.with_trace_context(m) is m
print("ok")
"""
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.stdout.strip() == "ok", result.stderr
