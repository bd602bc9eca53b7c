"""`projectord init`: create or upgrade projectord's own tables and the projections' missing tables.

Migrations are the numbered files in `sql/migrations/`, each applied once and recorded in
`<schema>.schema_migrations`. The whole run holds `schema_migrations` locked (ACCESS EXCLUSIVE), so
daemons starting together do not race each other. That is the init lock: a table lock, because
taking it needs privileges on projectord's own table, where an advisory lock (what it was before
migration 0014) can be taken first by any role that can connect, and start-up then hung. Every
lock wait of the run is bounded by `lock_timeout`: a wait that runs out fails with one line naming
what it waited for. Running it twice changes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import AsyncConnection, sql

from projectord.daemon.foreign_ids import check_transaction_ids
from projectord.projection import Projection
from projectord.queries import Queries, quote_ident, sql_dir
from projectord.runner.checkpoint_store import CheckpointStore

# How long `init` waits for any one lock (seconds): the init lock, a table a migration alters, a
# positions row. Past it, init fails saying what it waited for, instead of hanging.
INIT_LOCK_TIMEOUT = 30.0
# A first `init` racing another on an empty database fails on the catalog's unique index (both
# create the schema); it runs again and finds the other's work.
INIT_ATTEMPTS = 3


def declaration_search_path(read_model_schema: str) -> sql.Composed:
    """`SET LOCAL search_path` for parsing the projections' declared tables: the read-model schema,
    then `public` (pg_catalog is searched first anyway). `init`, `drift check` and `drift repair`
    all use this one path, so a declared type resolves the same way in each: before, `init` used
    the role's default path and drift the read-model schema alone, and a type in `public` made
    `init` succeed and every drift check fail. `public` is on it because extensions install
    their types there (citext...); a type anywhere else must be schema-qualified."""
    schemas = dict.fromkeys((read_model_schema, "public"))
    return sql.SQL("SET LOCAL search_path TO {}").format(
        sql.SQL(", ").join(sql.Identifier(name) for name in schemas)
    )


class LockWaitTimeout(Exception):
    """A lock wait that ran out: the message names what was waited for, and for how long."""


class _Step:
    """What the run is doing now, for the message if a lock wait runs out."""

    def __init__(self, what: str) -> None:
        self.what = what


class InitError(Exception):
    """`init` cannot do its work with this role's privileges; one line saying what to grant."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def migrations() -> list[Migration]:
    found = []
    for path in sorted((sql_dir() / "migrations").glob("*.sql")):
        number, _, rest = path.stem.partition("_")
        found.append(Migration(int(number), rest, path.read_text()))
    return found


async def initialise(
    conn: AsyncConnection[Any],
    *,
    schema: str,
    read_model_schema: str,
    projections: Sequence[Projection] = (),
    lock_timeout: float = INIT_LOCK_TIMEOUT,
) -> list[str]:
    """Bring the database up to date in one transaction; return what was created.

    Raises `LockWaitTimeout` when a lock is not granted within `lock_timeout` seconds, and
    `ForeignTransactionIds` (changing nothing) when the store holds transaction ids from another
    cluster: the daemon must not run on it (projectord/daemon/foreign_ids.py)."""
    for attempt in range(1, INIT_ATTEMPTS + 1):
        step = _Step(f"the init lock ({schema}.schema_migrations)")
        try:
            return await _initialise_once(
                conn, step, schema, read_model_schema, projections, lock_timeout
            )
        except psycopg.errors.LockNotAvailable:
            raise LockWaitTimeout(
                f"gave up after waiting {lock_timeout:g}s for a lock on {step.what}: another "
                "session holds it (pg_locks and pg_stat_activity name it)"
            ) from None
        except psycopg.errors.UniqueViolation:
            if attempt == INIT_ATTEMPTS:
                raise
    raise AssertionError("unreachable")


async def _initialise_once(
    conn: AsyncConnection[Any],
    step: _Step,
    schema: str,
    read_model_schema: str,
    projections: Sequence[Projection],
    lock_timeout: float,
) -> list[str]:
    done: list[str] = []
    queries = Queries(schema)
    async with conn.transaction():
        await conn.execute(f"SET LOCAL lock_timeout = '{int(lock_timeout * 1000)}ms'")
        missing = await check_privileges(conn, queries, schema, read_model_schema, projections)
        for name in missing:  # IF NOT EXISTS would still need CREATE on the database
            await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {quote_ident(name)}")
        await conn.execute(f"SET LOCAL search_path TO {quote_ident(schema)}")
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        # ACCESS EXCLUSIVE also conflicts with the read of an `init` from before migration 0014
        # (it took an advisory lock, then read this table): old and new runs serialise too.
        await conn.execute("LOCK TABLE schema_migrations IN ACCESS EXCLUSIVE MODE")
        cur = await conn.execute("SELECT version FROM schema_migrations")
        applied = {row[0] for row in await cur.fetchall()}
        for migration in migrations():
            if migration.version in applied:
                continue
            step.what = f"the objects of migration {migration.version:04d}_{migration.name}"
            await conn.execute(migration.sql.encode())
            await conn.execute(
                "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
                (migration.version, migration.name),
            )
            done.append(f"migration {migration.version:04d}_{migration.name}")
        await conn.execute(declaration_search_path(read_model_schema))
        await check_transaction_ids(conn, queries)
        step.what = f"the read-model schema {read_model_schema}"
        serving = await serving_projections(conn, queries, projections)
        done += await create_projection_tables(conn, read_model_schema, serving)
        checkpoints = CheckpointStore(queries)
        for projection in projections:
            step.what = f"the positions row of {projection.name}"
            await checkpoints.ensure(conn, projection.name, projection.version)
    return done


async def serving_projections(
    conn: AsyncConnection[Any], queries: Queries, projections: Sequence[Projection]
) -> list[Projection]:
    """The projections whose code is the version serving reads (or that have none recorded):
    only their declarations describe the live tables. A newer version's tables are built beside
    them, an older version's code never touches them (docs/evolution.md)."""
    serving = await CheckpointStore(queries).serving_versions(conn, [p.name for p in projections])
    return [p for p in projections if serving.get(p.name, p.version) == p.version]


async def check_privileges(
    conn: AsyncConnection[Any],
    queries: Queries,
    schema: str,
    read_model_schema: str,
    projections: Sequence[Projection],
) -> list[str]:
    """The schemas to create. Raise InitError, naming the schema and the GRANT, when this role
    cannot create what `init` must create: projectord's schema (or its tables), or missing tables
    in the read-model schema. The read-model schema needs CREATE only while a table is missing."""
    cur = await conn.execute(queries["schema_access"], {"schemas": [schema, read_model_schema]})
    access = {name: (exists, may_create) for name, exists, may_create in await cur.fetchall()}
    cur = await conn.execute(queries["current_identity"])
    row = await cur.fetchone()
    assert row is not None
    role, database = quote_ident(row[0]), quote_ident(row[1])
    tables = [name for projection in projections for name in projection.tables]
    cur = await conn.execute(
        queries["missing_tables"], {"schema": read_model_schema, "tables": tables}
    )
    needs_create = {schema: True, read_model_schema: bool(await cur.fetchall())}
    for name in dict.fromkeys((schema, read_model_schema)):
        exists, may_create = access[name]
        if may_create or (exists and not needs_create[name]):
            continue
        ident = quote_ident(name)
        if not exists:
            raise InitError(
                f"cannot create schema {name}: role {role} lacks CREATE on database {database};"
                f" create it for the role first: CREATE SCHEMA {ident} AUTHORIZATION {role}"
            )
        raise InitError(
            f"cannot create tables in schema {name}: role {role} lacks CREATE on it;"
            f" GRANT CREATE ON SCHEMA {ident} TO {role} (or let {role} own the schema)"
        )
    return [name for name in dict.fromkeys((schema, read_model_schema)) if not access[name][0]]


async def create_projection_tables(
    conn: AsyncConnection[Any], read_model_schema: str, projections: Sequence[Projection]
) -> list[str]:
    """Create the tables (and declared indexes) that do not exist yet. Existing ones are left
    alone: comparing them with the declaration is drift detection's job."""
    created = []
    for projection in projections:
        for table_name, table in projection.tables.items():
            cur = await conn.execute(
                "SELECT to_regclass(%s) IS NULL",
                (f"{quote_ident(read_model_schema)}.{quote_ident(table_name)}",),
            )
            row = await cur.fetchone()
            if row and row[0]:
                qualified = f"{quote_ident(read_model_schema)}.{quote_ident(table_name)}"
                await conn.execute(table.create_sql(qualified).encode())
                for columns in table.indexes:
                    cols = ", ".join(quote_ident(c) for c in columns)
                    await conn.execute(f"CREATE INDEX ON {qualified} ({cols})".encode())
                created.append(f"table {read_model_schema}.{table_name} ({projection.name})")
    return created
