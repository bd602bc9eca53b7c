"""What a table looks like in the catalog: columns, primary key, indexes, row-level security.

Drift detection compares two shapes for every declared table: the *expected* one, read from a
scratch copy of the declaration that Postgres itself creates (temporary tables, in a transaction
that is rolled back), and the *actual* one in the read-model schema. Both are read through the same
catalog queries, which is what normalises them: `int4` and `integer` are one type, `DEFAULT 0`
deparses the same way on both sides, a policy expression is compared as Postgres stores it. No
string matching of declarations.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from psycopg import AsyncConnection, sql

from projectord.projection import Projection
from projectord.queries import Queries, quote_ident
from projectord.schema.migrations import create_projection_tables


@dataclass(frozen=True)
class ColumnShape:
    name: str
    type: str  # as format_type() spells it: 'integer', 'character varying(20)'
    type_oid: int
    not_null: bool
    default: str | None  # deparsed default, or the identity / generation clause
    special: bool  # identity or generated: cannot be changed in place

    def definition(self) -> str:
        """Type, default and nullability, as an ADD COLUMN would state them."""
        parts = [self.type]
        if self.default is not None:
            parts.append(self.default if self.special else f"DEFAULT {self.default}")
        if self.not_null:
            parts.append("NOT NULL")
        return " ".join(parts)


@dataclass(frozen=True)
class IndexShape:
    unique: bool
    definition: str  # 'USING btree (tenant_id, created_at)', without name and table

    def describe(self) -> str:
        return f"{'UNIQUE ' if self.unique else ''}{self.definition}"


@dataclass(frozen=True)
class PolicyShape:
    name: str
    command: str  # SELECT, INSERT, UPDATE, DELETE or ALL
    permissive: bool
    roles: tuple[str, ...]  # sorted; 'public' for PUBLIC
    using: str | None
    with_check: str | None

    def describe(self) -> str:
        kind = "PERMISSIVE" if self.permissive else "RESTRICTIVE"
        text = f"{kind} FOR {self.command} TO {', '.join(self.roles)} USING ({self.using})"
        return text + (f" WITH CHECK ({self.with_check})" if self.with_check else "")


@dataclass
class TableShape:
    name: str
    owner: str = ""
    columns: dict[str, ColumnShape] = field(default_factory=dict)
    primary_key: tuple[str, ...] = ()
    indexes: set[IndexShape] = field(default_factory=set)
    rls_enabled: bool = False
    rls_forced: bool = False
    policies: dict[str, PolicyShape] = field(default_factory=dict)


async def read_shapes(
    conn: AsyncConnection[Any], queries: Queries, schema: str, tables: Sequence[str]
) -> dict[str, TableShape]:
    """The shapes of those of `tables` that exist in `schema` (that schema only)."""
    params = {"schema": schema, "tables": list(tables)}
    shapes: dict[str, TableShape] = {}
    cur = await conn.execute(queries["catalog_tables"], params)
    for name, enabled, forced, owner, primary_key in await cur.fetchall():
        shapes[name] = TableShape(
            name, owner, rls_enabled=enabled, rls_forced=forced, primary_key=tuple(primary_key)
        )
    cur = await conn.execute(queries["catalog_columns"], params)
    for table, column, type_, type_oid, not_null, default, special in await cur.fetchall():
        shapes[table].columns[column] = ColumnShape(
            column, type_, int(type_oid), not_null, default, special
        )
    cur = await conn.execute(queries["catalog_indexes"], params)
    for table, unique, definition in await cur.fetchall():
        shapes[table].indexes.add(IndexShape(unique, definition))
    cur = await conn.execute(queries["catalog_policies"], params)
    for table, name, command, permissive, roles, using, with_check in await cur.fetchall():
        shapes[table].policies[name] = PolicyShape(
            name, command, permissive, tuple(roles), using, with_check
        )
    return shapes


async def declared_shapes(
    conn: AsyncConnection[Any],
    queries: Queries,
    projections: Sequence[Projection],
    secure: Callable[[str, Projection, str], Sequence[sql.Composable]],
) -> dict[str, TableShape]:
    """The shapes the projections declare, as Postgres normalises them.

    Must run inside a transaction the caller rolls back: the declared tables are created as
    temporary tables (so the declaration is parsed by Postgres, with the caller's search_path for
    type names), the statements `secure(schema, projection, table_name)` returns add the row-level
    security the projection implies, and the catalog is read back.
    """
    for projection in projections:
        await create_projection_tables(conn, "pg_temp", [projection])
    cur = await conn.execute(queries["temp_schema_name"])
    row = await cur.fetchone()
    if row is None:  # no declared tables at all: no temporary schema was created
        return {}
    temp_schema = str(row[0])
    for projection in projections:
        for table_name in projection.tables:
            for statement in secure(temp_schema, projection, table_name):
                await conn.execute(statement)
    names = [name for projection in projections for name in projection.tables]
    return await read_shapes(conn, queries, temp_schema, names)


def qualified(schema: str, table: str) -> str:
    return f"{quote_ident(schema)}.{quote_ident(table)}"
