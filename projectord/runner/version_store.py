"""The one owner of `projection_versions`: the versions of projections that do not serve reads.

A projection's serving version is its positions row's `version` (projectord/runner/
checkpoint_store.py). The versions being built (from the first event, or a kept one caught up for
a rollback) and the versions kept after a swap for a rollback have a row here each, naming the
schema their tables live in; their checkpoint is the positions row `NAME#vN`
(docs/evolution.md). The SQL is in sql/queries/versions.sql.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from psycopg import AsyncConnection

from projectord.queries import Queries

BUILDING = "building"
KEPT = "kept"


def version_row_name(name: str, version: int) -> str:
    """The positions row (and ownership lock) of a version that does not serve: `NAME#vN`."""
    return f"{name}#v{version}"


def version_schema(read_model_schema: str, name: str, version: int) -> str:
    """Where the tables of a version that does not serve live. Derived from the names, so a build
    interrupted by a crash goes on where it stopped; hashed, as identifiers are limited to 63
    bytes."""
    digest = hashlib.sha1(f"{read_model_schema}.{name}.{version}".encode()).hexdigest()[:16]
    return f"projectord_v_{digest}"


def replaced_schema(read_model_schema: str, name: str, version: int) -> str:
    """Where the tables a rebuild of the *serving* version replaced are kept (a versioned drift
    repair, docs/evolution.md): not `version_schema`, which the rebuild itself was built in."""
    return version_schema(read_model_schema, f"{name}#replaced", version)


@dataclass(frozen=True)
class VersionRow:
    name: str
    version: int
    role: str  # building or kept
    tables_schema: str
    since: datetime

    def report(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "role": self.role,
            "tables_schema": self.tables_schema,
            "since": self.since.isoformat(),
        }


class VersionStore:
    def __init__(self, queries: Queries) -> None:
        self.queries = queries

    async def rows(
        self, conn: AsyncConnection[Any], names: Sequence[str] | None = None
    ) -> list[VersionRow]:
        """The rows of these projections (all when None), by name and version."""
        if names is None:
            cur = await conn.execute(self.queries["all_version_rows"])
        else:
            cur = await conn.execute(self.queries["version_rows"], {"names": list(names)})
        return [VersionRow(n, int(v), r, s, t) for n, v, r, s, t in await cur.fetchall()]

    async def lock(
        self, conn: AsyncConnection[Any], name: str, version: int
    ) -> tuple[str, str] | None:
        """(role, tables_schema) of a version, held still until the transaction ends."""
        cur = await conn.execute(
            self.queries["lock_version_row"], {"name": name, "version": version}
        )
        row = await cur.fetchone()
        return (str(row[0]), str(row[1])) if row is not None else None

    async def start_building(
        self, conn: AsyncConnection[Any], name: str, version: int, tables_schema: str
    ) -> None:
        await conn.execute(
            self.queries["start_building"],
            {"name": name, "version": version, "tables_schema": tables_schema},
        )

    async def keep(
        self, conn: AsyncConnection[Any], name: str, version: int, tables_schema: str
    ) -> None:
        await conn.execute(
            self.queries["keep_version"],
            {"name": name, "version": version, "tables_schema": tables_schema},
        )

    async def request_rollback(
        self, conn: AsyncConnection[Any], name: str, version: int, tables_schema: str
    ) -> bool:
        """Mark a kept version to be caught up and swapped back in, its tables now in
        `tables_schema` (where a build of the version lives); False when it is not kept."""
        cur = await conn.execute(
            self.queries["request_rollback"],
            {"name": name, "version": version, "tables_schema": tables_schema},
        )
        return await cur.fetchone() is not None

    async def forget(self, conn: AsyncConnection[Any], name: str, version: int) -> None:
        await conn.execute(self.queries["forget_version"], {"name": name, "version": version})

    async def expired(
        self, conn: AsyncConnection[Any], seconds: float
    ) -> list[tuple[str, int, str]]:
        """Kept versions older than `seconds`, locked (others skip them) until the transaction
        ends: (name, version, tables_schema)."""
        cur = await conn.execute(self.queries["expired_versions"], {"seconds": seconds})
        return [(str(n), int(v), str(s)) for n, v, s in await cur.fetchall()]
