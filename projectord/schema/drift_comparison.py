"""Drift comparison: the drift items that follow from two snapshots, the declared tables and what
the database holds. Pure: no connection, no I/O, so every rule below is testable on snapshots built
by hand (tests/unit/test_drift_comparison.py).

Some repairs depend on the live data as well as on the catalog: whether a table has rows (a NOT
NULL column without a default cannot be added in place to a table that has some), whether a column
holds NULLs, whether stored values survive a type change, whether a projection whose table is
missing has applied events. `data_questions` says which of these a comparison needs; the reader
(`drift`) asks the database exactly those, and hands the answers (`LiveData`) to `compare`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

from psycopg import sql

from projectord.projection import Projection
from projectord.schema.catalog import ColumnShape, PolicyShape, TableShape
from projectord.schema.drift_items import (
    GRANT_OPTION,
    Drift,
    Kind,
    Repair,
    display_name,
    sql_identifier,
)
from projectord.schema.drift_snapshot import (
    DatabaseSnapshot,
    DataQuestions,
    LiveData,
    ProjectionGrants,
)
from projectord.schema.foreign_owner import ForeignCode, ForeignTable
from projectord.schema.schema_trust import ForeignObjects, UntrustedCreate
from projectord.schema.security import POLICIES


class _TableState(Enum):
    FOREIGN = "foreign"  # another role owns it: reported, never compared
    MISSING = "missing"
    RULED = "ruled"  # a rule may rewrite the probes' reads: compared no further
    COMPARED = "compared"


def _state(table: str, db: DatabaseSnapshot) -> _TableState:
    if table in db.foreign:
        return _TableState.FOREIGN
    if table not in db.tables:
        return _TableState.MISSING
    if any(code.kind == "rule" for code in db.code.get(table, [])):
        return _TableState.RULED
    return _TableState.COMPARED


def data_questions(
    projections: Sequence[Projection], expected: dict[str, TableShape], db: DatabaseSnapshot
) -> DataQuestions:
    """Exactly the live data `compare` will look up for these snapshots: nothing is read from a
    table whose repair does not depend on it, or from a table that is not compared."""
    questions = DataQuestions()
    for projection in projections:
        for table in projection.tables:
            state = _state(table, db)
            if state is _TableState.MISSING:
                questions.applied_events.add(projection.name)
            if state is not _TableState.COMPARED:
                continue
            want, have = expected[table], db.tables[table]
            for column in want.columns.values():
                found = have.columns.get(column.name)
                if found is None:
                    if _missing_column_obstacle(want, column) is None:
                        questions.rows.add(table)
                    continue
                if column.type != found.type and not (column.special or found.special):
                    questions.casts.append((table, found, column))
                if column.not_null and not found.not_null:
                    questions.nulls.add((table, column.name))
    return questions


def compare(
    projections: Sequence[Projection],
    expected: dict[str, TableShape],
    db: DatabaseSnapshot,
    data: LiveData,
) -> list[Drift]:
    """Every difference between the declared tables (`expected`) and the database (`db`, `data`),
    in a stable order: the schema's owner, each projection's tables in declaration order with their
    grants and readers, then the schemas' trust."""
    items: list[Drift] = []
    if db.schema_owner is not None:
        items.append(_schema_owner(db.schema, *db.schema_owner))
    for projection in projections:
        items += _Comparer(db, data).projection(projection, expected)
    items += _schema_trust(db.untrusted)
    return items


def _schema_owner(schema: str, owner: str, role: str) -> Drift:
    """The read-model schema owned by a role that is neither projectord's nor a superuser: that
    role can drop any read-model table and put its own in place. The daemon then refuses the
    projection (its batches check their tables), but the owner can also read and change every
    table in the schema, so it must be trusted; only an administrator can change it."""
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
    """Compares one projection's tables; where the repair class depends on the live data (NULLs
    present, rows present, a cast that would lose values) it looks the answer up in `data`."""

    db: DatabaseSnapshot
    data: LiveData

    def projection(self, projection: Projection, expected: dict[str, TableShape]) -> list[Drift]:
        items: list[Drift] = []
        for table in projection.tables:
            state = _state(table, self.db)
            if state is _TableState.FOREIGN:
                items.append(_foreign_owner(projection, self.db.foreign[table]))
                continue
            if state is _TableState.MISSING:
                items.append(self._missing_table(projection, table))
                continue
            found = self.db.code.get(table, [])
            items += [_foreign_code(projection, code, self.db.schema) for code in found]
            if state is _TableState.COMPARED:
                items += self._table(projection, expected[table], self.db.tables[table])
        grants = self.db.grants.get(projection.name, ProjectionGrants())
        items += [
            _ItemMaker(projection.name, grant.table)(
                Kind.EXTRA_GRANT, Repair.IN_PLACE, column=grant.column, actual=grant.privilege,
                subject=grant.role,
                reason=f"held by {display_name(grant.role)}: {_why_extra(grant.privilege)}",
            )
            for grant in grants.extra
        ]  # fmt: skip
        if projection.read_access:
            items += self._readers(projection, grants)
        return items

    def _table(self, projection: Projection, want: TableShape, have: TableShape) -> list[Drift]:
        item = _ItemMaker(projection.name, want.name)
        items: list[Drift] = []
        for column in want.columns.values():
            found = have.columns.get(column.name)
            if found is None:
                items.append(self._missing_column(item, want, column))
            else:
                items += self._column(item, have, column, found)
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

    def _missing_table(self, projection: Projection, table: str) -> Drift:
        item = _ItemMaker(projection.name, table)
        if self.data.applied_events[projection.name]:
            return item(Kind.MISSING_TABLE, Repair.REBUILD, expected="table",
                        reason="the projection has applied events: fill it from them")  # fmt: skip
        return item(Kind.MISSING_TABLE, Repair.IN_PLACE, expected="table")

    def _missing_column(self, item: _ItemMaker, want: TableShape, column: ColumnShape) -> Drift:
        reason = _missing_column_obstacle(want, column)
        if reason is None:
            has_rows = self.data.rows[want.name]
            reason = (
                "NOT NULL without a default: existing rows need values computed from events"
                if has_rows
                else ""
            )
        return item(Kind.MISSING_COLUMN, _repair(reason), column=column.name,
                    expected=column.definition(), reason=reason)  # fmt: skip

    def _column(
        self, item: _ItemMaker, have: TableShape, column: ColumnShape, found: ColumnShape
    ) -> list[Drift]:
        items = []
        name = column.name
        if column.type != found.type:
            if column.special or found.special:
                reason = "an identity or generated column"
            else:
                reason = self.data.cast_problems[(have.name, name)]
            items.append(
                item(Kind.TYPE_MISMATCH, _repair(reason), column=name, expected=column.type,
                     actual=found.type, reason=reason)
            )  # fmt: skip
        if column.not_null != found.not_null:
            reason = self._nullability_problem(have, column)
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

    def _nullability_problem(self, have: TableShape, column: ColumnShape) -> str:
        if not column.not_null:
            return "part of the live primary key" if column.name in have.primary_key else ""
        if self.data.nulls[(have.name, column.name)]:
            return "the column holds NULLs: values must be computed from events"
        return ""

    def _readers(self, projection: Projection, grants: ProjectionGrants) -> list[Drift]:
        """Roles, grants and schema access for the projection's readers."""
        item = _ItemMaker(projection.name, None)
        items = [
            item(Kind.ROLE_MISSING, Repair.MANUAL, expected=f"role {role}", subject=role,
                 reason=f"create it, e.g. CREATE ROLE {sql.Identifier(role).as_string()} NOLOGIN")
            for role in projection.read_access
            if role not in self.db.readers
        ]  # fmt: skip
        for table, role in grants.missing_select:
            items.append(
                _ItemMaker(projection.name, table)(
                    Kind.GRANT_MISSING, Repair.IN_PLACE, expected=f"SELECT to {role}", subject=role
                )
            )
        for role in grants.missing_usage:
            items.append(
                item(Kind.GRANT_MISSING, Repair.IN_PLACE, subject=role,
                     expected=f"USAGE on schema {self.db.schema} to {role}")
            )  # fmt: skip
        return items


def _missing_column_obstacle(want: TableShape, column: ColumnShape) -> str | None:
    """Why a missing column cannot be added in place whatever the data ("" when it always can), or
    None when that depends on whether the table has rows (NOT NULL without a default)."""
    if column.name in want.primary_key:
        return "part of the primary key"
    if column.special or uses_sequence(column.default):
        return "an identity, generated or serial column"
    if column.not_null and column.default is None:
        return None
    return ""


def _foreign_owner(projection: Projection, table: ForeignTable) -> Drift:
    """Only reported: comparing it further would read a table whose policies are another role's
    code, and repairing it would adopt that role's triggers."""
    return _ItemMaker(projection.name, table.table)(
        Kind.FOREIGN_OWNER, Repair.MANUAL, expected=f"owner {table.role}",
        actual=f"owner {table.owner}", subject=table.owner,
        reason="projectord does not write into it (its triggers would run as projectord):"
        " inspect it, then drop it or ALTER TABLE … OWNER TO projectord's role",
    )  # fmt: skip


def _foreign_code(projection: Projection, code: ForeignCode, schema: str) -> Drift:
    """A trigger or rule: a projection declares none, so it is someone's code that runs as
    projectord on every batch (revoking the TRIGGER privilege does not remove a trigger). Left for
    an operator, who decides whose it is: dropping another's code is not repair's to do. The
    daemon refuses the projection meanwhile."""
    kind = Kind.FOREIGN_TRIGGER if code.kind == "trigger" else Kind.FOREIGN_RULE
    actual = f"{code.kind} {code.name}"
    if code.function is not None:
        actual += f" (function {code.function}, owned by {code.function_owner})"
    return _ItemMaker(projection.name, code.table)(
        kind, Repair.MANUAL, expected="none", actual=actual, subject=code.name,
        reason="projectord does not write into it (the code would run as projectord):"
        f" inspect it, then {code.drop_sql(schema)}",
    )  # fmt: skip


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


def _schema_trust(findings: Sequence[UntrustedCreate | ForeignObjects]) -> list[Drift]:
    """CREATE on the read-model schema or projectord's, held by a role that should not, and what
    such roles own there: code that runs as projectord when a name resolves to it. Manual: the
    schema's owner revokes and drops."""
    items = []
    for found in findings:
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
