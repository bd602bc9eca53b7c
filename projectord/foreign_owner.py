"""Read-model tables that another role owns: refused, never adopted.

A table's owner decides which code runs when it is written: its triggers, rules, policies, column
defaults. A role that can create tables in the read-model schema could pre-create a projection's
table with an AFTER INSERT trigger that copies every row somewhere it can read; projectord would
then run that trigger as its own role (BYPASSRLS, reading every tenant) on each batch. So a
declared table that projectord's role does not own is never written: `init` reports it, the
projection's runner refuses to run (its other projections carry on), `drift check` reports it as
`foreign_owner`, and an online rebuild does not carry that owner over to the rebuilt table.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from psycopg import AsyncConnection

from projectord.projection import Projection
from projectord.queries import Queries, quote_ident


class ForeignOwnerError(Exception):
    """A projection's table is owned by another role; one line naming table and owner."""


@dataclass(frozen=True)
class ForeignTable:
    table: str
    owner: str
    role: str  # projectord's role, which should own it

    def describe(self, schema: str) -> str:
        return (
            f"{quote_ident(schema)}.{quote_ident(self.table)} is owned by role"
            f" {quote_ident(self.owner)}, not by projectord's role {quote_ident(self.role)}"
        )


async def foreign_owned(
    conn: AsyncConnection[Any], queries: Queries, schema: str, tables: Sequence[str]
) -> list[ForeignTable]:
    """Those of `tables` in `schema` that exist and that the connection's role does not own."""
    cur = await conn.execute(
        queries["foreign_owned_tables"], {"schema": schema, "tables": list(tables)}
    )
    return [ForeignTable(*row) for row in await cur.fetchall()]


def refusal(projection: str, schema: str, foreign: Sequence[ForeignTable]) -> ForeignOwnerError:
    """Why `projection` does not run: its tables' owners, and what an operator does about it."""
    tables = "; ".join(table.describe(schema) for table in foreign)
    return ForeignOwnerError(
        f"projection {projection!r} does not write into tables another role owns (their triggers"
        f" would run as projectord): {tables}. Inspect them, then drop them or"
        " `ALTER TABLE … OWNER TO` projectord's role"
    )


async def refused_projections(
    conn: AsyncConnection[Any], queries: Queries, schema: str, projections: Sequence[Projection]
) -> list[ForeignOwnerError]:
    """Why each projection whose existing tables another role owns will not run: `init` does
    not adopt such tables, and says so."""
    found = []
    for projection in projections:
        foreign = await foreign_owned(conn, queries, schema, list(projection.tables))
        if foreign:
            found.append(refusal(projection.name, schema, foreign))
    return found
