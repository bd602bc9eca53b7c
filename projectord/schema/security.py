"""Row-level security from a projection's `read_access`.

A table of a projection that declares `read_access` gets:
- `ENABLE` and `FORCE ROW LEVEL SECURITY`: without FORCE the table's owner bypasses every policy;
- one SELECT policy, `projectord_read`, for the `read_access` roles that exist: a session reads a
  row only when its request claims (`request.jwt.claims`, the PostgREST/Supabase convention) name
  a role in `read_access` that the session actually holds (`<schema>.request_role()`: DB role
  "user" claiming "admin" reads nothing) and the row's `tenant_id` (`request_tenant_id()`). Both
  turn missing or malformed claims into NULL, so such a session reads nothing rather than failing.
  Each is wrapped in a scalar subquery, evaluated once per query instead of once per row. The
  claimed tenant cannot be checked by the database: whoever may set the claims chooses it, which
  is why reader roles must be reachable only through a trusted authenticator;
- one write policy, `projectord_write`, `FOR ALL TO CURRENT_USER` (the role running init, the
  daemon's role) with `USING (true) WITH CHECK (true)`: under FORCE it gives back to that role,
  and to no one else, the writes row-level security would stop, so projectord's role needs no
  `BYPASSRLS`, which would exempt it from every policy of the cluster;
- `GRANT SELECT` to those roles (and `USAGE` on the read-model schema when they lack it).

The daemon checks at start-up that row-level security does not stop its writes
(`check_write_access`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from psycopg import AsyncConnection, sql

from projectord.projection import Projection
from projectord.queries import Queries

READ_POLICY = "projectord_read"
WRITE_POLICY = "projectord_write"
POLICIES = (READ_POLICY, WRITE_POLICY)
TENANT_COLUMN = "tenant_id"


class SecurityError(Exception):
    """projectord's role cannot write under the row-level security in place; one line."""


def reader_policy(
    table: sql.Composable, schema: str, read_access: Sequence[str], roles: Iterable[str]
) -> sql.Composed:
    """The SELECT policy `read_access` implies, for the reader `roles` that exist. The claimed
    role counts only when the session holds it (`request_role()`), so a claim cannot lend a
    reader another reader's rows."""
    claimed_roles = sql.SQL(", ").join(sql.Literal(role) for role in read_access)
    return sql.SQL(
        "CREATE POLICY {policy} ON {table} AS PERMISSIVE FOR SELECT TO {roles}"
        " USING ((SELECT {schema}.request_role()) = ANY (ARRAY[{claimed}]::text[])"
        " AND {tenant} = (SELECT {schema}.request_tenant_id()))"
    ).format(
        policy=sql.Identifier(READ_POLICY),
        table=table,
        roles=sql.SQL(", ").join(sql.Identifier(role) for role in sorted(roles)),
        schema=sql.Identifier(schema),
        claimed=claimed_roles,
        tenant=sql.Identifier(TENANT_COLUMN),
    )


def writer_policy(table: sql.Composable) -> sql.Composed:
    """Every row, every command, for the role that creates the policy (projectord's own): what
    FORCE would otherwise take from it, without BYPASSRLS's exemption from every other table's
    policies. Whoever can become that role reads every tenant, exactly as with BYPASSRLS."""
    return sql.SQL(
        "CREATE POLICY {policy} ON {table} AS PERMISSIVE FOR ALL TO CURRENT_USER"
        " USING (true) WITH CHECK (true)"
    ).format(policy=sql.Identifier(WRITE_POLICY), table=table)


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
    """RLS switched on and forced, projectord's write policy, and the reader policy when a reader
    role exists: the policies a table of `projection` must have. Empty when the projection
    declares no `read_access`."""
    if not projection.read_access:
        return []
    statements = [enable_rls(table), force_rls(table), writer_policy(table)]
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
    tables in `schema`: forced (or not owned) and without a write policy for this role. `init`
    creates that policy for the role running it, so this names a table secured for another role."""
    tables = [name for projection in projections for name in projection.tables]
    cur = await conn.execute(
        queries["rls_tables_blocking_writes"],
        {"schema": schema, "tables": tables, "policy": WRITE_POLICY},
    )
    blocked = [row[0] for row in await cur.fetchall()]
    if blocked:
        role, _ = await current_role(conn, queries)
        raise SecurityError(
            f"database role {role!r} cannot write to row-level-secured table(s)"
            f" {', '.join(f'{schema}.{name}' for name in blocked)}: no {WRITE_POLICY} policy"
            f" for it; run `projectord init` or `projectord drift repair --apply` as {role!r}"
        )
