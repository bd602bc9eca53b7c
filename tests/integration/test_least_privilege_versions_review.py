"""Review: the version workflow (docs/evolution.md, docs/rebuilds.md) run as the documented
least-privilege role (docs/security-roles.md: NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE,
owner of schema projectord, CREATE on public, CREATE on the database), with application writers
holding only INSERT on projectord.events and USAGE on its schema, and with another role that
also has CREATE on the database (an application's migration role, say).

Each test is one suspicion; the ones that hold fail."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import AsyncConnection
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.types.json import Jsonb

from projectord import Event, Projection, Table
from projectord.runner.version_store import version_schema
from tests.integration.test_least_privilege import documented_grants, version_1_serving
from tests.integration.test_versions import (
    V2,
    bulk_notes,
    serving_version,
    table,
    v1_fold,
    v2_fold,
)
from tests.support.drift_projections import readers_from_env
from tests.support.drift_support import cli_env
from tests.support.harness import DaemonProcess, TestDatabase, run_cli, wait_until
from tests.support.role_support import TemporaryRoles, read_as, temporary_roles

HERE = "tests.integration.test_least_privilege_versions_review"
TALLIES_V1 = f"{HERE}:tallies_v1"
TALLIES_V2 = f"{HERE}:tallies_v2"
TENANT_A = uuid.UUID("00000000-0000-0000-0000-00000000aaaa")
TENANT_B = uuid.UUID("00000000-0000-0000-0000-00000000bbbb")


# -- a versioned projection with readers (row-level security per tenant) ---


class TalliesV1(Projection):
    """One row per aggregate, per tenant: `n` counts its Tallied events."""

    name = "tallies"
    event_types = ("Tallied",)
    version = 1
    tables = {
        "tallies": Table(
            {"id": "uuid PRIMARY KEY", "tenant_id": "uuid NOT NULL", "n": "bigint NOT NULL"}
        )
    }

    def __init__(self, readers: Sequence[str] = ()) -> None:
        self.read_access = tuple(readers)

    async def handle(self, events: Sequence[Event], conn: AsyncConnection[Any]) -> None:
        for event in events:
            await conn.execute(
                "INSERT INTO tallies AS t (id, tenant_id, n) VALUES (%s, %s, 1)"
                " ON CONFLICT (id) DO UPDATE SET n = t.n + 1",
                (event.aggregate_id, event.tenant_id),
            )


class TalliesV2(TalliesV1):
    """Version 2: the same count, and a new column, `twice`."""

    version = 2
    tables = {
        "tallies": Table(
            {
                "id": "uuid PRIMARY KEY",
                "tenant_id": "uuid NOT NULL",
                "n": "bigint NOT NULL",
                "twice": "bigint NOT NULL",
            }
        )
    }

    async def handle(self, events: Sequence[Event], conn: AsyncConnection[Any]) -> None:
        for event in events:
            await conn.execute(
                "INSERT INTO tallies AS t (id, tenant_id, n, twice) VALUES (%s, %s, 1, 2)"
                " ON CONFLICT (id) DO UPDATE SET n = t.n + 1, twice = t.twice + 2",
                (event.aggregate_id, event.tenant_id),
            )


def tallies_v1() -> list[Projection]:
    return [TalliesV1(readers_from_env())]


def tallies_v2() -> list[Projection]:
    return [TalliesV2(readers_from_env())]


# -- the documented setup, from scratch ---


@pytest.fixture
def roles(pg_admin_url: str, db: TestDatabase) -> Iterator[TemporaryRoles]:
    yield from temporary_roles(pg_admin_url, db.url)


@pytest.fixture
def setup(db: TestDatabase, roles: TemporaryRoles) -> tuple[str, str, str]:
    """(admin URL, projectord's role, its URL): a database owned by an administrator, the role
    with exactly the documented grants, CREATE on the database included."""
    with db.connect(autocommit=True) as conn:
        conn.execute("DROP SCHEMA projectord CASCADE")
        conn.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
    role = roles.create("daemon", "LOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE")
    database = conninfo_to_dict(db.url)["dbname"]
    documented_grants(db.url, role)
    with db.connect(autocommit=True) as conn:
        conn.execute(f'GRANT CREATE ON DATABASE "{database}" TO "{role}"')
    return db.url, role, make_conninfo(db.url, user=role)


def writer_for(roles: TemporaryRoles, admin_url: str, url: str) -> str:
    """An application writer as documented: USAGE on projectord's schema, INSERT on events."""
    writer = roles.create("writer", "LOGIN")
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'GRANT USAGE ON SCHEMA projectord TO "{writer}"')
        conn.execute(f'GRANT INSERT ON projectord.events TO "{writer}"')
    return make_conninfo(admin_url, user=writer)


def squatter_for(roles: TemporaryRoles, admin_url: str) -> tuple[str, str]:
    """Another role with CREATE on the database (and nothing in projectord's schemas)."""
    squatter = roles.create("squatter", "LOGIN")
    database = conninfo_to_dict(admin_url)["dbname"]
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'GRANT CREATE ON DATABASE "{database}" TO "{squatter}"')
    return squatter, make_conninfo(admin_url, user=squatter)


def tally(writer_url: str, tenant: uuid.UUID, aggregate: uuid.UUID, count: int) -> None:
    """`count` Tallied events of one aggregate, plain INSERTs as the application's writer."""
    with psycopg.connect(writer_url, autocommit=True) as conn, conn.transaction():
        for version in range(1, count + 1):
            conn.execute(
                "INSERT INTO projectord.events (tenant_id, aggregate_id, version, type, payload)"
                " VALUES (%s, %s, %s, 'Tallied', %s)",
                (tenant, aggregate, version, Jsonb({})),
            )


def tallies_serving(admin_url: str) -> int | None:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT version FROM projectord.projection_positions WHERE name = 'tallies'"
        ).fetchone()
    return None if row is None else int(row[0])


def all_tallies(admin_url: str) -> dict[uuid.UUID, int]:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        return dict(conn.execute("SELECT id, n FROM tallies").fetchall())  # type: ignore[arg-type]


# -- the suspicions ---


def test_readers_keep_exactly_their_tenant_through_a_version_bump_and_a_rollback(
    setup: tuple[str, str, str], roles: TemporaryRoles, state_dir: Path
) -> None:
    """Suspected: the new version's tables (built in projectord_v_<hash>, moved in) or the kept
    copy a rollback brings back lose the readers' SELECT grant or the per-tenant policy, so a
    reader reads nothing (or every tenant) after the swap; events are lost or doubled across the
    two swaps. The reader must read exactly its tenant's rows, each counted once, throughout."""
    admin, _, url = setup
    reader = roles.create("reader")
    v1_env = cli_env(url, TALLIES_V1, [reader]) | {"PROJECTORD_STATE_DIR": str(state_dir)}
    v2_env = cli_env(url, TALLIES_V2, [reader]) | {"PROJECTORD_STATE_DIR": str(state_dir)}
    init = run_cli("init", env=v1_env)
    assert init.returncode == 0, init.stderr
    writer = writer_for(roles, admin, url)
    ids = {TENANT_A: uuid.uuid4(), TENANT_B: uuid.uuid4()}
    claims = {"role": reader, "tenant_id": str(TENANT_A)}

    def reads() -> list[tuple[Any, ...]]:
        return read_as(admin, reader, claims, "SELECT id, n FROM tallies")

    for tenant, aggregate in ids.items():
        tally(writer, tenant, aggregate, 3)
    with DaemonProcess(url, TALLIES_V1, state_dir, extra_env=v1_env):
        wait_until(lambda: all_tallies(admin) == dict.fromkeys(ids.values(), 3), 30)
    assert reads() == [(ids[TENANT_A], 3)]

    with DaemonProcess(url, TALLIES_V2, state_dir, extra_env=v2_env):
        wait_until(lambda: tallies_serving(admin) == 2, 60)
        late = uuid.uuid4()
        tally(writer, TENANT_A, late, 1)  # after the swap: version 2's runner
        wait_until(lambda: all_tallies(admin).get(late) == 1, 30)
        assert all_tallies(admin) == dict.fromkeys(ids.values(), 3) | {late: 1}
        assert sorted(reads()) == sorted([(ids[TENANT_A], 3), (late, 1)])  # its grant, policy
        with pytest.raises(psycopg.errors.InsufficientPrivilege):  # the kept copy: not reachable
            kept = version_schema("public", "tallies", 1)
            read_as(admin, reader, claims, f"SELECT id FROM {kept}.tallies")

    with DaemonProcess(url, TALLIES_V1, state_dir, extra_env=v1_env):
        done = run_cli("rollback", "tallies", env=v1_env, timeout=120)
        assert done.returncode == 0, done.stderr
        assert tallies_serving(admin) == 1
        more = uuid.uuid4()
        tally(writer, TENANT_B, more, 2)
        wait_until(lambda: all_tallies(admin).get(more) == 2, 30)
        assert all_tallies(admin) == dict.fromkeys(ids.values(), 3) | {late: 1, more: 2}
        # The kept copy serves again, caught up, as secured.
        assert sorted(reads()) == sorted([(ids[TENANT_A], 3), (late, 1)])


def test_a_squatted_build_schema_is_named_and_the_build_goes_on_once_it_is_dropped_found_by_review(
    db: TestDatabase, setup: tuple[str, str, str], roles: TemporaryRoles, state_dir: Path
) -> None:
    """Found by review: the build's schema name is predictable (sha1 of 'public.notes.2'), so
    another role with CREATE on the database can create it first. The build's `DROP SCHEMA IF
    EXISTS` failed with 'must be owner of schema' on every retry, for ever, and health said only
    that. Now the build neither uses nor drops it: health names the schema, its owner and the
    DROP to run, version 1 goes on serving, and once the squatter's schema is gone version 2 is
    built and swapped in, without a restart."""
    admin, _, url = setup
    squatter, squatter_url = squatter_for(roles, admin)
    version_1_serving(db, url, state_dir, 300)
    v2_env = cli_env(url, V2) | {"PROJECTORD_STATE_DIR": str(state_dir)}
    trap = version_schema("public", "notes", 2)
    with psycopg.connect(squatter_url, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{trap}"')
    with DaemonProcess(url, V2, state_dir, extra_env=v2_env):

        def health() -> str:
            verdict = json.loads(run_cli("health", "--json", env=v2_env).stdout)
            return " ".join(r["message"] for r in verdict["reasons"])

        wait_until(lambda: f"was made by role {squatter}" in health(), 30)
        assert f'DROP SCHEMA "{trap}" CASCADE' in health()
        assert serving_version(db) == 1 and table(db) == v1_fold(db)
        with psycopg.connect(squatter_url, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{trap}"')
        wait_until(lambda: serving_version(db) == 2, 60)
        wait_until(lambda: table(db) == v2_fold(db), 30)


def test_a_recorded_rebuild_does_not_resume_in_a_schema_another_role_created_found_by_review(
    db: TestDatabase, setup: tuple[str, str, str], roles: TemporaryRoles, state_dir: Path
) -> None:
    """Suspected: a recorded rebuild of the serving version (drift repair) whose schema does not
    exist yet (the repair stopped for the missing CREATE on the database, which leaves the rebuild
    recorded; or any moment between the record and the build's start) is *resumed* by
    VersionBuild._prepare as soon as a schema of that name exists, without looking at who owns
    it. A role with CREATE on the database creates it with a `notes` table and a trigger: the
    build writes into the squatter's table and runs the squatter's trigger as projectord's role
    (which reads every tenant and appends events). Nothing of the squatter's may run as it, and
    the repair must not hang on the squatted schema. Found by review: the trigger never ran (no
    hijack), but the build resumed there and the repair hung. Now the repair exits 1 naming the
    schema, its owner and the DROP; once it is dropped, a repair builds and swaps in."""
    admin, role, url = setup
    database = conninfo_to_dict(admin)["dbname"]
    with psycopg.connect(admin, autocommit=True) as conn:  # the grant is not there yet
        conn.execute(f'REVOKE CREATE ON DATABASE "{database}" FROM "{role}"')
    squatter, squatter_url = squatter_for(roles, admin)
    env = cli_env(url, V2) | {"PROJECTORD_STATE_DIR": str(state_dir)}
    assert run_cli("init", env=env).returncode == 0
    with psycopg.connect(url, autocommit=True) as conn:
        bulk_notes(conn, 200)
    with DaemonProcess(url, V2, state_dir, extra_env=env):
        wait_until(lambda: table(db) == v2_fold(db), 30)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute("ALTER TABLE notes ALTER COLUMN value TYPE text")  # a rebuild
    refused = run_cli("drift", "repair", "--apply", env=env, timeout=60)
    assert refused.returncode == 1 and "GRANT CREATE ON DATABASE" in refused.stderr

    trap = version_schema("public", "notes", 2)
    with psycopg.connect(squatter_url, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA loot")
        conn.execute("CREATE TABLE loot.ran_as (who text, rows bigint)")
        conn.execute("GRANT USAGE ON SCHEMA loot TO PUBLIC")
        conn.execute("GRANT INSERT ON loot.ran_as TO PUBLIC")
        # A sequence is not rolled back with the batch: it counts the trigger's runs whatever
        # becomes of the transaction that fired it.
        conn.execute("CREATE SEQUENCE loot.runs")
        conn.execute("GRANT USAGE ON SEQUENCE loot.runs TO PUBLIC")
        conn.execute(
            "CREATE FUNCTION loot.grab() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
            " PERFORM nextval('loot.runs');"
            " INSERT INTO loot.ran_as SELECT current_user, count(*) FROM public.notes;"
            " RETURN NULL; END $$"
        )
        conn.execute(f'CREATE SCHEMA "{trap}"')
        conn.execute(
            f'CREATE TABLE "{trap}".notes (key int PRIMARY KEY, value bigint NOT NULL,'
            " events bigint NOT NULL, last_position bigint NOT NULL)"
        )
        conn.execute(
            f'CREATE TRIGGER grab AFTER INSERT ON "{trap}".notes'
            " FOR EACH STATEMENT EXECUTE FUNCTION loot.grab()"
        )
        conn.execute(f'GRANT USAGE, CREATE ON SCHEMA "{trap}" TO "{role}"')
        conn.execute(f'GRANT ALL ON "{trap}".notes TO "{role}"')
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'GRANT CREATE ON DATABASE "{database}" TO "{role}"')
    refused = run_cli("drift", "repair", "--apply", env=env, timeout=60)
    assert refused.returncode == 1
    assert f"was made by role {squatter}" in refused.stderr
    with psycopg.connect(admin, autocommit=True) as conn:
        runs = conn.execute("SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM loot.runs")
        (fired,) = runs.fetchone() or (0,)
        ran = conn.execute("SELECT who, rows FROM loot.ran_as").fetchall()
    assert (fired, ran) == (0, []), f"the squatter's trigger ran {fired} time(s): {ran}"
    assert {type(row["value"]) for row in table(db)} == {str}  # the drifted table serves
    with psycopg.connect(squatter_url, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA "{trap}" CASCADE')
    repaired = run_cli("drift", "repair", "--apply", env=env, timeout=120)
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert table(db) == v2_fold(db)


def test_a_kept_version_whose_drop_fails_holds_no_other_expiry_back_found_by_review(
    db: TestDatabase, setup: tuple[str, str, str], roles: TemporaryRoles, state_dir: Path
) -> None:
    """Found by review (by reading): the retention sweep dropped every expired kept version in
    one transaction, although its docstring said one each, so one drop that fails (here a kept
    version whose schema an administrator gave to another role: projectord's role may not drop
    it) held every other expiry back for good. Now each is its own transaction: the failing one
    is logged and left, the others go."""
    admin, _, url = setup
    squatter, _ = squatter_for(roles, admin)
    version_1_serving(db, url, state_dir, 200)
    v2_env = cli_env(url, V2) | {"PROJECTORD_STATE_DIR": str(state_dir)}
    with DaemonProcess(url, V2, state_dir, extra_env=v2_env):
        wait_until(lambda: serving_version(db) == 2, 60)
    kept = "SELECT name FROM projectord.projection_versions WHERE role = 'kept' ORDER BY name"
    assert db.rows(kept) == [("notes",)]
    with db.connect(autocommit=True) as conn:  # an older kept version projectord may not drop
        conn.execute(f'CREATE SCHEMA ghost_kept AUTHORIZATION "{squatter}"')
        conn.execute(
            "INSERT INTO projectord.projection_versions (name, version, role, tables_schema, since)"
            " VALUES ('ghost', 1, 'kept', 'ghost_kept', now() - interval '30 days')"
        )
    retention = v2_env | {"PROJECTORD_VERSION_RETENTION": "0"}
    with DaemonProcess(url, V2, state_dir, extra_env=retention) as daemon:
        wait_until(lambda: db.rows(kept) == [("ghost",)], 30)
        wait_until(lambda: daemon.has_logged("version.drop_failed"), 10)
    assert table(db) == v2_fold(db)
