"""Traces from a command to every projection that applied its events (issue 15 §6), read from
the OpenTelemetry SDK's in-memory exporter: a span per dispatch, its trace context in the events'
metadata, and a span per batch per projection linking to the traces of the events it applied."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import anyio
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.util._once import Once

from projectord import Projection
from projectord.commands.aggregate import CommandRegistry
from projectord.commands.dispatch import Dispatcher
from projectord.commands.store import Command
from projectord.database import connect, make_pool
from projectord.queries import Queries
from projectord.runner.loop import BatchFailed, ProjectionRunner
from projectord.samples import Account, demo_projections
from tests.support.harness import TENANT, TestDatabase
from tests.support.ops_projections import ledger_and_picky
from tests.support.ops_support import credit, ledger_rows
from tests.support.projections import Picky

SAMPLES = "projectord.samples:demo_projections"


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """An SDK with the in-memory exporter for this test only; the API's globals are put back
    afterwards (as OpenTelemetry's own test helpers do), so other tests run untraced."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    try:
        yield exporter
    finally:
        provider.shutdown()
        trace._TRACER_PROVIDER_SET_ONCE = Once()
        trace._TRACER_PROVIDER = None


def deposit(amount: int) -> Command:
    return Command(TENANT, "Deposit", {"account_id": str(uuid.uuid4()), "amount": amount})


def dispatch_all(db: TestDatabase, commands: list[Command]) -> None:
    dispatcher = Dispatcher(CommandRegistry([Account]))

    async def main() -> None:
        async with await connect(db.url, autocommit=True) as conn:
            for command in commands:
                await dispatcher.dispatch(conn, command)

    anyio.run(main)


def apply_all(db: TestDatabase, projections: list[Projection]) -> list[Exception]:
    """Each projection applies what there is, batch by batch, in this process; the errors of
    failed batches are returned."""
    errors: list[Exception] = []

    async def main() -> None:
        pool = make_pool(db.url, max_size=3, read_model_schema="public")
        await pool.open(wait=True)
        try:
            for projection in projections:
                runner = ProjectionRunner(
                    projection, pool, Queries("projectord"), batch_size=100, poll_interval=60
                )
                await runner._load_checkpoint()
                try:
                    while (await runner.step()).events:
                        pass
                except BatchFailed as failed:
                    errors.append(failed.error)
        finally:
            await pool.close()

    anyio.run(main)
    return errors


def named(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [span for span in exporter.get_finished_spans() if span.name == name]


def test_a_trace_leads_from_the_command_to_each_projection(
    db: TestDatabase, spans: InMemorySpanExporter
) -> None:
    db.init(SAMPLES)
    commands = [deposit(10), deposit(20)]
    dispatch_all(db, commands)
    credit(db)  # a plain SQL append, outside any trace: no link for it

    dispatches = named(spans, "projectord.dispatch")
    assert [s.attributes["projectord.command.id"] for s in dispatches] == [
        str(c.id) for c in commands
    ]
    assert all(s.attributes["projectord.command.status"] == "consumed" for s in dispatches)
    # Each event carries the context of the dispatch that appended it.
    stored = db.rows(
        "SELECT metadata->>'command_id', metadata->>'traceparent' FROM projectord.events"
        " WHERE metadata ? 'command_id' ORDER BY global_position"
    )
    contexts = {(s.context.trace_id, s.context.span_id) for s in dispatches}
    for span, (command_id, traceparent) in zip(dispatches, stored, strict=True):
        assert command_id == span.attributes["projectord.command.id"]
        assert traceparent.startswith(
            f"00-{span.context.trace_id:032x}-{span.context.span_id:016x}-"
        )
    assert db.scalar("SELECT count(*) FROM projectord.events WHERE metadata ? 'traceparent'") == 2

    assert apply_all(db, demo_projections()) == []
    positions = db.rows("SELECT min(global_position), max(global_position) FROM projectord.events")
    batches = {s.attributes["projectord.projection"]: s for s in named(spans, "projectord.batch")}
    assert set(batches) == {"balances", "activity"}
    for name, span in batches.items():
        attributes: dict[str, Any] = dict(span.attributes or {})
        assert attributes["projectord.batch.outcome"] == "committed", name
        assert attributes["projectord.batch.attempt"] == 1
        assert attributes["projectord.batch.event_count"] == 2
        assert attributes["projectord.batch.first_position"] == positions[0][0]
        assert attributes["projectord.batch.last_position"] <= positions[0][1]
        assert attributes["projectord.batch.lag_seconds"] >= 0
        linked = {(link.context.trace_id, link.context.span_id) for link in span.links}
        assert linked == contexts, f"{name} does not link to the dispatches that led to it"
        # Its own trace is new: the batch is not a child of either command.
        assert span.parent is None


def test_a_failed_batch_says_so(db: TestDatabase, spans: InMemorySpanExporter) -> None:
    db.init("tests.support.ops_projections:ledger_and_picky")
    credit(db, poison=True)
    (error,) = apply_all(db, [Picky()])
    (span,) = named(spans, "projectord.batch")
    assert span.attributes["projectord.batch.outcome"] == "failed"
    assert span.status.status_code is trace.StatusCode.ERROR
    assert str(error) in (span.status.description or "")
    assert [event.name for event in span.events] == ["exception"]


def test_without_an_sdk_nothing_is_traced_or_stored(db: TestDatabase) -> None:
    """The `otel` extra installed, but no SDK configured: the events carry no trace context."""
    assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
    db.init(SAMPLES)
    dispatch_all(db, [deposit(5)])
    assert db.scalar("SELECT count(*) FROM projectord.events WHERE metadata ? 'traceparent'") == 0
    assert apply_all(db, demo_projections()) == []


def test_metadata_a_foreign_writer_left_odd_never_breaks_a_batch(
    db: TestDatabase, spans: InMemorySpanExporter
) -> None:
    """A plain SQL writer may store any JSON as metadata: `null`, a string, an array, a garbled
    `traceparent`. Linking a batch span reads the metadata of every event; an event the links
    cannot use gets none, and the batch applies as it would untraced."""
    db.init("tests.support.ops_projections:ledger_and_picky")
    odd = [
        "null",
        '"traceparent"',
        '["traceparent"]',
        "7",
        '{"traceparent": "garbage"}',
        '{"traceparent": {"nested": 1}, "tracestate": [1]}',
    ]
    with db.connect() as conn:
        for metadata in odd:
            conn.execute(
                "INSERT INTO projectord.events (tenant_id, aggregate_id, version, type, payload,"
                " metadata) VALUES (%s, gen_random_uuid(), 1, 'Credited',"
                ' \'{"account": 1, "amount": 1}\', %s::jsonb)',
                (TENANT, metadata),
            )
    projection = next(p for p in ledger_and_picky() if p.name == "ledger")
    assert apply_all(db, [projection]) == []
    assert ledger_rows(db) == [(1, len(odd), len(odd))]
    (span,) = named(spans, "projectord.batch")
    assert span.attributes["projectord.batch.outcome"] == "committed"
    assert list(span.links) == []
