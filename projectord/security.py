"""Row-level security from a projection's `read_access`.

A table of a projection that declares `read_access` gets:
- `ENABLE` and `FORCE ROW LEVEL SECURITY`: without FORCE the table's owner bypasses every policy;
- one SELECT policy, `projectord_read`, for the `read_access` roles that exist: a session reads a
  row only when its request claims (`request.jwt.claims`, the PostgREST/Supabase convention) name
  a role in `read_access` and the row's `tenant_id`. The claims are parsed by
  `<schema>.request_claims()` / `request_tenant_id()`, which turn missing or malformed claims into
  NULL, so such a session reads nothing rather than failing. Each is wrapped in a scalar subquery,
  evaluated once per query instead of once per row;
- `GRANT SELECT` to those roles (and `USAGE` on the read-model schema when they lack it).

There is no INSERT, UPDATE or DELETE policy, so under FORCE nobody writes these tables except a role
that bypasses row-level security. projectord's own role therefore needs `BYPASSRLS` (superusers
have it). A writer policy for the daemon's role would work too, but it would also let anyone who can
become that role read every tenant; `BYPASSRLS` keeps the tables' policies about readers only, and
it is one attribute to check. The daemon checks it at start-up (`check_write_access`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from psycopg import AsyncConnection, sql

from projectord.logs import get_logger
from projectord.projection import Projection
from projectord.queries import Queries

log = get_logger("projectord.security")

READ_POLICY = "projectord_read"
TENANT_COLUMN = "tenant_id"


class SecurityError(Exception):
    """projectord's role cannot write under the row-level security in place; one line."""


def reader_policy(
    table: sql.Composable, schema: str, read_access: Sequence[str], roles: Iterable[str]
) -> sql.Composed:
    """The SELECT policy `read_access` implies, for the reader `roles` that exist."""
    claimed_roles = sql.SQL(", ").join(sql.Literal(role) for role in read_access)
    return sql.SQL(
        "CREATE POLICY {policy} ON {table} AS PERMISSIVE FOR SELECT TO {roles}"
        " USING ((SELECT {schema}.request_claims() ->> 'role') = ANY (ARRAY[{claimed}]::text[])"
        " AND {tenant} = (SELECT {schema}.request_tenant_id()))"
    ).format(
        policy=sql.Identifier(READ_POLICY),
        table=table,
        roles=sql.SQL(", ").join(sql.Identifier(role) for role in sorted(roles)),
        schema=sql.Identifier(schema),
        claimed=claimed_roles,
        tenant=sql.Identifier(TENANT_COLUMN),
    )


def enable_rls(table: sql.Composable) -> sql.Composed:
    return sql.SQL("ALTER TABLE {} ENABLE ROW LEVEL SECURITY").format(table)


def force_rls(table: sql.Composable) -> sql.Composed:
    return sql.SQL("ALTER TABLE {} FORCE ROW LEVEL SECURITY").format(table)


def drop_policy(table: sql.Composable, policy: str) -> sql.Composed:
    return sql.SQL("DROP POLICY {} ON {}").format(sql.Identifier(policy), table)


def grant_select(table: sql.Composable, role: str) -> sql.Composed:
    return sql.SQL("GRANT SELECT ON {} TO {}").format(table, sql.Identifier(role))


def grant_schema_usage(schema: str, role: str) -> sql.Composed:
    return sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(
        sql.Identifier(schema), sql.Identifier(role)
    )


def policy_statements(
    table: sql.Composable, schema: str, projection: Projection, roles: Iterable[str]
) -> list[sql.Composed]:
    """RLS switched on and forced, and the reader policy when a reader role exists: the policies a
    table of `projection` must have. Empty when the projection declares no `read_access`."""
    if not projection.read_access:
        return []
    statements = [enable_rls(table), force_rls(table)]
    roles = sorted(roles)
    if roles:
        statements.append(reader_policy(table, schema, projection.read_access, roles))
    return statements


def secure_statements(
    table: sql.Composable, schema: str, projection: Projection, roles: Iterable[str]
) -> list[sql.Composed]:
    """Everything a new table of `projection` needs: its policies and the readers' grants."""
    roles = sorted(roles)
    if not projection.read_access:
        return []
    return policy_statements(table, schema, projection, roles) + [
        grant_select(table, role) for role in roles
    ]


def check_declaration(projection: Projection) -> str | None:
    """Why the projection's `read_access` cannot be enforced, or None."""
    if not projection.read_access:
        return None
    for table_name, table in projection.tables.items():
        if TENANT_COLUMN not in table.columns:
            return (
                f"projection {projection.name!r} declares read_access but its table"
                f" {table_name!r} has no {TENANT_COLUMN} column to scope readers by"
            )
    return None


async def existing_roles(
    conn: AsyncConnection[Any], queries: Queries, roles: Iterable[str]
) -> set[str]:
    cur = await conn.execute(queries["existing_roles"], {"roles": sorted(set(roles))})
    return {row[0] for row in await cur.fetchall()}


async def current_role(conn: AsyncConnection[Any], queries: Queries) -> tuple[str, bool]:
    """The connection's role and whether row-level security is bypassed for it."""
    cur = await conn.execute(queries["current_role_bypasses_rls"])
    row = await cur.fetchone()
    assert row is not None
    return str(row[0]), bool(row[1])


async def check_write_access(
    conn: AsyncConnection[Any], queries: Queries, schema: str, projections: Sequence[Projection]
) -> None:
    """Raise SecurityError when row-level security would stop this role's writes to a projection's
    tables in `schema`; warn when declared `read_access` will once its drift is repaired."""
    tables = [name for projection in projections for name in projection.tables]
    cur = await conn.execute(
        queries["rls_tables_blocking_writes"], {"schema": schema, "tables": tables}
    )
    blocked = [row[0] for row in await cur.fetchall()]
    role, bypasses = await current_role(conn, queries)
    if blocked:
        raise SecurityError(
            f"database role {role!r} cannot write to row-level-secured table(s)"
            f" {', '.join(f'{schema}.{name}' for name in blocked)}: projectord's role needs"
            f" BYPASSRLS (ALTER ROLE {sql.Identifier(role).as_string()} BYPASSRLS)"
        )
    if not bypasses and any(projection.read_access for projection in projections):
        log.warning(
            "security.bypassrls_missing",
            role=role,
            hint="repairing read_access drift forces row-level security, which will stop this"
            " role's writes; grant it BYPASSRLS first",
        )
