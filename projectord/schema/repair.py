"""Drift repair: the SQL that removes the drift a check found, printed (dry run) or applied.

In-place changes run in one transaction, so a repair that fails half-way changes nothing. Drift
that needs a table's contents recomputed is repaired by a versioned rebuild of its projection
(`versioned_repair`: the path of a version bump, built by the daemon and swapped in, the replaced
tables kept for a rollback), after the in-place changes commit; the in-place changes of the tables
a rebuild replaces are left out, since the rebuilt tables are created as declared. Nothing is
dropped (an extra column or policy, or by a rebuild a table with extra columns) unless `drop_extra`
is given.
Repair is idempotent: once applied, the next check finds nothing and the next repair does nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from psycopg import AsyncConnection, sql

from projectord.config import Settings
from projectord.database import connect
from projectord.logs import get_logger
from projectord.projection import Projection
from projectord.queries import Queries
from projectord.runner.checkpoint_store import CheckpointStore
from projectord.schema.catalog import TableShape
from projectord.schema.drift import Inspection, inspect
from projectord.schema.drift_items import (
    GRANT_OPTION,
    Drift,
    Kind,
    Repair,
    printable,
    sql_identifier,
)
from projectord.schema.migrations import declaration_search_path
from projectord.schema.online_rebuild import RebuildError, check_serving_version
from projectord.schema.security import (
    WRITE_POLICY,
    drop_policy,
    enable_rls,
    force_rls,
    grant_schema_usage,
    grant_select,
    reader_policy,
    secure_statements,
    writer_policy,
)
from projectord.schema.versioned_repair import complete_rebuilds, request_rebuild

log = get_logger("projectord.schema.repair")

REBUILD_TIMEOUT = 600.0  # seconds `--apply` waits for a daemon's versioned rebuild to swap in
LOCK_TIMEOUT = "10s"  # an in-place repair waits this long for a table's lock, then fails cleanly
# What init brings in line with `read_access` by itself: switching row-level security on and the
# grants. Columns, indexes and extra policies are left to `drift repair` (they may need a rebuild,
# or an explicit --drop-extra); a missing role needs an operator.
SECURITY_KINDS = frozenset(
    {
        Kind.RLS_NOT_ENABLED,
        Kind.RLS_NOT_FORCED,
        Kind.POLICY_MISSING,
        Kind.POLICY_DIFFERENT,
        Kind.GRANT_MISSING,
    }
)


class RepairError(Exception):
    """A repair that must not or could not be applied; one line for an operator."""


@dataclass
class RepairPlan:
    steps: list[tuple[Drift, list[sql.Composable]]] = field(default_factory=list)
    rebuilds: dict[str, list[Drift]] = field(default_factory=dict)  # projection → its drift
    left: list[tuple[Drift, str]] = field(default_factory=list)  # not repaired, and why

    def statements(self) -> list[sql.Composable]:
        return [statement for _, statements in self.steps for statement in statements]


async def drift_repair(
    dsn: str,
    settings: Settings,
    projections: Sequence[Projection],
    *,
    apply: bool = False,
    drop_extra: bool = False,
    wait: bool = True,
) -> dict[str, Any]:
    """Plan the repair of the projections' drift; with `apply`, carry it out. Returns JSON:
    the drift found, the SQL, the projections rebuilt (versioned rebuilds), and what was left
    and why. `wait`: return once the rebuilds have swapped in (built here when no daemon runs);
    without, once they are recorded (the daemon answering a control request builds them)."""
    conn = await connect(dsn, autocommit=True, connect_timeout=10)
    async with conn:
        inspection = await inspect(conn, settings, projections)
        await check_versions(conn, settings, inspection)
        plan = plan_repair(inspection, settings, drop_extra=drop_extra)
        result = describe_plan(conn, inspection, plan) | {"applied": False}
        if not apply:
            return result
        await apply_in_place(conn, plan, inspection.schema)
        rebuilt = [
            projection
            for projection in (inspection.projections[name] for name in plan.rebuilds)
            if await request_rebuild(conn, settings, projection)
        ]
    if wait and rebuilt:
        await complete_rebuilds(dsn, settings, rebuilt, timeout=REBUILD_TIMEOUT)
    return result | {"applied": True}


async def check_versions(
    conn: AsyncConnection[Any], settings: Settings, inspection: Inspection
) -> None:
    """Refuse, before anything changes, a repair by code whose version of a drifted projection
    is not the serving one: the live tables are that version's, and another version's declaration
    (a bump being built, a host not yet upgraded) would alter them to its own shape."""
    checkpoints = CheckpointStore(Queries(settings.schema))
    for name in sorted({item.projection for item in inspection.items if item.projection}):
        try:
            await check_serving_version(conn, checkpoints, inspection.projections[name])
        except RebuildError as exc:
            raise RepairError(f"drift repair refused, nothing changed: {exc}") from None


async def secure_tables(
    conn: AsyncConnection[Any], settings: Settings, projections: Sequence[Projection]
) -> list[str]:
    """Give the existing tables of the projections that declare `read_access` their row-level
    security, policies and grants, where they differ (on `conn`, inside the caller's transaction
    when there is one); return what was done. This is how `init` leaves no drift behind, and how a
    database secured by an older projectord gets the current policies."""
    secured = [projection for projection in projections if projection.read_access]
    if not secured:
        return []
    inspection = await inspect(conn, settings, secured)
    builder = _StatementBuilder(inspection, settings)
    plan = RepairPlan()
    for item in inspection.items:
        if item.kind in SECURITY_KINDS and item.repair is Repair.IN_PLACE:
            plan.steps.append((item, builder.statements(item)))
    await apply_in_place(conn, plan, inspection.schema)
    return [_secured(inspection.schema, item) for item, _ in plan.steps]


def _secured(schema: str, item: Drift) -> str:
    """One line of `init`'s output for a security item it repaired."""
    where = f"{schema}.{item.table}" if item.table else f"schema {schema}"
    return f"{item.kind.value} on {where}" + (f" ({item.subject})" if item.subject else "")


def plan_repair(inspection: Inspection, settings: Settings, *, drop_extra: bool) -> RepairPlan:
    plan = RepairPlan()
    for item in inspection.items:
        if item.repair is Repair.REBUILD and item.projection:
            plan.rebuilds.setdefault(item.projection, []).append(item)
    for name in list(plan.rebuilds):
        extras = [i for i in inspection.items if i.projection == name and i.repair is Repair.DROP]
        if extras and not drop_extra:
            for item in plan.rebuilds.pop(name):
                plan.left.append((item, "rebuilding would drop extras: pass --drop-extra"))
    rebuilt = {t for name in plan.rebuilds for t in inspection.projections[name].tables}
    builder = _StatementBuilder(inspection, settings)
    for item in inspection.items:
        if item.repair is Repair.REBUILD or (item.table in rebuilt and item.projection):
            continue
        if item.repair is Repair.MANUAL:
            plan.left.append((item, item.reason))
        elif item.repair is Repair.DROP and not drop_extra:
            plan.left.append((item, "kept: pass --drop-extra to drop it"))
        else:
            plan.steps.append((item, builder.statements(item)))
    # Revokes first: a column-level grant's REVOKE names the column, so after the column's DROP
    # it would fail, and with it the whole transaction. (Stable: the rest keeps its order.)
    plan.steps.sort(key=lambda step: step[0].kind is not Kind.EXTRA_GRANT)
    return plan


def describe_plan(
    conn: AsyncConnection[Any], inspection: Inspection, plan: RepairPlan
) -> dict[str, Any]:
    return {
        "drift": [item.as_json() for item in inspection.items],
        "statements": [statement.as_string(conn) for statement in plan.statements()],
        "rebuilds": sorted(plan.rebuilds),
        "rebuild_versions": {
            name: inspection.projections[name].version for name in sorted(plan.rebuilds)
        },
        "left": [item.as_json() | {"why": why} for item, why in plan.left],
    }


def plan_text(result: dict[str, Any], schema: str) -> list[str]:
    """The dry run as an operator reads it: SQL, with what is not done as comments."""
    lines = [f"{statement};" for statement in result["statements"]]
    for name in result["rebuilds"]:
        version = result.get("rebuild_versions", {}).get(name)
        lines.append(
            f"-- versioned rebuild of projection {name} (version {version}): its tables built as"
            " declared in a shadow schema by the daemon, swapped in once caught up; the replaced"
            f" tables kept as version {version} (`projectord versions list`, `projectord rollback"
            f" {name}`)"
        )
    for item in result["left"]:
        where = Drift.from_json({k: v for k, v in item.items() if k != "why"}).where(schema)
        lines.append(printable(f"-- not repaired: {where}: {item['kind']}: {item['why']}"))
    return lines or ["-- no drift: nothing to do"]


async def apply_in_place(conn: AsyncConnection[Any], plan: RepairPlan, schema: str) -> None:
    """Run the in-place statements in one transaction; `schema` is the read-model schema."""
    statements = plan.statements()
    if not statements:
        return
    async with conn.transaction():
        await conn.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(LOCK_TIMEOUT))
        # Declared types (a missing table, an added column) resolve as in init and the check.
        await conn.execute(declaration_search_path(schema))
        for statement in statements:
            await conn.execute(statement)
    log.info("drift.repaired", statements=len(statements))


@dataclass
class _StatementBuilder:
    """The statements that repair one drift item in place."""

    inspection: Inspection
    settings: Settings

    def statements(self, item: Drift) -> list[sql.Composable]:
        schema = self.inspection.schema
        table = sql.Identifier(schema, item.table) if item.table else sql.SQL("")
        column = sql_identifier(item.column) if item.column else sql.SQL("")
        want = self.inspection.expected.get(item.table or "")
        alter = sql.SQL("ALTER TABLE {} ").format(table)
        match item.kind:
            case Kind.MISSING_TABLE:
                return self._create_table(item)
            case Kind.MISSING_COLUMN:
                definition = _column(want, item).definition()
                return [alter + sql.SQL("ADD COLUMN {} {}").format(column, sql.SQL(definition))]
            case Kind.TYPE_MISMATCH:
                new_type = sql.SQL(_column(want, item).type)
                return [alter + sql.SQL("ALTER COLUMN {} TYPE {}").format(column, new_type)]
            case Kind.NULLABILITY_MISMATCH:
                change = "SET NOT NULL" if _column(want, item).not_null else "DROP NOT NULL"
                return [alter + sql.SQL("ALTER COLUMN {} " + change).format(column)]
            case Kind.DEFAULT_MISMATCH:
                default = _column(want, item).default
                change = sql.SQL("DROP DEFAULT" if default is None else f"SET DEFAULT {default}")
                return [alter + sql.SQL("ALTER COLUMN {} {}").format(column, change)]
            case Kind.MISSING_INDEX:
                return [_create_index(table, item.expected or "")]
            case Kind.EXTRA_COLUMN:
                return [alter + sql.SQL("DROP COLUMN {}").format(column)]
            case Kind.RLS_NOT_ENABLED:
                return [enable_rls(table)]
            case Kind.RLS_NOT_FORCED:
                return [force_rls(table)]
            case Kind.POLICY_MISSING:
                return [self._policy(table, item)]
            case Kind.POLICY_DIFFERENT:
                return [drop_policy(table, item.subject or ""), self._policy(table, item)]
            case Kind.EXTRA_POLICY:
                drop = sql.SQL("DROP POLICY {} ON {}")
                return [drop.format(sql_identifier(item.subject or ""), table)]
            case Kind.EXTRA_GRANT:
                return [_revoke(table, item)]
            case Kind.GRANT_MISSING if item.table:
                return [grant_select(table, item.subject or "")]
            case Kind.GRANT_MISSING:
                return [grant_schema_usage(schema, item.subject or "")]
        raise RepairError(f"no in-place repair for {item.kind}")

    def _projection(self, item: Drift) -> Projection:
        return self.inspection.projections[item.projection or ""]

    def _create_table(self, item: Drift) -> list[sql.Composable]:
        projection = self._projection(item)
        declared = projection.tables[item.table or ""]
        table = sql.Identifier(self.inspection.schema, item.table or "")
        qualified = table.as_string()
        statements: list[sql.Composable] = [sql.SQL(declared.create_sql(qualified))]
        for columns in declared.indexes:
            cols = sql.SQL(", ").join(sql.Identifier(c) for c in columns)
            statements.append(sql.SQL("CREATE INDEX ON {} ({})").format(table, cols))
        roles = set(projection.read_access) & self.inspection.readers
        return statements + list(secure_statements(table, self.settings.schema, projection, roles))

    def _policy(self, table: sql.Composable, item: Drift) -> sql.Composed:
        if item.subject == WRITE_POLICY:
            return writer_policy(table)
        projection = self._projection(item)
        roles = set(projection.read_access) & self.inspection.readers
        return reader_policy(table, self.settings.schema, projection.read_access, roles)


def _column(want: TableShape | None, item: Drift) -> Any:
    assert want is not None and item.column is not None
    return want.columns[item.column]


def _create_index(table: sql.Composable, described: str) -> sql.Composed:
    """`described` is an IndexShape description, deparsed by Postgres from the declaration."""
    unique = described.startswith("UNIQUE ")
    definition = described.removeprefix("UNIQUE ")
    return sql.SQL("CREATE {}INDEX ON {} {}").format(
        sql.SQL("UNIQUE " if unique else ""), table, sql.SQL(definition)
    )


# What `extra_grant` may name: the table privileges Postgres knows (the catalog's spelling).
PRIVILEGES = frozenset(
    {"INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER", "MAINTAIN", "SELECT"}
)


def _revoke(table: sql.Composable, item: Drift) -> sql.Composed:
    """REVOKE an extra privilege (on the table or one column). CASCADE: also what the grantee
    passed on with a grant option."""
    privilege = item.actual or ""
    option_only = privilege.endswith(GRANT_OPTION)  # a reader keeps SELECT, loses the option
    privilege = privilege.removesuffix(GRANT_OPTION)
    if privilege not in PRIVILEGES:
        raise RepairError(f"unknown privilege {privilege[:40]!r}")
    role = item.subject or ""
    grantee = sql.SQL("PUBLIC") if role == "public" else sql_identifier(role)
    columns = sql.SQL(" ({})").format(sql_identifier(item.column)) if item.column else sql.SQL("")
    return sql.SQL("REVOKE {}{}{} ON {} FROM {} CASCADE").format(
        sql.SQL("GRANT OPTION FOR " if option_only else ""),
        sql.SQL(privilege),
        columns,
        table,
        grantee,
    )
