"""Schema drift: how the read-model tables in the database differ from what the projections declare.

The expected shape of each table comes from Postgres itself (see `catalog`), the actual one from
the catalog of the configured read-model schema only. Every difference is a `Drift` with a kind,
the column it concerns, what was expected and found, and how it can be repaired:

- `in_place`: a safe change of the live table (add a column with its default, a widening type
  change, set or drop NOT NULL when the data allows, an index, row-level security, a policy, a
  grant);
- `rebuild`: the table's contents must be recomputed from events (a type without a safe cast, a new
  primary key, a NOT NULL column for existing rows, a missing table of a projection that has applied
  events): an online rebuild into shadow tables, swapped in when caught up;
- `drop`: something extra (a column, a policy) that only an explicit flag removes;
- `manual`: something only an operator can do (create a role, deal with a table another role
  owns or a trigger or rule someone attached, give the read-model schema a trusted owner,
  revoke CREATE another role holds on our schemas and drop what it created there).

A check runs no code that the database's other users wrote: tables another role owns are only
reported (`foreign_owner`), never read; triggers and rules on declared tables (`foreign_trigger`,
`foreign_rule`) are reported from the catalog and left in place; stored values are cast to probe a
type change only between built-in types, compared with built-in operators.

`drift_check` is the entry point for the command line and the control socket.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

import psycopg
from psycopg import AsyncConnection, sql

from projectord.config import Settings
from projectord.database import connect
from projectord.projection import Projection
from projectord.queries import Queries
from projectord.runner.checkpoint_store import CheckpointStore
from projectord.schema.catalog import (
    ColumnShape,
    PolicyShape,
    TableShape,
    declared_shapes,
    read_shapes,
)
from projectord.schema.foreign_owner import ForeignCode, ForeignTable, foreign_code, foreign_owned
from projectord.schema.migrations import declaration_search_path
from projectord.schema.schema_trust import UntrustedCreate, untrusted_schema_findings
from projectord.schema.security import (
    POLICIES,
    check_declaration,
    existing_roles,
    policy_statements,
)

_PLAIN_NAME = re.compile(r"[a-z_][a-z0-9_$]*")


def display_name(name: str) -> str:
    """A name from the catalog as an operator reads it: bare when plain, else double-quoted with
    `"` doubled, so a name holding dots, quotes or spaces cannot pass for something else."""
    return name if _PLAIN_NAME.fullmatch(name) else '"' + name.replace('"', '""') + '"'


def printable(text: str) -> str:
    """One line, whatever the catalog held: control and line-breaking characters are escaped, so
    a column named `x\nDROP TABLE t; --` cannot start a line of its own (in a dry run's
    comment, a line of its own would be SQL). A backslash prints as `\\\\`, so the escape of a
    newline cannot be confused with a name that spells it."""
    return "".join(_printable_char(ch) for ch in text)


def _printable_char(ch: str) -> str:
    """A backslash is doubled: otherwise a name holding the two characters `\\n` would print
    exactly like one holding a real newline, and escaping would be ambiguous."""
    if ch == "\\":
        return "\\\\"
    if ch.isprintable() or ch == " ":
        return ch
    return ch.encode("unicode_escape").decode("ascii")


def sql_identifier(name: str) -> sql.Composable:
    """A name from the catalog, as SQL that stays on its line: quoted as usual, or, when it holds
    a character that is not printable (a newline...), spelled as a Unicode-escaped identifier
    (`U&"x\\000aDROP"`), which means the same name to Postgres."""
    if name.isprintable():
        return sql.Identifier(name)
    escaped = "".join(ch if ch.isprintable() and ch != "\\" else f"\\+{ord(ch):06X}" for ch in name)
    return sql.SQL('U&"' + escaped.replace('"', '""') + '"')


GRANT_OPTION = " WITH GRANT OPTION"  # suffix of an extra_grant's privilege: only the option


class DriftError(Exception):
    """Drift cannot be checked (a declaration that cannot be enforced); one line."""


class Kind(StrEnum):
    MISSING_TABLE = "missing_table"
    MISSING_COLUMN = "missing_column"
    EXTRA_COLUMN = "extra_column"
    TYPE_MISMATCH = "type_mismatch"
    NULLABILITY_MISMATCH = "nullability_mismatch"
    DEFAULT_MISMATCH = "default_mismatch"
    PRIMARY_KEY_MISMATCH = "primary_key_mismatch"
    MISSING_INDEX = "missing_index"
    RLS_NOT_ENABLED = "rls_not_enabled"
    RLS_NOT_FORCED = "rls_not_forced"
    POLICY_MISSING = "policy_missing"
    POLICY_DIFFERENT = "policy_different"
    EXTRA_POLICY = "extra_policy"
    GRANT_MISSING = "grant_missing"
    ROLE_MISSING = "role_missing"
    SCHEMA_CREATE = "schema_create"  # a role that should not may create in our schemas
    FOREIGN_OBJECT = "foreign_object"  # its functions, operators or types there
    FOREIGN_OWNER = "foreign_owner"
    EXTRA_GRANT = "extra_grant"
    FOREIGN_TRIGGER = "foreign_trigger"
    FOREIGN_RULE = "foreign_rule"
    SCHEMA_OWNER = "schema_owner"


class Repair(StrEnum):
    IN_PLACE = "in_place"
    REBUILD = "rebuild"
    DROP = "drop"
    MANUAL = "manual"


@dataclass(frozen=True)
class Drift:
    projection: str | None
    table: str | None
    column: str | None
    kind: Kind
    expected: str | None
    actual: str | None
    repair: Repair
    reason: str = ""
    subject: str | None = None  # the role or policy the item is about, if any

    def where(self, schema: str) -> str:
        """What the item is about: `schema.table.column` (names quoted when they need it), the
        projection, or the database."""
        if self.table:
            return ".".join(display_name(p) for p in (schema, self.table, self.column) if p)
        return f"projection {self.projection}" if self.projection else "database"

    def line(self, schema: str) -> str:
        text = f"{self.where(schema)}: {self.kind.value.replace('_', ' ')}"
        if self.expected is not None or self.actual is not None:
            text += f" (expected {self.expected or 'none'}, found {self.actual or 'none'})"
        repair = self.repair.value.replace("_", " ")
        text += f"; repair: {repair}" + (f" ({self.reason})" if self.reason else "")
        return printable(text)

    def as_json(self) -> dict[str, Any]:
        return asdict(self) | {"kind": self.kind.value, "repair": self.repair.value}

    @classmethod
    def from_json(cls, item: dict[str, Any]) -> Drift:
        return cls(**item | {"kind": Kind(item["kind"]), "repair": Repair(item["repair"])})


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
        comparer = _Comparer(conn, queries, schema, readers, foreign, code)
        items: list[Drift] = [schema_owner] if schema_owner else []
        for projection in projections:
            items += await comparer.projection(projection, expected, actual)
        items += await _schema_trust(conn, queries, (schema, settings.schema))
    return Inspection(schema, items, expected, actual, {p.name: p for p in projections}, readers)


async def _schema_owner(conn: AsyncConnection[Any], queries: Queries, schema: str) -> Drift | None:
    """The read-model schema owned by a role that is neither projectord's nor a superuser: that
    role can drop any read-model table and put its own in place. The daemon then refuses the
    projection (its batches check their tables), but the owner can also read and change every
    table in the schema, so it must be trusted; only an administrator can change it."""
    cur = await conn.execute(queries["read_model_schema_owner"], {"schema": schema})
    row = await cur.fetchone()
    if row is None or row[1]:
        return None
    owner, _, role = row
    return Drift(
        None, None, None, Kind.SCHEMA_OWNER, f"owner {role}", f"owner {owner}", Repair.MANUAL,
        f"schema {display_name(schema)}: its owner can replace every read-model table; an"
        f" administrator runs ALTER SCHEMA … OWNER TO {display_name(role)}, or gives"
        " projectord a schema of its own",
        owner,
    )  # fmt: skip


def uses_sequence(default: str | None) -> bool:
    return default is not None and "nextval(" in default


@dataclass
class _Comparer:
    """Compares one projection's tables at a time; probes the live data where the repair class
    depends on it (NULLs present, rows present, a cast that would lose values)."""

    conn: AsyncConnection[Any]
    queries: Queries
    schema: str
    readers: set[str]
    foreign: dict[str, ForeignTable]  # tables another role owns: reported, never probed
    code: dict[str, list[ForeignCode]]  # triggers and rules on declared tables, by table
    _has_rows: dict[str, bool] = field(default_factory=dict)

    async def projection(
        self,
        projection: Projection,
        expected: dict[str, TableShape],
        actual: dict[str, TableShape],
    ) -> list[Drift]:
        items: list[Drift] = []
        for table in projection.tables:
            if table in self.foreign:
                items.append(self._foreign_owner(projection, self.foreign[table]))
                continue
            if table not in actual:
                items.append(await self._missing_table(projection, table))
                continue
            found = self.code.get(table, [])
            items += [self._foreign_code(projection, code) for code in found]
            if any(code.kind == "rule" for code in found):
                continue  # a rule may rewrite the probes' reads: compared no further
            items += await self._table(projection, expected[table], actual[table])
        items += await self._extra_grants(projection, actual)
        if projection.read_access:
            items += await self._readers(projection, actual)
        return items

    async def _extra_grants(
        self, projection: Projection, actual: dict[str, TableShape]
    ) -> list[Drift]:
        """Privileges that others hold and should not: beyond SELECT, writes, TRUNCATE (not
        subject to row-level security), TRIGGER (their code, run as projectord), REFERENCES; on a
        secured table, SELECT of anyone outside `read_access` (PUBLIC too: a permissive policy
        would let them read); any grant option (the grantee could pass the privilege on)."""
        tables = [t for t in projection.tables if t in actual and t not in self.foreign]
        cur = await self.conn.execute(
            self.queries["extra_grants"],
            {"schema": self.schema, "tables": tables, "secured": bool(projection.read_access),
             "readers": list(projection.read_access)},
        )  # fmt: skip
        return [
            _ItemMaker(projection.name, table)(
                Kind.EXTRA_GRANT, Repair.IN_PLACE, column=column, actual=privilege, subject=role,
                reason=f"held by {display_name(role)}: {_why_extra(privilege)}",
            )
            for table, role, privilege, column in await cur.fetchall()
        ]  # fmt: skip

    async def _table(
        self, projection: Projection, want: TableShape, have: TableShape
    ) -> list[Drift]:
        item = _ItemMaker(projection.name, want.name)
        items: list[Drift] = []
        for column in want.columns.values():
            found = have.columns.get(column.name)
            if found is None:
                items.append(await self._missing_column(item, want, column))
            else:
                items += await self._column(item, have, column, found)
        for extra in have.columns.values():
            if extra.name not in want.columns:
                items.append(
                    item(Kind.EXTRA_COLUMN, Repair.DROP, column=extra.name,
                         actual=extra.definition(), reason="kept unless dropped explicitly")
                )  # fmt: skip
        if want.primary_key != have.primary_key:
            items.append(
                item(Kind.PRIMARY_KEY_MISMATCH, Repair.REBUILD, expected=_key(want.primary_key),
                     actual=_key(have.primary_key), reason="a primary key cannot change in place")
            )  # fmt: skip
        for index in sorted(want.indexes - have.indexes, key=lambda i: i.describe()):
            items.append(item(Kind.MISSING_INDEX, Repair.IN_PLACE, expected=index.describe()))
        if projection.read_access:
            items += _security(item, want, have)
        return items

    def _foreign_owner(self, projection: Projection, table: ForeignTable) -> Drift:
        """Only reported: comparing it further would read a table whose policies are another
        role's code, and repairing it would adopt that role's triggers."""
        return _ItemMaker(projection.name, table.table)(
            Kind.FOREIGN_OWNER, Repair.MANUAL, expected=f"owner {table.role}",
            actual=f"owner {table.owner}", subject=table.owner,
            reason="projectord does not write into it (its triggers would run as projectord):"
            " inspect it, then drop it or ALTER TABLE … OWNER TO projectord's role",
        )  # fmt: skip

    def _foreign_code(self, projection: Projection, code: ForeignCode) -> Drift:
        """A trigger or rule: a projection declares none, so it is someone's code that runs as
        projectord on every batch (revoking the TRIGGER privilege does not remove a trigger).
        Left for an operator, who decides whose it is: dropping another's code is not repair's
        to do. The daemon refuses the projection meanwhile."""
        kind = Kind.FOREIGN_TRIGGER if code.kind == "trigger" else Kind.FOREIGN_RULE
        actual = f"{code.kind} {code.name}"
        if code.function is not None:
            actual += f" (function {code.function}, owned by {code.function_owner})"
        return _ItemMaker(projection.name, code.table)(
            kind, Repair.MANUAL, expected="none", actual=actual, subject=code.name,
            reason="projectord does not write into it (the code would run as projectord):"
            f" inspect it, then {code.drop_sql(self.schema)}",
        )  # fmt: skip

    async def _missing_table(self, projection: Projection, table: str) -> Drift:
        applied = await CheckpointStore(self.queries).has_applied_events(
            self.conn, projection.name, projection.event_types
        )
        item = _ItemMaker(projection.name, table)
        if applied:
            return item(Kind.MISSING_TABLE, Repair.REBUILD, expected="table",
                        reason="the projection has applied events: fill it from them")  # fmt: skip
        return item(Kind.MISSING_TABLE, Repair.IN_PLACE, expected="table")

    async def _missing_column(
        self, item: _ItemMaker, want: TableShape, column: ColumnShape
    ) -> Drift:
        reason = ""
        if column.name in want.primary_key:
            reason = "part of the primary key"
        elif column.special or uses_sequence(column.default):
            reason = "an identity, generated or serial column"
        elif column.not_null and column.default is None and await self._rows(want.name):
            reason = "NOT NULL without a default: existing rows need values computed from events"
        repair = Repair.REBUILD if reason else Repair.IN_PLACE
        return item(Kind.MISSING_COLUMN, repair, column=column.name,
                    expected=column.definition(), reason=reason)  # fmt: skip

    async def _column(
        self, item: _ItemMaker, have: TableShape, column: ColumnShape, found: ColumnShape
    ) -> list[Drift]:
        items = []
        name = column.name
        if column.type != found.type:
            reason = await self._cast_problem(have.name, found, column)
            items.append(
                item(Kind.TYPE_MISMATCH, _repair(reason), column=name, expected=column.type,
                     actual=found.type, reason=reason)
            )  # fmt: skip
        if column.not_null != found.not_null:
            reason = await self._nullability_problem(have, column)
            items.append(
                item(Kind.NULLABILITY_MISMATCH, _repair(reason), column=name,
                     expected=_nullability(column), actual=_nullability(found), reason=reason)
            )  # fmt: skip
        if column.default != found.default:
            special = column.special or found.special
            sequence = uses_sequence(column.default) or uses_sequence(found.default)
            reason = "an identity, generated or serial column" if special or sequence else ""
            items.append(
                item(Kind.DEFAULT_MISMATCH, _repair(reason), column=name,
                     expected=column.default, actual=found.default, reason=reason)
            )  # fmt: skip
        return items

    async def _readers(self, projection: Projection, actual: dict[str, TableShape]) -> list[Drift]:
        """Roles, grants and schema access for the projection's readers."""
        item = _ItemMaker(projection.name, None)
        items = [
            item(Kind.ROLE_MISSING, Repair.MANUAL, expected=f"role {role}", subject=role,
                 reason=f"create it, e.g. CREATE ROLE {sql.Identifier(role).as_string()} NOLOGIN")
            for role in projection.read_access
            if role not in self.readers
        ]  # fmt: skip
        roles = sorted(set(projection.read_access) & self.readers)
        tables = [t for t in projection.tables if t in actual and t not in self.foreign]
        cur = await self.conn.execute(
            self.queries["missing_select_grants"],
            {"schema": self.schema, "tables": tables, "roles": roles},
        )
        for table, role in await cur.fetchall():
            items.append(
                _ItemMaker(projection.name, table)(
                    Kind.GRANT_MISSING, Repair.IN_PLACE, expected=f"SELECT to {role}", subject=role
                )
            )
        cur = await self.conn.execute(
            self.queries["missing_schema_usage"], {"schema": self.schema, "roles": roles}
        )
        for (role,) in await cur.fetchall():
            items.append(
                item(Kind.GRANT_MISSING, Repair.IN_PLACE, subject=role,
                     expected=f"USAGE on schema {self.schema} to {role}")
            )  # fmt: skip
        return items

    # -- probes of the live data -----------------------------------------------------------------

    def _table_ident(self, table: str) -> sql.Identifier:
        return sql.Identifier(self.schema, table)

    async def _rows(self, table: str) -> bool:
        if table not in self._has_rows:
            query = sql.SQL("SELECT EXISTS (SELECT 1 FROM {})").format(self._table_ident(table))
            cur = await self.conn.execute(query)
            row = await cur.fetchone()
            self._has_rows[table] = bool(row and row[0])
        return self._has_rows[table]

    async def _nullability_problem(self, have: TableShape, column: ColumnShape) -> str:
        if not column.not_null:
            return "part of the live primary key" if column.name in have.primary_key else ""
        query = sql.SQL("SELECT EXISTS (SELECT 1 FROM {} WHERE {} IS NULL)").format(
            self._table_ident(have.name), sql.Identifier(column.name)
        )
        cur = await self.conn.execute(query)
        row = await cur.fetchone()
        if row and row[0]:
            return "the column holds NULLs: values must be computed from events"
        return ""

    async def _cast_problem(self, table: str, found: ColumnShape, want: ColumnShape) -> str:
        """Why the live column cannot be converted in place, or "" when it can: Postgres casts the
        old type to the new one implicitly (a widening) and every stored value survives the
        round trip old → new → old."""
        if want.special or found.special:
            return "an identity or generated column"
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


@dataclass(frozen=True)
class _ItemMaker:
    """Makes the drift items of one projection's table (or of the projection, without a table)."""

    projection: str
    table: str | None

    def __call__(
        self,
        kind: Kind,
        repair: Repair,
        *,
        column: str | None = None,
        expected: str | None = None,
        actual: str | None = None,
        reason: str = "",
        subject: str | None = None,
    ) -> Drift:
        return Drift(
            self.projection, self.table, column, kind, expected, actual, repair, reason, subject
        )


def _security(item: _ItemMaker, want: TableShape, have: TableShape) -> list[Drift]:
    """Row-level security switched on and forced, and exactly projectord's read and write
    policies."""
    items = []
    if not have.rls_enabled:
        items.append(item(Kind.RLS_NOT_ENABLED, Repair.IN_PLACE, expected="enabled",
                          actual="disabled"))  # fmt: skip
    if not have.rls_forced:
        items.append(item(Kind.RLS_NOT_FORCED, Repair.IN_PLACE, expected="forced",
                          actual="not forced",
                          reason="without FORCE the table's owner reads every row"))  # fmt: skip
    for name in POLICIES:
        items += _policy(item, name, want.policies.get(name), have.policies.get(name))
    for name in sorted(set(have.policies) - set(POLICIES)):
        # A permissive policy is OR-ed with projectord's read policy: it widens who reads what,
        # so repair drops it as it revokes an extra grant. A restrictive one only narrows.
        permissive = have.policies[name].permissive
        reason = (
            "a permissive policy widens what read_access implies"
            if permissive
            else "another policy changes what read_access implies"
        )
        repair = Repair.IN_PLACE if permissive else Repair.DROP
        actual = f"{name}: {have.policies[name].describe()}"
        items.append(item(Kind.EXTRA_POLICY, repair, subject=name, actual=actual, reason=reason))
    return items


def _policy(
    item: _ItemMaker, name: str, wanted: PolicyShape | None, found: PolicyShape | None
) -> list[Drift]:
    """One of projectord's policies, compared as a whole: a policy with more roles than declared
    (widened) is as different as one with fewer."""
    if wanted is not None and found is None:
        return [item(Kind.POLICY_MISSING, Repair.IN_PLACE, expected=wanted.describe(),
                     subject=name)]  # fmt: skip
    if found is not None and wanted != found:
        return [item(Kind.POLICY_DIFFERENT, Repair.IN_PLACE, subject=name,
                     expected=wanted.describe() if wanted else None,
                     actual=found.describe())]  # fmt: skip
    return []


async def _schema_trust(
    conn: AsyncConnection[Any], queries: Queries, schemas: Sequence[str]
) -> list[Drift]:
    """CREATE on the read-model schema or projectord's, held by a role that should not, and what
    such roles own there: code that runs as projectord when a name resolves to it. Manual: the
    schema's owner revokes and drops."""
    items = []
    for found in await untrusted_schema_findings(conn, queries, schemas):
        if isinstance(found, UntrustedCreate):
            items.append(
                Drift(None, None, None, Kind.SCHEMA_CREATE, "CREATE for its owner only",
                      found.describe(), Repair.MANUAL, subject=found.role,
                      reason=f"REVOKE CREATE ON SCHEMA {sql_identifier(found.schema).as_string()}"
                      f" FROM {'PUBLIC' if found.role == 'public' else display_name(found.role)}")
            )  # fmt: skip
        else:
            items.append(
                Drift(None, None, None, Kind.FOREIGN_OBJECT, None, found.describe(),
                      Repair.MANUAL, subject=found.owner,
                      reason="they run as projectord when a name resolves to them: drop them")
            )  # fmt: skip
    return items


def _why_extra(privilege: str) -> str:
    if privilege == "SELECT":
        return "not a read_access role"
    if privilege.endswith(GRANT_OPTION):
        return "a grant option lets it pass SELECT on"
    return "only projectord writes a read model"


def _repair(reason: str) -> Repair:
    """A reason against changing in place means a rebuild."""
    return Repair.REBUILD if reason else Repair.IN_PLACE


def _key(columns: Sequence[str]) -> str | None:
    return f"({', '.join(columns)})" if columns else None


def _nullability(column: ColumnShape) -> str:
    return "NOT NULL" if column.not_null else "NULL"
