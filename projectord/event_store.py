"""The event store: appending events with optimistic concurrency, and the `Event` handlers receive.

Commit order is `(transaction_id, global_position)`: `global_position` alone is the order in which
positions were *taken*, and a transaction that took position 10 can commit after one that took 11.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import psycopg
from psycopg import AsyncConnection
from psycopg.pq import TransactionStatus
from psycopg.types.json import Jsonb

from projectord.checkpoint import Checkpoint
from projectord.logs import get_logger
from projectord.queries import Queries
from projectord.tracing import with_trace_context
from projectord.upcasting import decode_payload, installed

log = get_logger("projectord.event_store")

# An append refused for order is retried in a fresh transaction, which is newer than the one that
# wrote the aggregate's latest version, so one retry succeeds unless yet another writer gets in.
ORDER_RETRIES = 5


class ConcurrencyError(Exception):
    """Another writer already appended this version of the aggregate; nothing was written."""

    def __init__(self, aggregate_id: uuid.UUID, version: int) -> None:
        super().__init__(
            f"aggregate {aggregate_id} already has version {version}: "
            "another writer appended first; reload the aggregate and retry"
        )
        self.aggregate_id = aggregate_id
        self.version = version


# PostgreSQL's epoch: a timestamptz in binary is microseconds since then (projectord/fetcher.py).
_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)


class Event:
    """One stored event, as a projection handler sees it. Treat it as read-only.

    Built once per event of every batch, so it is built cheaply: a slotted class with a plain
    `__init__` (a frozen dataclass's `__init__` sets each field through `object.__setattr__` and
    cost five times more, a tenth of a catch-up). `payload` and `metadata` may arrive as JSON text,
    `recorded_at` as microseconds since 2000-01-01 (PostgreSQL's epoch: a timestamptz's binary
    form) and `event_id` as its 16 bytes (that is how the runner fetches them): each is decoded on
    first access and kept, so a projection pays only for what it reads. Decoding jsonb and
    timestamptz was most of a lean catch-up's client time, and the event id, which few handlers
    read, a sixth of what was left of a row's fetch. `recorded_at` is then in UTC.

    `schema_version` is the version of the payload's shape as stored; `payload` is always in the
    current shape: decoding it runs the installed upcasters from there (projectord/upcasting.py),
    and raises `SchemaVersionTooNew` or `UpcastFailed` (on every read, until it succeeds).
    """

    __slots__ = (
        "_event_id",
        "_metadata",
        "_payload",
        "_payload_raw",
        "_recorded_at",
        "aggregate_id",
        "aggregate_type",
        "global_position",
        "schema_version",
        "tenant_id",
        "transaction_id",
        "type",
        "version",
    )

    def __init__(
        self,
        global_position: int,
        event_id: uuid.UUID | bytes,
        tenant_id: uuid.UUID,
        aggregate_id: uuid.UUID,
        aggregate_type: str,
        version: int,
        type: str,
        payload: dict[str, Any] | str | bytes,
        metadata: dict[str, Any] | str | bytes,
        recorded_at: datetime | int,
        transaction_id: int = 0,
        schema_version: int = 1,
    ) -> None:
        self.global_position = global_position
        self._event_id = event_id
        self.tenant_id = tenant_id
        self.aggregate_id = aggregate_id
        self.aggregate_type = aggregate_type
        self.version = version
        self.type = type
        self._payload_raw = payload
        self._payload: dict[str, Any] | None = None  # decoded, in the current shape
        self._metadata = metadata
        self._recorded_at = recorded_at
        self.transaction_id = transaction_id
        self.schema_version = schema_version

    @property
    def event_id(self) -> uuid.UUID:
        value = self._event_id
        if type(value) is bytes:
            value = self._event_id = uuid.UUID(bytes=value)
        return value  # type: ignore[return-value]

    @property
    def payload(self) -> dict[str, Any]:
        value = self._payload
        if value is None:
            value = self._payload = decode_payload(
                self.type, self.schema_version, self._payload_raw
            )
            self._payload_raw = None  # held no longer than before upcasting: text or dict
        return value

    @property
    def metadata(self) -> dict[str, Any]:
        value = self._metadata
        if isinstance(value, (str, bytes)):
            value = self._metadata = orjson.loads(value)
        return value

    @property
    def recorded_at(self) -> datetime:
        value = self._recorded_at
        if isinstance(value, int):
            value = self._recorded_at = _EPOCH + timedelta(microseconds=value)
        return value

    @property
    def commit_position(self) -> Checkpoint:
        return Checkpoint(self.transaction_id, self.global_position)

    def _fields(self) -> tuple[Any, ...]:
        return (
            self.global_position,
            self.event_id,
            self.tenant_id,
            self.aggregate_id,
            self.aggregate_type,
            self.version,
            self.type,
            self.payload,
            self.metadata,
            self.recorded_at,
            self.transaction_id,
            self.schema_version,
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Event):
            return NotImplemented
        return self._fields() == other._fields()

    def __hash__(self) -> int:
        return hash((self.global_position, self.event_id))

    def __repr__(self) -> str:
        return (
            f"Event(global_position={self.global_position}, type={self.type!r},"
            f" aggregate_id={self.aggregate_id}, version={self.version},"
            f" schema_version={self.schema_version}, event_id={self.event_id})"
        )


@dataclass(slots=True)
class NewEvent:
    """An event to append. `version` is the aggregate's version this event creates;
    `schema_version` the version of its payload's shape: None (the default) records the current
    version of its type, as the installed upcasters say (projectord/upcasting.py)."""

    tenant_id: uuid.UUID
    aggregate_id: uuid.UUID
    version: int
    type: str
    payload: Mapping[str, Any] = field(default_factory=dict)
    metadata: Mapping[str, Any] = field(default_factory=dict)
    aggregate_type: str = ""
    event_id: uuid.UUID = field(default_factory=uuid.uuid4)
    schema_version: int | None = None


class EventStore:
    """Appends to and reads from `<schema>.events` over a caller-supplied connection.

    Appends run in the caller's transaction, so a command handler can append and record its outcome
    atomically. The UNIQUE (aggregate_id, version) constraint is the concurrency check: two writers
    appending the same version cannot both commit. The store's trigger keeps each aggregate's
    versions in commit order (sql/migrations/0010_append_order.sql): it refuses with SQLSTATE 40001
    an append from a transaction older than the one that wrote the aggregate's latest version.
    """

    def __init__(self, schema: str = "projectord") -> None:
        self.schema = schema
        self._queries = Queries(schema)

    async def append(self, conn: AsyncConnection[Any], events: Sequence[NewEvent]) -> list[int]:
        """Append atomically; a version clash raises `ConcurrencyError` and writes nothing.

        On a connection outside any transaction the append is its own transaction, and one the
        store refuses for order (40001) is retried at once in a fresh transaction, which gets a
        newer id. Inside the caller's transaction it cannot be: the savepoint is rolled back and
        `psycopg.errors.SerializationFailure` propagates, for the caller to retry its whole
        transaction (as `Dispatcher` does).
        """
        if not events:
            return []
        own_transaction = conn.info.transaction_status == TransactionStatus.IDLE
        for attempt in range(1, ORDER_RETRIES + 1):
            try:
                return await self._append_once(conn, events)
            except psycopg.errors.SerializationFailure:
                if not own_transaction or attempt == ORDER_RETRIES:
                    raise
                log.info("append.order_retry", attempt=attempt)
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def _append_once(
        self, conn: AsyncConnection[Any], events: Sequence[NewEvent]
    ) -> list[int]:
        params = {
            "event_ids": [e.event_id for e in events],
            "tenant_ids": [e.tenant_id for e in events],
            "aggregate_ids": [e.aggregate_id for e in events],
            "aggregate_types": [e.aggregate_type for e in events],
            "versions": [e.version for e in events],
            "types": [e.type for e in events],
            "payloads": [Jsonb(dict(e.payload)) for e in events],
            # The current trace context (a dispatch's span) goes along: projectord/tracing.py.
            "metadata": [Jsonb(dict(with_trace_context(e.metadata))) for e in events],
            "schema_versions": [_schema_version(e) for e in events],
        }
        try:
            async with conn.transaction():
                cur = await conn.execute(self._queries["append_events"], params)
                positions = sorted(row[0] for row in await cur.fetchall())
        except psycopg.errors.UniqueViolation as exc:
            constraint = exc.diag.constraint_name or ""
            if "aggregate_id" in constraint or "version" in constraint:
                clash = _find_clash(events, str(exc))
                raise ConcurrencyError(clash.aggregate_id, clash.version) from None
            raise
        return positions

    async def aggregate_version(self, conn: AsyncConnection[Any], aggregate_id: uuid.UUID) -> int:
        cur = await conn.execute(self._queries["aggregate_version"], {"aggregate_id": aggregate_id})
        row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def load(
        self, conn: AsyncConnection[Any], aggregate_id: uuid.UUID, after_version: int = 0
    ) -> list[Event]:
        """The events of one aggregate in version order."""
        cur = await conn.execute(
            self._queries["load_aggregate"],
            {"aggregate_id": aggregate_id, "after_version": after_version},
        )
        return [event_from_row(row) for row in await cur.fetchall()]


def event_from_row(row: Sequence[Any]) -> Event:
    """Build an `Event` from the columns in the order the queries select them: the event's fields
    in declaration order, then the transaction id, as text (xid8 has no binary loader), and the
    payload's schema version."""
    *fields, txid, schema_version = row
    return Event(*fields, int(txid), schema_version)


def _schema_version(event: NewEvent) -> int:
    """What an append records: the version given, or the current one of the event's type."""
    if event.schema_version is not None:
        return event.schema_version
    return installed().current_version(event.type)


def _find_clash(events: Sequence[NewEvent], detail: str) -> NewEvent:
    for event in events:
        if str(event.aggregate_id) in detail and f", {event.version})" in detail:
            return event
    return events[0]
