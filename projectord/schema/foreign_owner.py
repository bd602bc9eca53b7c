"""Read-model tables that another role owns: refused, never adopted.

A table's owner decides which code runs when it is written: its triggers, rules, policies, column
defaults. A role that can create tables in the read-model schema could pre-create a projection's
table with an AFTER INSERT trigger that copies every row somewhere it can read; projectord would
then run that trigger as its own role (BYPASSRLS, reading every tenant) on each batch. So a
declared table that projectord's role does not own is never written: `init` reports it, the
projection's runner refuses to run (its other projections carry on), `drift check` reports it as
`foreign_owner`, and an online rebuild does not carry that owner over to the rebuilt table.

A trigger or a rule on a declared table is the same danger on a table projectord does own: a role
given TRIGGER on it (by mistake: `drift repair` revokes the privilege, but not the trigger made
with it) attaches a function that runs as projectord on every write. A projection cannot declare
triggers or rules, so every one found there is someone else's code (`ForeignCode`), and the
projection is refused just the same. Both are checked when the positions row is read and again in
every batch's own transaction, after locking the tables (`guard_tables`, migration 0016): whoever
owns the read-model schema can drop a table and put their own in its place while the daemon runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import AsyncConnection

from projectord.projection import Projection
from projectord.queries import Queries, quote_ident

# What a batch's table check raises (sql/migrations/0016_guard_read_model_tables.sql).
GUARD_SQLSTATE = "PJ002"


class ForeignOwnerError(Exception):
    """A projection's table is owned by another role, or carries a trigger or rule; one line
    naming table and owner, trigger or rule."""


def refused_by_guard(exc: BaseException) -> str | None:
    """The message of a batch's table check that failed (PJ002), or None for any other error:
    such a batch is refused, never retried as a handler failure or dead-lettered."""
    if isinstance(exc, psycopg.Error) and exc.sqlstate == GUARD_SQLSTATE:
        return exc.diag.message_primary or str(exc)
    return None


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


@dataclass(frozen=True)
class ForeignCode:
    """A trigger or rule on a declared table: code a projection cannot declare, so not its own."""

    table: str
    kind: str  # "trigger" or "rule"
    name: str
    function: str | None  # a trigger's function, as regprocedure text
    function_owner: str | None

    def describe(self, schema: str) -> str:
        where = f"{quote_ident(schema)}.{quote_ident(self.table)}"
        text = f"{where} has {self.kind} {quote_ident(self.name)}"
        if self.function is not None:
            owner = quote_ident(self.function_owner or "")
            text += f" (function {self.function}, owned by role {owner})"
        return text

    def drop_sql(self, schema: str) -> str:
        """What an operator runs once satisfied the code is not wanted."""
        verb = "DROP TRIGGER" if self.kind == "trigger" else "DROP RULE"
        return f"{verb} {quote_ident(self.name)} ON {quote_ident(schema)}.{quote_ident(self.table)}"


async def foreign_code(
    conn: AsyncConnection[Any], queries: Queries, schema: str, tables: Sequence[str]
) -> list[ForeignCode]:
    """The triggers and rules on those of `tables` in `schema` that exist (catalog only)."""
    cur = await conn.execute(queries["foreign_code"], {"schema": schema, "tables": list(tables)})
    return [ForeignCode(*row) for row in await cur.fetchall()]


def refusal(
    projection: str,
    schema: str,
    foreign: Sequence[ForeignTable],
    code: Sequence[ForeignCode] = (),
) -> ForeignOwnerError:
    """Why `projection` does not run: its tables' owners, triggers and rules, and what an
    operator does about it."""
    found = "; ".join([t.describe(schema) for t in foreign] + [c.describe(schema) for c in code])
    return ForeignOwnerError(
        f"projection {projection!r} does not write into tables another role owns or that carry"
        f" triggers or rules (their code would run as projectord): {found}. Inspect them, then"
        " drop them, or `ALTER TABLE … OWNER TO` projectord's role and drop the triggers and"
        " rules"
    )


async def refused_projections(
    conn: AsyncConnection[Any], queries: Queries, schema: str, projections: Sequence[Projection]
) -> list[ForeignOwnerError]:
    """Why each projection whose existing tables another role owns, or that carry triggers or
    rules, will not run: `init` does not adopt such tables, and says so."""
    found = []
    for projection in projections:
        foreign = await foreign_owned(conn, queries, schema, list(projection.tables))
        code = await foreign_code(conn, queries, schema, list(projection.tables))
        if foreign or code:
            found.append(refusal(projection.name, schema, foreign, code))
    return found
