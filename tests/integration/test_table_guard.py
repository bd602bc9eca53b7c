"""Code another role attaches to a read-model table never runs as projectord (issue 18, point 2,
found again by a hostile review on PostgreSQL 15):

- a trigger that a role given TRIGGER on a table projectord owns attached to it survives
  `drift repair` (which revokes the privilege, not the trigger); it is drift of its own kind, and
  the daemon refuses the projection until an operator drops it;
- the owner of the read-model schema may drop a table and put their own in its place while the
  daemon runs; every batch locks and checks its tables in its own transaction, so the next batch
  is refused instead of writing into the new table. Such a schema owner is reported as drift.

A real role (`mallory`), the real daemon as a process, its control socket for status.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.types.json import Jsonb

from tests.support.drift_projections import Accounts
from tests.support.drift_support import check, cli_env, repair
from tests.support.harness import DaemonProcess, TestDatabase, as_daemon_role, run_cli, wait_until
from tests.support.ops_support import ask
from tests.support.role_support import TemporaryRoles, temporary_roles

ACCOUNTS = "tests.support.drift_projections:accounts"
TENANTS = (uuid.UUID(int=0xA1), uuid.UUID(int=0xB2))
LOOT = "SELECT count(*) FROM mal.loot"

# Mallory's own schema: a table she can read, and a trigger function that copies each row it is
# fired for into it. It runs as whoever writes the table (projectord, which reads every tenant).
STEAL = """
CREATE TABLE mal.loot (row jsonb);
GRANT USAGE ON SCHEMA mal TO PUBLIC;
GRANT INSERT ON mal.loot TO PUBLIC;
CREATE FUNCTION mal.steal() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO mal.loot VALUES (to_jsonb(NEW));
    RETURN NULL;
END $$;
"""


@pytest.fixture
def roles(pg_admin_url: str, db: TestDatabase) -> Iterator[TemporaryRoles]:
    yield from temporary_roles(pg_admin_url, db.url)


@pytest.fixture
def mallory(db: TestDatabase, roles: TemporaryRoles) -> Iterator[str]:
    """A role with a schema of her own holding her trigger function and the table it fills."""
    name = roles.create("mallory")
    run_as(db, None, f"CREATE SCHEMA mal AUTHORIZATION {ident(name)}")
    run_as(db, name, STEAL)
    yield name
    # Her triggers depend on her function: gone before DROP OWNED BY (the roles' cleanup).
    run_as(db, None, "DROP SCHEMA mal CASCADE; DROP SCHEMA IF EXISTS rm CASCADE")


def ident(name: str) -> str:
    return sql.Identifier(name).as_string()


def run_as(db: TestDatabase, role: str | None, statements: str) -> None:
    """Run `statements` as `role` (a real role: SET ROLE), or as the administrator (None)."""
    with db.connect(autocommit=True) as conn:
        if role is not None:
            conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(role)))
        conn.execute(statements.encode())


def daemon_role(db: TestDatabase) -> str:
    with psycopg.connect(as_daemon_role(db.url)) as conn:
        return str(conn.info.user)


def open_accounts(db: TestDatabase, tenants: tuple[uuid.UUID, ...] = TENANTS) -> None:
    """One `Opened` event per tenant, as any writer appends it."""
    with db.connect(autocommit=True) as conn:
        for tenant in tenants:
            conn.execute(
                "INSERT INTO projectord.events (tenant_id, aggregate_id, version, type, payload)"
                " VALUES (%s, %s, 1, 'Opened', %s)",
                (tenant, uuid.uuid4(), Jsonb({"owner": f"owner of {tenant}", "amount": 5})),
            )


def state_of(state_dir: Path, name: str) -> dict[str, Any]:
    return next(p for p in ask(state_dir, "status")["projections"] if p["name"] == name)


def test_a_trigger_attached_with_a_granted_trigger_privilege_is_drift_and_refused(
    db: TestDatabase, mallory: str, state_dir: Path
) -> None:
    db.init(ACCOUNTS)
    # The daemon's role, by mistake, lets her attach triggers to its table.
    with psycopg.connect(as_daemon_role(db.url), autocommit=True) as daemon_conn:
        daemon_conn.execute(f"GRANT TRIGGER ON accounts TO {ident(mallory)}")
    run_as(
        db,
        mallory,
        "CREATE TRIGGER zz_steal AFTER INSERT OR UPDATE ON public.accounts"
        " FOR EACH ROW EXECUTE FUNCTION mal.steal()",
    )
    trigger = ("foreign_trigger", "accounts", None, "manual")
    assert check(db.url, [Accounts()]) == [trigger, ("extra_grant", "accounts", None, "in_place")]
    # Repair revokes the privilege (CASCADE), which leaves the trigger: still drift, left to an
    # operator, with the statement that removes it.
    result = repair(db.url, [Accounts()], apply=True)
    assert [i["kind"] for i in result["left"]] == ["foreign_trigger"]
    assert 'DROP TRIGGER "zz_steal" ON "public"."accounts"' in result["left"][0]["why"]
    assert check(db.url, [Accounts()]) == [trigger]
    assert db.scalar("SELECT count(*) FROM pg_trigger WHERE tgname = 'zz_steal'") == 1

    env = cli_env(db.url, ACCOUNTS)
    init = run_cli("init", env=env)
    assert init.returncode == 1, init.stderr
    assert 'has trigger "zz_steal" (function mal.steal()' in init.stderr

    with DaemonProcess(db.url, ACCOUNTS, state_dir, extra_env=env) as daemon:
        open_accounts(db)
        wait_until(lambda: state_of(state_dir, "accounts")["state"] == "refused", 30)
        status = state_of(state_dir, "accounts")
        assert "zz_steal" in status["last_error"]["message"]
        assert "projection_refused" in {r["code"] for r in ask(state_dir, "health")["reasons"]}
        assert daemon.has_logged("projection.refused_foreign_owner")
        assert db.scalar(LOOT) == 0 and db.scalar("SELECT count(*) FROM accounts") == 0

        # An operator removes her trigger; the projection starts on its own.
        run_as(db, None, "DROP TRIGGER zz_steal ON public.accounts")
        wait_until(lambda: db.scalar("SELECT count(*) FROM accounts") == 2, 30)
        assert state_of(state_dir, "accounts")["state"] == "running"
    assert db.scalar(LOOT) == 0
    assert check(db.url, [Accounts()]) == []


SWAP = """
BEGIN;
DROP TABLE rm.accounts;
CREATE TABLE rm.accounts (id uuid PRIMARY KEY, tenant_id uuid NOT NULL,
    owner text NOT NULL DEFAULT '', balance int8 NOT NULL DEFAULT 0, note varchar(40),
    opened_at timestamptz NOT NULL);
GRANT ALL ON rm.accounts TO {daemon};
CREATE TRIGGER zz_steal AFTER INSERT OR UPDATE ON rm.accounts
    FOR EACH ROW EXECUTE FUNCTION mal.steal();
COMMIT;
"""


def test_a_table_swapped_by_the_schemas_owner_while_the_daemon_runs_is_refused(
    db: TestDatabase, mallory: str, state_dir: Path
) -> None:
    role = daemon_role(db)
    # The read-model schema is hers; projectord's role may create its tables there.
    run_as(db, None, f"CREATE SCHEMA rm AUTHORIZATION {ident(mallory)}")
    run_as(db, None, f"GRANT USAGE, CREATE ON SCHEMA rm TO {ident(role)}")
    env = cli_env(db.url, ACCOUNTS) | {"PROJECTORD_READ_MODEL_SCHEMA": "rm"}
    owner = ("schema_owner", None, None, "manual")
    assert check(db.url, [Accounts()], read_model_schema="rm") == [
        owner,
        ("missing_table", "accounts", None, "in_place"),
    ]

    with DaemonProcess(db.url, ACCOUNTS, state_dir, extra_env=env) as daemon:
        open_accounts(db, TENANTS[:1])
        wait_until(lambda: db.scalar("SELECT count(*) FROM rm.accounts") == 1, 30)
        assert state_of(state_dir, "accounts")["state"] == "running"
        assert check(db.url, [Accounts()], read_model_schema="rm") == [owner]

        run_as(db, mallory, SWAP.replace("{daemon}", ident(role)))
        open_accounts(db)
        wait_until(lambda: state_of(state_dir, "accounts")["state"] == "refused", 30)
        message = state_of(state_dir, "accounts")["last_error"]["message"]
        assert f'"rm"."accounts" is owned by role "{mallory}"' in message
        assert "zz_steal" in message
        assert daemon.has_logged("projection.refused_foreign_owner")
        # Nothing reached her table, so her trigger never ran.
        assert db.scalar("SELECT count(*) FROM rm.accounts") == 0
        assert db.scalar(LOOT) == 0
    drift = check(db.url, [Accounts()], read_model_schema="rm")
    assert drift == [owner, ("foreign_owner", "accounts", None, "manual")]
