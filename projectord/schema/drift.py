"""Schema drift: how the read-model tables in the database differ from what the projections declare.

A check reads two snapshots and compares them. The expected shape of each table comes from Postgres
itself (see `catalog`); the actual one, and everything else the comparison needs (who owns what,
triggers and rules, grants, the schemas' trust, and the few facts about the live data a repair
class depends on), from the catalog of the configured read-model schema only. This module does the
reading, into `drift_snapshot`'s types; `drift_comparison` turns the snapshots into `Drift` items
(`drift_items`) without touching the database.

A check runs no code that the database's other users wrote: tables another role owns are only
reported (`foreign_owner`), never read; triggers and rules on declared tables (`foreign_trigger`,
`foreign_rule`) are reported from the catalog and left in place; stored values are cast to probe a
type change only between built-in types, compared with built-in operators.

`drift_check` is the entry point for the command line and the control socket.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import AsyncConnection, sql

from projectord.config import Settings
from projectord.database import connect
from projectord.projection import Projection
from projectord.queries import Queries
from projectord.runner.checkpoint_store import CheckpointStore
from projectord.schema.catalog import ColumnShape, TableShape, declared_shapes, read_shapes
from projectord.schema.drift_comparison import compare, data_questions
from projectord.schema.drift_items import Drift, DriftError
from projectord.schema.drift_snapshot import (
    DatabaseSnapshot,
    DataQuestions,
    ExtraGrant,
    LiveData,
    ProjectionGrants,
)
from projectord.schema.foreign_owner import ForeignCode, foreign_code, foreign_owned
from projectord.schema.migrations import declaration_search_path
from projectord.schema.schema_trust import untrusted_schema_findings
from projectord.schema.security import check_declaration, existing_roles, policy_statements


@dataclass
class Inspection:
    """A drift check's findings and what repair needs to act on them."""

    schema: str
    items: list[Drift]
    expected: dict[str, TableShape]
    actual: dict[str, TableShape]
    projections: dict[str, Projection]  # by name
    readers: set[str]  # the read_access roles that exist

    def lines(self) -> list[str]:
        return [item.line(self.schema) for item in self.items]

    def as_json(self) -> dict[str, Any]:
        return {
            "schema": self.schema,
            "drift": [item.as_json() for item in self.items],
            "count": len(self.items),
        }


async def drift_check(
    db: str | AsyncConnection[Any], settings: Settings, projections: Sequence[Projection]
) -> dict[str, Any]:
    """The drift of the projections' tables, as JSON: `{"schema", "drift": [...], "count"}`.
    `db` is a DSN or an open connection (left open). Changes nothing."""
    if isinstance(db, str):
        conn = await connect(db, autocommit=True, connect_timeout=10)
        async with conn:
            return (await inspect(conn, settings, projections)).as_json()
    return (await inspect(db, settings, projections)).as_json()


async def inspect(
    conn: AsyncConnection[Any], settings: Settings, projections: Sequence[Projection]
) -> Inspection:
    """Compare every declared table with the database, in a transaction that is rolled back."""
    for projection in projections:
        problem = check_declaration(projection)
        if problem:
            raise DriftError(problem)
    queries = Queries(settings.schema)
    schema = settings.read_model_schema
    tables = [name for projection in projections for name in projection.tables]
    declared_readers = {role for p in projections for role in p.read_access}
    async with conn.transaction(force_rollback=True):
        await conn.execute(declaration_search_path(schema))
        readers = await existing_roles(conn, queries, declared_readers)
        foreign = {t.table: t for t in await foreign_owned(conn, queries, schema, tables)}
        code: dict[str, list[ForeignCode]] = {}
        for found in await foreign_code(conn, queries, schema, tables):
            code.setdefault(found.table, []).append(found)
        schema_owner = await _schema_owner(conn, queries, schema)
        # Actual shapes first: once temporary tables exist they shadow same-named sequences in
        # the deparsed defaults of the real tables.
        actual = await read_shapes(conn, queries, schema, tables)

        def secure(temp_schema: str, projection: Projection, table: str) -> list[sql.Composed]:
            # This projection's own readers: another projection's must not widen its policy.
            ident = sql.Identifier(temp_schema, table)
            own = readers & set(projection.read_access)
            return policy_statements(ident, settings.schema, projection, own)

        expected = await declared_shapes(conn, queries, projections, secure)
        # From here on, names resolve in pg_catalog (and our temporary tables) only: the
        # probes and catalog queries below cannot pick up anything another role created in the
        # read-model schema or in public, whatever operator or function they name.
        await conn.execute("SET LOCAL search_path = pg_catalog, pg_temp")
        db = DatabaseSnapshot(schema, actual, readers, foreign, code, schema_owner)
        for projection in projections:
            db.grants[projection.name] = await _grants(conn, queries, db, projection)
        db.untrusted = await untrusted_schema_findings(conn, queries, (schema, settings.schema))
        probe = _LiveDataProbe(conn, queries, schema)
        data = await probe.answer(data_questions(projections, expected, db), projections)
    items = compare(projections, expected, db, data)
    return Inspection(schema, items, expected, actual, {p.name: p for p in projections}, readers)


async def _schema_owner(
    conn: AsyncConnection[Any], queries: Queries, schema: str
) -> tuple[str, str] | None:
    """(owner, projectord's role) when the read-model schema's owner is neither projectord's role
    nor a superuser."""
    cur = await conn.execute(queries["read_model_schema_owner"], {"schema": schema})
    row = await cur.fetchone()
    if row is None or row[1]:
        return None
    owner, _, role = row
    return owner, role


async def _grants(
    conn: AsyncConnection[Any], queries: Queries, db: DatabaseSnapshot, projection: Projection
) -> ProjectionGrants:
    """Privileges that others hold and should not: beyond SELECT, writes, TRUNCATE (not subject to
    row-level security), TRIGGER (their code, run as projectord), REFERENCES; on a secured table,
    SELECT of anyone outside `read_access` (PUBLIC too: a permissive policy would let them read);
    any grant option (the grantee could pass the privilege on). With `read_access`, also the
    readers' missing SELECT and USAGE. Tables another role owns are not asked about."""
    tables = [t for t in projection.tables if t in db.tables and t not in db.foreign]
    cur = await conn.execute(
        queries["extra_grants"],
        {"schema": db.schema, "tables": tables, "secured": bool(projection.read_access),
         "readers": list(projection.read_access)},
    )  # fmt: skip
    extra = tuple(ExtraGrant(*row) for row in await cur.fetchall())
    if not projection.read_access:
        return ProjectionGrants(extra)
    roles = sorted(set(projection.read_access) & db.readers)
    cur = await conn.execute(
        queries["missing_select_grants"], {"schema": db.schema, "tables": tables, "roles": roles}
    )
    missing_select = tuple((table, role) for table, role in await cur.fetchall())
    cur = await conn.execute(queries["missing_schema_usage"], {"schema": db.schema, "roles": roles})
    missing_usage = tuple(role for (role,) in await cur.fetchall())
    return ProjectionGrants(extra, missing_select, missing_usage)


@dataclass
class _LiveDataProbe:
    """Reads the live data the comparison's repair classes depend on (NULLs present, rows
    present, a cast that would lose values, events applied)."""

    conn: AsyncConnection[Any]
    queries: Queries
    schema: str

    async def answer(self, questions: DataQuestions, projections: Sequence[Projection]) -> LiveData:
        data = LiveData()
        for projection in projections:
            if projection.name in questions.applied_events:
                data.applied_events[projection.name] = await self._applied_events(projection)
        for table in sorted(questions.rows):
            data.rows[table] = await self._rows(table)
        for table, column in sorted(questions.nulls):
            data.nulls[(table, column)] = await self._nulls(table, column)
        for table, found, want in questions.casts:
            data.cast_problems[(table, want.name)] = await self._cast_problem(table, found, want)
        return data

    def _table_ident(self, table: str) -> sql.Identifier:
        return sql.Identifier(self.schema, table)

    async def _applied_events(self, projection: Projection) -> bool:
        return await CheckpointStore(self.queries).has_applied_events(
            self.conn, projection.name, projection.event_types
        )

    async def _rows(self, table: str) -> bool:
        query = sql.SQL("SELECT EXISTS (SELECT 1 FROM {})").format(self._table_ident(table))
        cur = await self.conn.execute(query)
        row = await cur.fetchone()
        return bool(row and row[0])

    async def _nulls(self, table: str, column: str) -> bool:
        query = sql.SQL("SELECT EXISTS (SELECT 1 FROM {} WHERE {} IS NULL)").format(
            self._table_ident(table), sql.Identifier(column)
        )
        cur = await self.conn.execute(query)
        row = await cur.fetchone()
        return bool(row and row[0])

    async def _cast_problem(self, table: str, found: ColumnShape, want: ColumnShape) -> str:
        """Why the live column cannot be converted in place, or "" when it can: Postgres casts the
        old type to the new one implicitly (a widening) and every stored value survives the
        round trip old → new → old. Neither column is an identity or generated one."""
        cur = await self.conn.execute(
            self.queries["implicit_cast_exists"],
            {"source": found.type_oid, "target": want.type_oid},
        )
        row = await cur.fetchone()
        if not (row and row[1]):
            return "a type outside pg_catalog: a drift check does not run its casts"
        if not row[0]:
            return f"no safe cast from {found.type} to {want.type}"
        # Built-in types only (above), compared as text with the built-in operator: nothing the
        # database's other users defined runs. The type names come from format_type() of the
        # catalog, never from a request.
        query = sql.SQL(
            "SELECT NOT EXISTS (SELECT 1 FROM {table} WHERE {col} IS NOT NULL"
            " AND ((({col}::{new})::{old})::pg_catalog.text OPERATOR(pg_catalog.=)"
            " {col}::pg_catalog.text) IS NOT TRUE)"
        ).format(
            table=self._table_ident(table),
            col=sql.Identifier(want.name),
            new=sql.SQL(want.type),
            old=sql.SQL(found.type),
        )
        try:
            async with self.conn.transaction():
                cur = await self.conn.execute(query)
                row = await cur.fetchone()
        except psycopg.Error:
            row = None
        if not (row and row[0]):
            return f"stored values do not survive a cast from {found.type} to {want.type}"
        return ""
