"""Who else can put code where projectord resolves names: the read-model schema and its own.

The daemon's search_path is the read-model schema, and Postgres picks an exact-typed operator or
function from any schema on the path over a pg_catalog one that needs a cast, so an operator,
function or type another role owns there runs as projectord when a name resolves to it. The
queries projectord runs are written to resolve only to pg_catalog (projectord/queries.py), but a
handler's own SQL is not, and the documented rule is that no untrusted role may hold CREATE on
these schemas (docs/security-read-models.md). This module finds where the rule is broken, for
`drift check` (manual items) and `health` (degraded): CREATE held by a role other than the
schema's owner, projectord's role and superusers (PUBLIC included), and functions, operators and
types such a role owns there. Administrators (superusers) are trusted, so extensions they
installed are not reported.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from psycopg import AsyncConnection

from projectord.queries import Queries


@dataclass(frozen=True)
class UntrustedCreate:
    """A role other than the owner that may create in the schema."""

    schema: str
    role: str  # 'public' for PUBLIC

    def describe(self) -> str:
        return f"{self.role} holds CREATE on schema {self.schema}"


@dataclass(frozen=True)
class ForeignObjects:
    """Functions, operators and types in the schema that one other role owns."""

    schema: str
    owner: str
    functions: int
    operators: int
    types: int
    examples: tuple[str, ...]

    def describe(self) -> str:
        counts = [
            f"{n} {kind}{'s' if n != 1 else ''}"
            for n, kind in ((self.functions, "function"), (self.operators, "operator"),
                            (self.types, "type"))
            if n
        ]  # fmt: skip
        return (
            f"{', '.join(counts)} in schema {self.schema} owned by {self.owner}"
            f" (e.g. {', '.join(self.examples)})"
        )


async def untrusted_schema_findings(
    conn: AsyncConnection[Any], queries: Queries, schemas: Sequence[str]
) -> list[UntrustedCreate | ForeignObjects]:
    """Every breach of the rule in `schemas`: CREATE holders first, then their objects."""
    params = {"schemas": list(dict.fromkeys(schemas))}
    cur = await conn.execute(queries["schema_create_holders"], params)
    found: list[UntrustedCreate | ForeignObjects] = [
        UntrustedCreate(schema, role) for schema, role in await cur.fetchall()
    ]
    cur = await conn.execute(queries["foreign_schema_objects"], params)
    found += [
        ForeignObjects(schema, owner, int(f), int(o), int(t), tuple(examples or ()))
        for schema, owner, f, o, t, examples in await cur.fetchall()
    ]
    return found
