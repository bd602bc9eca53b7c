"""Commands and the command store, `<schema>.commands`.

A command is a request to change one aggregate. Its id is the client's idempotency key: the store
keeps one row per id, so a command sent twice (a retried request, a duplicate message) is decided
once and the second send reads the first outcome.

Statuses: `pending` (stored, not decided yet), `consumed` (decided: its events are appended, and
`result` says which), `processed` (a read-your-writes dispatch saw the projections it waited for
apply those events), `failed` (refused or invalid: `error` says why, and it appended nothing).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import orjson
from psycopg import AsyncConnection
from psycopg.types.json import Jsonb

from projectord.queries import Queries


class CommandStatus(StrEnum):
    PENDING = "pending"
    CONSUMED = "consumed"
    PROCESSED = "processed"
    FAILED = "failed"

    @property
    def succeeded(self) -> bool:
        return self in (CommandStatus.CONSUMED, CommandStatus.PROCESSED)


@dataclass(slots=True)
class Command:
    """A command as submitted, and, once dispatched, as stored with its outcome."""

    tenant_id: uuid.UUID
    type: str
    payload: Mapping[str, Any] = field(default_factory=dict)
    id: uuid.UUID = field(default_factory=uuid.uuid4)
    metadata: Mapping[str, Any] = field(default_factory=dict)
    status: CommandStatus = CommandStatus.PENDING
    aggregate_id: uuid.UUID | None = None
    result: dict[str, Any] | None = None
    error: str | None = None
    attempts: int = 0

    def __post_init__(self) -> None:
        self.payload = json_object(self.payload, "payload")
        self.metadata = json_object(self.metadata, "metadata")

    def same_request_as(self, other: Command) -> bool:
        """Whether `other` asks for the same thing (a true duplicate, not a reused id)."""
        return (self.tenant_id, self.type, dict(self.payload)) == (
            other.tenant_id,
            other.type,
            dict(other.payload),
        )

    def as_dict(self) -> dict[str, Any]:
        """The command as JSON-ready values, for `dispatch --json` and logs."""
        return {
            "id": str(self.id),
            "tenant_id": str(self.tenant_id),
            "type": self.type,
            "payload": dict(self.payload),
            "metadata": dict(self.metadata),
            "status": self.status.value,
            "aggregate_id": str(self.aggregate_id) if self.aggregate_id else None,
            "result": self.result,
            "error": self.error,
            "attempts": self.attempts,
        }


def json_object(value: Mapping[str, Any], what: str) -> dict[str, Any]:
    """`value` as it reads back from jsonb (UUIDs and dates become strings), so a command compares
    equal to its stored copy; anything JSON cannot hold is refused here, before it is stored."""
    if not isinstance(value, Mapping):
        raise TypeError(f"command {what} must be a JSON object, not {type(value).__name__}")
    try:
        decoded: dict[str, Any] = orjson.loads(orjson.dumps(dict(value)))
    except TypeError as exc:
        raise TypeError(f"command {what} is not JSON: {exc}") from None
    return decoded


def command_from_row(row: Sequence[Any]) -> Command:
    """Build a `Command` from the columns in the order the command queries select them."""
    id_, tenant_id, type_, payload, metadata, status, aggregate_id, result, error, attempts = row
    return Command(
        tenant_id=tenant_id,
        type=type_,
        payload=payload,
        id=id_,
        metadata=metadata,
        status=CommandStatus(status),
        aggregate_id=aggregate_id,
        result=result,
        error=error,
        attempts=attempts,
    )


class CommandStore:
    """Reads and writes `<schema>.commands` over a caller-supplied connection."""

    def __init__(self, schema: str = "projectord") -> None:
        self._queries = Queries(schema)

    async def store(self, conn: AsyncConnection[Any], command: Command) -> bool:
        """Store the command as pending; False when its id was stored before."""
        cur = await conn.execute(
            self._queries["store_command"],
            {
                "id": command.id,
                "tenant_id": command.tenant_id,
                "type": command.type,
                "payload": Jsonb(dict(command.payload)),
                "metadata": Jsonb(dict(command.metadata)),
            },
        )
        return await cur.fetchone() is not None

    async def lock(self, conn: AsyncConnection[Any], command_id: uuid.UUID) -> Command:
        """The stored command, row-locked for the rest of the caller's transaction."""
        return await self._read_one(conn, "lock_command", command_id)

    async def get(self, conn: AsyncConnection[Any], command_id: uuid.UUID) -> Command | None:
        cur = await conn.execute(self._queries["read_command"], {"id": command_id})
        row = await cur.fetchone()
        return command_from_row(row) if row else None

    async def finish(self, conn: AsyncConnection[Any], command: Command) -> None:
        """Record a pending command's outcome (`status`, `result`, `error`, `attempts`)."""
        await conn.execute(
            self._queries["finish_command"],
            {
                "id": command.id,
                "status": command.status.value,
                "aggregate_id": command.aggregate_id,
                "result": Jsonb(command.result) if command.result is not None else None,
                "error": command.error,
                "attempts": command.attempts,
            },
        )

    async def mark_processed(self, conn: AsyncConnection[Any], command_id: uuid.UUID) -> None:
        await conn.execute(self._queries["mark_command_processed"], {"id": command_id})

    async def _read_one(
        self, conn: AsyncConnection[Any], query: str, command_id: uuid.UUID
    ) -> Command:
        cur = await conn.execute(self._queries[query], {"id": command_id})
        row = await cur.fetchone()
        if row is None:
            raise LookupError(f"command {command_id} is not stored")
        return command_from_row(row)
