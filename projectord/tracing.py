"""Traces (OpenTelemetry), from a command to every projection that applied its events.

Three pieces, all optional:
- a span per command dispatch (`dispatch_span`, around `Dispatcher.dispatch`);
- the trace context current at an append (the dispatch's span, or a caller's own) is stored in
  each new event's metadata as W3C `traceparent`/`tracestate` keys (`with_trace_context`, in
  `EventStore`), unless the event already carries one;
- a span per batch per projection (`batch_span`, in the runner), with the projection, the event
  count, the first and last positions, the lag, the attempt and the outcome, and a link to the
  trace of each event it applied: one trace view goes from the command to its events to each
  projection applying them.

projectord only uses the API (the `otel` extra). Whoever runs it configures an SDK and exporter,
e.g. `opentelemetry-instrument projectord run` with the usual `OTEL_*` variables, or
`trace.set_tracer_provider(...)` in a program that embeds it. Without the extra, or without an
SDK, every function here returns after one check, before it looks at any event: no span objects,
no metadata decoding (docs/operations-observability.md has the catch-up figures).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import TYPE_CHECKING, Any

try:
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
except ImportError:  # the `otel` extra is not installed
    trace = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from projectord.event_store import Event

# The most links one batch span carries: the SDK's default span limit. A catch-up batch of
# thousands of events from as many commands links the first ones; the count is an attribute.
MAX_LINKS = 128
TRACE_KEYS = ("traceparent", "tracestate")

_NO_SPAN: AbstractContextManager[None] = nullcontext()
_propagator = TraceContextTextMapPropagator() if trace is not None else None


if trace is not None:
    # Loads a provider named by OTEL_PYTHON_TRACER_PROVIDER into the API's global, if any.
    trace.get_tracer_provider()


def _enabled() -> bool:
    """Whether an SDK is configured. Without one the global provider is unset, or the API's
    no-op one, whose spans record nothing: then nothing is worth building.

    Reads the API's global itself: `trace.get_tracer_provider()` looks up an environment variable
    at every call while no provider is set (about a microsecond), and this runs per batch and per
    appended event. Should the API rename it, tracing goes off and tests/integration/
    test_tracing.py fails."""
    provider = getattr(trace, "_TRACER_PROVIDER", None)
    return provider is not None and not isinstance(
        provider, (trace.ProxyTracerProvider, trace.NoOpTracerProvider)
    )


def _tracer() -> Any | None:
    return trace.get_tracer("projectord") if _enabled() else None


def with_trace_context(metadata: Mapping[str, Any]) -> Mapping[str, Any]:
    """`metadata` with the current span's W3C trace context added, when a span is recording and
    the metadata carries none yet; else `metadata` itself."""
    if _propagator is None or not _enabled() or "traceparent" in metadata:
        return metadata
    carrier: dict[str, str] = {}
    _propagator.inject(carrier)
    if not carrier:  # no current span
        return metadata
    return {**metadata, **carrier}


@contextmanager
def _dispatch(tracer: Any, command: Any) -> Iterator[Any]:
    with tracer.start_as_current_span(
        "projectord.dispatch",
        kind=trace.SpanKind.PRODUCER,
        attributes={
            "projectord.command.id": str(command.id),
            "projectord.command.type": command.type,
            "projectord.tenant_id": str(command.tenant_id),
        },
    ) as span:
        yield span


def dispatch_span(command: Any) -> AbstractContextManager[Any]:
    """The span of one command dispatch; current while the dispatcher appends the events, so
    `with_trace_context` stores its context in them. `record_dispatch` adds the outcome."""
    tracer = _tracer()
    return _NO_SPAN if tracer is None else _dispatch(tracer, command)


def record_dispatch(span: Any, command: Any) -> None:
    """The outcome of a dispatch on its span (`span` is None when not tracing)."""
    if span is None:
        return
    span.set_attribute("projectord.command.status", str(command.status.value))
    span.set_attribute("projectord.command.attempts", int(command.attempts or 0))
    if command.aggregate_id is not None:
        span.set_attribute("projectord.aggregate_id", str(command.aggregate_id))
    if command.error:
        span.set_status(trace.Status(trace.StatusCode.ERROR, str(command.error)))


def _links(events: Sequence[Event]) -> list[Any]:
    """One link per distinct trace context among the events (in order, at most MAX_LINKS).

    Metadata a plain SQL writer stored may be any JSON (`null`, a string, an array): such an
    event has no link, never a failed batch, which it would not be untraced."""
    assert _propagator is not None
    seen: set[tuple[int, int]] = set()
    links = []
    for event in events:
        metadata = event.metadata
        if not isinstance(metadata, dict) or "traceparent" not in metadata:
            continue
        carrier = {key: str(metadata[key]) for key in TRACE_KEYS if key in metadata}
        context = trace.get_current_span(_propagator.extract(carrier)).get_span_context()
        key = (context.trace_id, context.span_id)
        if not context.is_valid or key in seen:
            continue
        seen.add(key)
        links.append(trace.Link(context, {"projectord.event.position": event.global_position}))
        if len(links) == MAX_LINKS:
            break
    return links


@contextmanager
def _batch(
    tracer: Any,
    projection: str,
    events: Sequence[Event],
    attempt: int,
    abandoned: tuple[type[BaseException], ...],
) -> Iterator[None]:
    links = _links(events)
    recorded = events[0].recorded_at
    attributes = {
        "projectord.projection": projection,
        "projectord.batch.event_count": len(events),
        "projectord.batch.first_position": events[0].global_position,
        "projectord.batch.last_position": events[-1].global_position,
        # How long the oldest event of the batch waited for this projection.
        "projectord.batch.lag_seconds": max(0.0, time.time() - recorded.timestamp()),
        "projectord.batch.attempt": attempt,
        "projectord.batch.linked_traces": len(links),
    }
    with tracer.start_as_current_span(
        "projectord.batch",
        kind=trace.SpanKind.CONSUMER,
        attributes=attributes,
        links=links,
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        try:
            yield
        except abandoned:
            span.set_attribute("projectord.batch.outcome", "abandoned")
            raise
        except Exception as exc:
            span.set_attribute("projectord.batch.outcome", "failed")
            span.record_exception(exc)
            span.set_status(trace.Status(trace.StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
            raise
        except BaseException:
            span.set_attribute("projectord.batch.outcome", "cancelled")
            raise
        span.set_attribute("projectord.batch.outcome", "committed")


def batch_span(
    projection: str,
    events: Sequence[Event],
    attempt: int,
    abandoned: tuple[type[BaseException], ...] = (),
) -> AbstractContextManager[None]:
    """The span of one batch a projection applies: `committed`, `failed` (the exception is
    recorded), `abandoned` (one of `abandoned`: the checkpoint moved under it, e.g. a pause) or
    `cancelled` (shutdown)."""
    if not events:
        return _NO_SPAN
    tracer = _tracer()
    return _NO_SPAN if tracer is None else _batch(tracer, projection, events, attempt, abandoned)
