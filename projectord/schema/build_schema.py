"""The schema a build makes its tables in: an online rebuild's shadow, a version's build, and the
schemas old tables are moved to by a swap.

A build's tables keep their declared names, so each build gets a schema of its own and its swap
moves them with `ALTER TABLE ... SET SCHEMA`. Two things can stand in the way, and each is told
to the operator with what to run, instead of Postgres's bare "permission denied for database app"
or "must be owner of schema ...":

- Creating a schema needs CREATE on the database, which the least-privilege setup grants for that
  reason (docs/security-roles.md).
- The names are predictable (a hash of the projection's name), so another role with CREATE on
  the database could make one first. Such a schema is never used, filled or dropped: its tables,
  triggers and default privileges would be written or run as projectord's role.

A daemon's build retries either with its backoff, so it starts once the cause is gone, without a
restart; a command reports it and exits.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import AsyncConnection, sql

from projectord.queries import Queries, quote_ident

_Access = tuple[bool, str, str, str | None]  # may create, role, database, schema's owner


async def _access(conn: AsyncConnection[Any], queries: Queries, name: str) -> _Access:
    cur = await conn.execute(queries["build_schema_access"], {"schema": name})
    row = await cur.fetchone()
    assert row is not None
    return row


def _refusal(access: _Access, name: str) -> str | None:
    may_create, role, database, owner = access
    if owner is not None and owner != role:
        return (
            f"schema {name}, which a build of projectord uses, was made by role {owner}, not by"
            f" {role}: a build never uses or drops another role's schema; drop it as {owner} or"
            f" a superuser once you have checked it: DROP SCHEMA {quote_ident(name)} CASCADE"
        )
    if owner is None and not may_create:
        return (
            f"cannot create schema {name} for a build's tables: role {role} lacks CREATE on"
            f" database {database}; GRANT CREATE ON DATABASE {quote_ident(database)}"
            f" TO {quote_ident(role)}"
        )
    return None


async def build_schema_refusal(
    conn: AsyncConnection[Any], queries: Queries, name: str
) -> str | None:
    """Why this role may not make (or use) schema `name` for a build; None if it may."""
    return _refusal(await _access(conn, queries, name), name)


async def build_schema_exists(conn: AsyncConnection[Any], queries: Queries, name: str) -> bool:
    """Whether schema `name` exists (made by this role). InsufficientPrivilege, saying what to
    run, when another role made it."""
    access = await _access(conn, queries, name)
    if access[3] is None:
        return False
    if why := _refusal(access, name):
        raise psycopg.errors.InsufficientPrivilege(why)
    return True


async def create_build_schema(conn: AsyncConnection[Any], queries: Queries, name: str) -> None:
    """CREATE SCHEMA `name`, or InsufficientPrivilege saying what to grant or drop first (a
    database error: a daemon's build retries it)."""
    if why := await build_schema_refusal(conn, queries, name):
        raise psycopg.errors.InsufficientPrivilege(why)
    await conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(name)))
