"""projectord as the documented least-privilege role (docs/security-roles.md): NOSUPERUSER,
NOBYPASSRLS, not the database's owner; it owns projectord's schema and may create tables in the
read-model schema. `init` leaves the declared tables drift-free, with row-level security that
lets this role (and no other) write them; the daemon then projects and readers read their tenant.
Real roles, the real CLI and daemon as processes."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from tests.integration.test_security import append
from tests.integration.test_versions import (
    V1,
    V2,
    bulk_notes,
    noted,
    serving_version,
    table,
    v1_fold,
    v2_fold,
)
from tests.support.drift_support import cli_env
from tests.support.harness import DaemonProcess, TestDatabase, run_cli, wait_until
from tests.support.role_support import TemporaryRoles, read_as, temporary_roles

ACCOUNTS = "tests.support.drift_projections:accounts"
TENANT_A = uuid.UUID("00000000-0000-0000-0000-00000000aaaa")
TENANT_B = uuid.UUID("00000000-0000-0000-0000-00000000bbbb")


@pytest.fixture
def roles(pg_admin_url: str, db: TestDatabase) -> Iterator[TemporaryRoles]:
    yield from temporary_roles(pg_admin_url, db.url)


def test_init_leaves_no_drift(db: TestDatabase, roles: TemporaryRoles) -> None:
    """Issue 12 §8: right after `init`, `drift check` exits 0 (row-level security enabled and
    forced, both policies and the grants in place); a role that does not exist stays reported."""
    reader = roles.create("reader")
    env = cli_env(db.url, ACCOUNTS, [reader])
    init = run_cli("init", env=env)
    assert init.returncode == 0, init.stderr
    checked = run_cli("drift", "check", env=env)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    again = run_cli("init", env=env)
    assert again.returncode == 0 and "schema is up to date" in again.stdout

    absent = f"pd_absent_{uuid.uuid4().hex[:8]}"
    env = cli_env(db.url, ACCOUNTS, [reader, absent])
    assert run_cli("init", env=env).returncode == 0
    checked = run_cli("drift", "check", env=env)
    assert checked.returncode == 1
    assert checked.stdout.strip().splitlines()[0] == (
        f"projection accounts: role missing (expected role {absent}, found none); repair: manual"
        f' (create it, e.g. CREATE ROLE "{absent}" NOLOGIN)'
    )
    assert "1 drift item(s)" in checked.stdout


@pytest.fixture
def plain_database(db: TestDatabase) -> str:
    """A database as an application's usually is, owned by an administrator and without
    projectord's schema yet: an admin URL of it."""
    with db.connect(autocommit=True) as conn:
        conn.execute("DROP SCHEMA projectord CASCADE")
        # As on PostgreSQL 15 and later whatever the server: no CREATE on public for PUBLIC.
        conn.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
    return db.url


@pytest.fixture
def daemon_role(plain_database: str, roles: TemporaryRoles) -> tuple[TemporaryRoles, str, str]:
    """(the roles, projectord's least-privilege role, its URL): the role as docs/security-roles.md
    creates it, before it is given anything in the database."""
    role = roles.create("daemon", "LOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE")
    return roles, role, make_conninfo(plain_database, user=role)


def documented_grants(admin_url: str, role: str) -> None:
    """What docs/security-roles.md grants projectord's role in a database, but CREATE on the
    database (which only the builds in schemas of their own need): projectord's schema, owned
    by it, and CREATE on the read-model schema `public`."""
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA projectord AUTHORIZATION "{role}"')
        conn.execute(f'GRANT CREATE ON SCHEMA public TO "{role}"')


def version_1_serving(db: TestDatabase, url: str, state_dir: Path, events: int) -> None:
    """As the role at `url`: `init` with version 1 of `notes`, `events` Noted events, and a
    daemon of version 1 run until its table is their fold."""
    env = cli_env(url, V1) | {"PROJECTORD_STATE_DIR": str(state_dir)}
    assert run_cli("init", env=env).returncode == 0
    with psycopg.connect(url, autocommit=True) as conn:
        bulk_notes(conn, events)
    with DaemonProcess(url, V1, state_dir, extra_env=env):
        wait_until(lambda: table(db) == v1_fold(db), 30)


def test_init_without_create_says_what_to_grant(
    plain_database: str, daemon_role: tuple[TemporaryRoles, str, str]
) -> None:
    _, role, url = daemon_role
    refused = run_cli("init", env=cli_env(url, ACCOUNTS))
    assert refused.returncode == 1
    last = refused.stderr.strip().splitlines()[-1]
    assert last.endswith(f'first: CREATE SCHEMA "projectord" AUTHORIZATION "{role}"')
    with psycopg.connect(plain_database, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA projectord AUTHORIZATION "{role}"')
    refused = run_cli("init", env=cli_env(url, ACCOUNTS))
    assert refused.returncode == 1
    assert (
        f'init failed: cannot create tables in schema public: role "{role}" lacks CREATE on it;'
        f' GRANT CREATE ON SCHEMA "public" TO "{role}"' in refused.stderr
    )


def test_the_daemon_runs_as_a_role_without_bypassrls(
    plain_database: str, daemon_role: tuple[TemporaryRoles, str, str], state_dir: Path
) -> None:
    roles, role, url = daemon_role
    reader, outsider = roles.create("reader"), roles.create("outsider")
    documented_grants(plain_database, role)
    env = cli_env(url, ACCOUNTS, [reader])
    init = run_cli("init", env=env)
    assert init.returncode == 0, init.stderr
    assert run_cli("drift", "check", env=env).returncode == 0

    # The application's writer, as documented: USAGE on projectord's schema, INSERT on events,
    # nothing else (the version-order check reads the events table with its owner's rights).
    writer = roles.create("writer", "LOGIN")
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'GRANT USAGE ON SCHEMA projectord TO "{writer}"')
        conn.execute(f'GRANT INSERT ON projectord.events TO "{writer}"')
    writer_url = make_conninfo(plain_database, user=writer)
    accounts = {TENANT_A: uuid.uuid4(), TENANT_B: uuid.uuid4()}
    with DaemonProcess(url, ACCOUNTS, state_dir, extra_env=env):
        for tenant, account in accounts.items():
            append(writer_url, "Opened", tenant, account, 1)
            append(writer_url, "Credited", tenant, account, 2)
        wait_until(lambda: _balances(plain_database) == {TENANT_A: 14, TENANT_B: 14}, 30)

    claims = {"role": reader, "tenant_id": str(TENANT_A)}
    seen = read_as(plain_database, reader, claims, "SELECT id FROM accounts")
    assert seen == [(accounts[TENANT_A],)]
    with psycopg.connect(plain_database, autocommit=True) as conn:  # the write policy is its own
        conn.execute(f'GRANT SELECT, INSERT ON accounts TO "{outsider}"')
    assert read_as(plain_database, outsider, claims, "SELECT id FROM accounts") == []
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="row-level security"):
        read_as(plain_database, outsider, None, _INSERT_ROW)


_INSERT_ROW = (
    "INSERT INTO accounts (id, tenant_id, opened_at)"
    " VALUES (gen_random_uuid(), gen_random_uuid(), now())"
)


def test_the_daemon_refuses_to_start_when_row_level_security_stops_its_writes(
    plain_database: str, daemon_role: tuple[TemporaryRoles, str, str], state_dir: Path
) -> None:
    """Row-level security switched on by hand on a table of a projection without read_access:
    no write policy for the daemon's role, so it says so instead of failing every batch."""
    _, role, url = daemon_role
    documented_grants(plain_database, role)
    env = cli_env(url, "tests.support.projections:ledger_only") | {
        "PROJECTORD_STATE_DIR": str(state_dir)
    }
    assert run_cli("init", env=env).returncode == 0
    with psycopg.connect(plain_database, autocommit=True) as conn:
        conn.execute("ALTER TABLE applied_log ENABLE ROW LEVEL SECURITY")
        conn.execute("ALTER TABLE applied_log FORCE ROW LEVEL SECURITY")
    started = run_cli("run", env=env, timeout=60)
    assert started.returncode == 1
    assert "public.applied_log" in started.stderr and "projectord_write" in started.stderr


def test_a_version_bump_names_the_grant_it_needs_then_swaps_in_once_granted(
    db: TestDatabase,
    plain_database: str,
    daemon_role: tuple[TemporaryRoles, str, str],
    state_dir: Path,
) -> None:
    """Issue 16 as this role: a version's build makes its tables in a schema of its own, which
    needs CREATE on the database (docs/security-roles.md). Without it version 1 goes on serving
    and health names the GRANT to run; once granted, the build (retried with its backoff)
    swaps version 2 in without a restart, the fold of every event exactly once."""
    _, role, url = daemon_role
    documented_grants(plain_database, role)
    version_1_serving(db, url, state_dir, 500)
    v2_env = cli_env(url, V2) | {"PROJECTORD_STATE_DIR": str(state_dir)}

    database = conninfo_to_dict(plain_database)["dbname"]
    grant = f'GRANT CREATE ON DATABASE "{database}" TO "{role}"'
    with DaemonProcess(url, V2, state_dir, extra_env=v2_env):

        def building_reason() -> str:
            verdict = json.loads(run_cli("health", "--json", env=v2_env).stdout)
            messages = [r["message"] for r in verdict["reasons"] if r["code"] == "version_building"]
            return messages[0] if messages else ""

        wait_until(lambda: grant in building_reason(), 30)
        assert "while version 1 serves reads" in building_reason()
        assert serving_version(db) == 1 and table(db) == v1_fold(db)
        with psycopg.connect(url, autocommit=True) as conn:
            bulk_notes(conn, 300)
        with psycopg.connect(plain_database, autocommit=True) as conn:
            conn.execute(grant)
        wait_until(lambda: serving_version(db) == 2, 60)
        wait_until(lambda: table(db) == v2_fold(db), 30)
    assert sum(row["events"] for row in table(db)) == noted(db) == 800


def test_an_online_rebuild_without_create_on_the_database_names_the_grant(
    plain_database: str, daemon_role: tuple[TemporaryRoles, str, str], state_dir: Path
) -> None:
    """`rebuild --online` builds in a shadow schema of its own: without CREATE on the database
    it exits 1 with the GRANT to run, and the live table is left as it was."""
    _, role, url = daemon_role
    documented_grants(plain_database, role)
    env = cli_env(url, ACCOUNTS) | {"PROJECTORD_STATE_DIR": str(state_dir)}
    assert run_cli("init", env=env).returncode == 0
    account = uuid.uuid4()
    append(url, "Opened", TENANT_A, account, 1)
    append(url, "Credited", TENANT_A, account, 2)
    with DaemonProcess(url, ACCOUNTS, state_dir, extra_env=env):
        wait_until(lambda: _balances(plain_database) == {TENANT_A: 14}, 30)
    database = conninfo_to_dict(plain_database)["dbname"]
    refused = run_cli("rebuild", "accounts", "--online", env=env, timeout=60)
    assert refused.returncode == 1
    assert f'GRANT CREATE ON DATABASE "{database}" TO "{role}"' in refused.stderr
    assert _balances(plain_database) == {TENANT_A: 14}
    with psycopg.connect(plain_database, autocommit=True) as conn:
        conn.execute(f'GRANT CREATE ON DATABASE "{database}" TO "{role}"')
    rebuilt = run_cli("rebuild", "accounts", "--online", env=env, timeout=60)
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert _balances(plain_database) == {TENANT_A: 14}


def test_a_drift_repair_that_rebuilds_without_create_on_the_database_names_the_grant(
    db: TestDatabase,
    plain_database: str,
    daemon_role: tuple[TemporaryRoles, str, str],
    state_dir: Path,
) -> None:
    """With no daemon running, `drift repair --apply` builds the rebuild itself: a role that may
    not create the build's schema gets the GRANT at once (exit 1) instead of a command retrying
    for ever; the drifted table goes on serving, and once granted a repair completes it."""
    _, role, url = daemon_role
    documented_grants(plain_database, role)
    env = cli_env(url, V2) | {"PROJECTORD_STATE_DIR": str(state_dir)}
    assert run_cli("init", env=env).returncode == 0
    with psycopg.connect(url, autocommit=True) as conn:
        bulk_notes(conn, 400)
    with DaemonProcess(url, V2, state_dir, extra_env=env):
        wait_until(lambda: table(db) == v2_fold(db), 30)
    with psycopg.connect(plain_database, autocommit=True) as conn:
        conn.execute("ALTER TABLE notes ALTER COLUMN value TYPE text")  # no cast back: a rebuild
    database = conninfo_to_dict(plain_database)["dbname"]
    grant = f'GRANT CREATE ON DATABASE "{database}" TO "{role}"'
    refused = run_cli("drift", "repair", "--apply", env=env, timeout=60)
    assert refused.returncode == 1
    assert grant in refused.stderr
    assert {type(row["value"]) for row in table(db)} == {str}  # the drifted table, as it was
    with psycopg.connect(plain_database, autocommit=True) as conn:
        conn.execute(grant)
    repaired = run_cli("drift", "repair", "--apply", env=env, timeout=120)
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert table(db) == v2_fold(db)


def _balances(admin_url: str) -> dict[uuid.UUID, int]:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        rows = conn.execute("SELECT tenant_id, balance FROM accounts").fetchall()
    return {tenant: balance for tenant, balance in rows}
