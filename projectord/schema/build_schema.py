"""The schema a build makes its tables in: an online rebuild's shadow, a version's build.

A build's tables keep their declared names, so each build gets a schema of its own and its swap
moves them with `ALTER TABLE ... SET SCHEMA`. Creating a schema needs CREATE on the database,
which the least-privilege setup grants for that reason (docs/security-roles.md). Without it
Postgres says only "permission denied for database app"; the operator is told the GRANT to run
instead, in the reply of `rebuild --online` and in a build's status and health. The build is
retried with its backoff, so it starts once the grant is made, without a restart.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import AsyncConnection, sql

from projectord.queries import Queries, quote_ident


async def missing_grant(conn: AsyncConnection[Any], queries: Queries, name: str) -> str | None:
    """Why this role may not create schema `name` for a build, naming the GRANT; None if it may."""
    cur = await conn.execute(queries["may_create_schemas"])
    row = await cur.fetchone()
    assert row is not None
    may_create, role, database = row
    if may_create:
        return None
    return (
        f"cannot create schema {name} for a build's tables: role {role} lacks CREATE on"
        f" database {database}; GRANT CREATE ON DATABASE {quote_ident(database)}"
        f" TO {quote_ident(role)}"
    )


async def create_build_schema(conn: AsyncConnection[Any], queries: Queries, name: str) -> None:
    """CREATE SCHEMA `name`, or InsufficientPrivilege naming the role, the database and the
    GRANT when the role may not create schemas (a database error: a build retries it)."""
    if why := await missing_grant(conn, queries, name):
        raise psycopg.errors.InsufficientPrivilege(why)
    await conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(name)))
