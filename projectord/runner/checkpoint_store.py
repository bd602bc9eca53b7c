"""The one owner of the positions table (`projection_positions`): every statement on it.

One row per projection holds its checkpoint, its state (`running`, `paused`, `failed`), the count
of events it applied, its last error, the daemon instance that owns it and the version of the
projection whose tables it belongs to (a row `NAME#vN` is a version being built or kept:
docs/evolution.md). The runner moves the
checkpoint inside its batch transaction; operator requests, ownership, the online rebuild, status,
`wait`, dead-letter retries, drift and `init` read or write the row. They all do it through
`CheckpointStore`, whose SQL is in sql/queries/positions.sql, so a change of how a checkpoint is
stored is made here and there only.

The store runs each statement on the connection it is given, inside whatever transaction,
pipeline and deadline the caller holds: the checkpoint's compare-and-set must commit with the
handler's writes, a rebuild's reset with its TRUNCATE, a retry's count with its handler.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg import AsyncConnection
from psycopg.types.json import Jsonb

from projectord.checkpoint import Checkpoint
from projectord.queries import Queries

# What the compare-and-set raises when the row moved
# (sql/migrations/0008_checkpoint_moved_error.sql).
CHECKPOINT_MOVED_SQLSTATE = "PJ001"


class CheckpointMoved(Exception):
    """The stored checkpoint is not the one this runner read: someone else moved it."""


def is_checkpoint_moved(exc: BaseException) -> bool:
    """Whether the compare-and-set (or its check) refused: the row is not as the runner read it."""
    return isinstance(exc, psycopg.Error) and exc.sqlstate == CHECKPOINT_MOVED_SQLSTATE


@dataclass(frozen=True)
class StoredPosition:
    """A projection's row in the positions table."""

    name: str
    checkpoint: Checkpoint
    state: str  # running, paused or failed
    applied_total: int
    last_error: dict[str, Any] | None
    updated_at: datetime | None
    owner: str | None  # the daemon instance that owns the projection; None: never owned
    version: int = 1  # the projection's version whose tables this checkpoint belongs to

    @classmethod
    def of_row(cls, row: Sequence[Any]) -> StoredPosition:
        name, txid, position, state, applied, error, updated_at, owner, version = row
        return cls(
            name,
            Checkpoint.parse(txid, position),
            state,
            int(applied),
            error,
            updated_at,
            owner,
            int(version),
        )


class CheckpointStore:
    """Reads and writes the positions rows of one installation (its schema is in `queries`)."""

    def __init__(self, queries: Queries) -> None:
        self.queries = queries

    async def _run(
        self, conn: AsyncConnection[Any], query: str, params: dict[str, Any] | None = None
    ) -> psycopg.AsyncCursor[Any]:
        return await conn.execute(self.queries[query], params)

    # -- reading ---------------------------------------------------------------------------------

    async def ensure(self, conn: AsyncConnection[Any], name: str, version: int = 1) -> None:
        """The projection's row, at the start (and as `version`) if it has none yet."""
        await self._run(conn, "ensure_position", {"name": name, "version": version})

    async def read(self, conn: AsyncConnection[Any], name: str) -> StoredPosition | None:
        cur = await self._run(conn, "read_position", {"name": name})
        row = await cur.fetchone()
        return StoredPosition.of_row(row) if row is not None else None

    async def read_all(self, conn: AsyncConnection[Any]) -> list[StoredPosition]:
        """Every row, by name."""
        cur = await self._run(conn, "read_positions")
        return [StoredPosition.of_row(row) for row in await cur.fetchall()]

    async def lock(self, conn: AsyncConnection[Any], name: str) -> Checkpoint | None:
        """The checkpoint, held still (FOR UPDATE) until the caller's transaction ends."""
        cur = await self._run(conn, "lock_position", {"name": name})
        row = await cur.fetchone()
        return Checkpoint.parse(row[0], row[1]) if row is not None else None

    async def has_applied_events(
        self, conn: AsyncConnection[Any], name: str, types: Sequence[str]
    ) -> bool:
        """Whether the checkpoint is past any event of these types."""
        cur = await self._run(
            conn, "projection_has_applied_events", {"name": name, "types": list(types)}
        )
        row = await cur.fetchone()
        return bool(row and row[0])

    async def newest_transaction_id(self, conn: AsyncConnection[Any]) -> int | None:
        """The highest transaction id of any checkpoint; None without a row."""
        cur = await self._run(conn, "newest_checkpoint_transaction")
        row = await cur.fetchone()
        return int(row[0]) if row is not None else None

    # -- the compare-and-set ---------------------------------------------------------------------

    async def check(
        self,
        conn: AsyncConnection[Any],
        name: str,
        expected: Checkpoint,
        *,
        owner: str | None,
        even_if_paused: bool = False,
        version: int = 1,
    ) -> None:
        """Fail (SQLSTATE PJ001) unless the row is still at `expected`, runnable, `owner`'s and
        of `version`. Takes no lock; `advance` decides at the end of the transaction."""
        await self._compare_and_set(
            conn, "check_checkpoint", name, expected, expected, 0, owner, even_if_paused, version
        )

    async def advance(
        self,
        conn: AsyncConnection[Any],
        name: str,
        expected: Checkpoint,
        new: Checkpoint,
        applied: int,
        *,
        owner: str | None,
        even_if_paused: bool = False,
        version: int = 1,
    ) -> None:
        """Move the checkpoint from `expected` to `new`, counting `applied` events; fail (SQLSTATE
        PJ001, so COMMIT may be sent along with it) where the row does not match. A pause, a
        `failed` state, another owner or another version make it fail too (an operator's skip
        passes `even_if_paused`)."""
        await self._compare_and_set(
            conn, "advance_checkpoint", name, expected, new, applied, owner, even_if_paused, version
        )

    async def _compare_and_set(
        self,
        conn: AsyncConnection[Any],
        query: str,
        name: str,
        expected: Checkpoint,
        new: Checkpoint,
        applied: int,
        owner: str | None,
        even_if_paused: bool,
        version: int,
    ) -> None:
        await self._run(
            conn,
            query,
            {
                "name": name,
                "new_txid": str(new[0]),
                "new_position": new[1],
                "old_txid": str(expected[0]),
                "old_position": expected[1],
                "applied": applied,
                "even_if_paused": even_if_paused,
                "owner": owner,
                "version": version,
            },
        )

    # -- state and errors ------------------------------------------------------------------------

    async def record_error(
        self, conn: AsyncConnection[Any], name: str, error: dict[str, Any]
    ) -> None:
        await self._run(conn, "record_error", {"name": name, "error": Jsonb(error)})

    async def mark_failed(
        self, conn: AsyncConnection[Any], name: str, error: dict[str, Any], *, owner: str | None
    ) -> str | None:
        """State `failed` with the error (a paused projection stays paused); the state now, or
        None when `owner` no longer owns the row."""
        cur = await self._run(
            conn, "mark_failed", {"name": name, "error": Jsonb(error), "owner": owner}
        )
        row = await cur.fetchone()
        return str(row[0]) if row is not None else None

    async def set_state(self, conn: AsyncConnection[Any], name: str, state: str) -> str | None:
        """Pause or resume; the state now, or None for a projection without a row."""
        cur = await self._run(conn, "set_projection_state", {"name": name, "state": state})
        row = await cur.fetchone()
        return str(row[0]) if row is not None else None

    async def clear_failure(self, conn: AsyncConnection[Any], name: str) -> None:
        """No error, and `failed` runs again: its stuck event went to the dead letters."""
        await self._run(conn, "clear_failure", {"name": name})

    async def count_retried(self, conn: AsyncConnection[Any], name: str) -> None:
        """One event more applied: a dead letter re-applied."""
        await self._run(conn, "count_retried", {"name": name})

    async def reset(self, conn: AsyncConnection[Any], name: str) -> None:
        """Back to the start, running, with no error: a rebuild."""
        await self._run(conn, "reset_position", {"name": name})

    # -- owners ----------------------------------------------------------------------------------

    async def owners(
        self, conn: AsyncConnection[Any], names: Sequence[str]
    ) -> dict[str, str | None]:
        """Whom each existing row names as owner."""
        cur = await self._run(conn, "owners", {"names": list(names)})
        return {str(name): owner for name, owner in await cur.fetchall()}

    async def record_owner(
        self, conn: AsyncConnection[Any], name: str, owner: str, version: int = 1
    ) -> bool:
        """Name `owner` in the row (created, as `version`, when missing); False when the row is
        of another version and was left alone."""
        cur = await self._run(
            conn, "record_owner", {"name": name, "owner": owner, "version": version}
        )
        return await cur.fetchone() is not None

    # -- an online rebuild's shadow --------------------------------------------------------------

    async def delete(self, conn: AsyncConnection[Any], name: str) -> None:
        await self._run(conn, "delete_position", {"name": name})

    async def take_over(
        self, conn: AsyncConnection[Any], name: str, shadow: str
    ) -> tuple[Checkpoint, int] | None:
        """`name` continues from where `shadow` stopped, with its count: the new checkpoint and
        count, or None when either row is missing."""
        cur = await self._run(conn, "take_over_position", {"name": name, "shadow": shadow})
        row = await cur.fetchone()
        return (Checkpoint.parse(row[0], row[1]), int(row[2])) if row is not None else None

    # -- versions (docs/evolution.md) -------------------------------------------------------------

    async def serving_versions(
        self, conn: AsyncConnection[Any], names: Sequence[str]
    ) -> dict[str, int]:
        """The version of each projection's live tables; a projection without a row is absent."""
        cur = await self._run(conn, "serving_versions", {"names": list(names)})
        return {str(name): int(version) for name, version in await cur.fetchall()}

    async def keep(self, conn: AsyncConnection[Any], name: str, kept: str) -> None:
        """A versioned swap: the live row's checkpoint and version are kept as row `kept`."""
        await self._run(conn, "keep_position", {"name": name, "kept": kept})

    async def take_over_version(
        self, conn: AsyncConnection[Any], name: str, built: str
    ) -> tuple[Checkpoint, int, int] | None:
        """A versioned swap: `name` continues from `built`'s checkpoint, as `built`'s version,
        with no owner. The new checkpoint, count and version; None when a row is missing."""
        cur = await self._run(conn, "take_over_version", {"name": name, "built": built})
        row = await cur.fetchone()
        if row is None:
            return None
        return Checkpoint.parse(row[0], row[1]), int(row[2]), int(row[3])

    async def exchange(
        self, conn: AsyncConnection[Any], name: str, built: str
    ) -> tuple[Checkpoint, int, int] | None:
        """A swap of a rebuild of the serving version: `name` continues from `built`'s
        checkpoint and `built` keeps `name`'s (for the tables that leave service). The live
        row's new checkpoint, count and version; None when a row is missing."""
        cur = await self._run(conn, "exchange_positions", {"name": name, "built": built})
        for row in await cur.fetchall():
            if row[0] == name:
                return Checkpoint.parse(row[1], row[2]), int(row[3]), int(row[4])
        return None
