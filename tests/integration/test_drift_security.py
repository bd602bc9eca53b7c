"""Drift and read-model tables against the database's other users (issue 18, points 2, 6, 7):
tables another role owns, drift checks that run no user code, catalog text that cannot break out
of a comment, extra grants, and declared column names that cannot break out of their quotes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from psycopg import AsyncConnection, sql

from projectord import Event
from projectord.projection import Projection, Table
from tests.support.drift_projections import Accounts
from tests.support.drift_support import (
    TENANT,
    add_account,
    check,
    cli_env,
    repair,
    secured_accounts,
)
from tests.support.harness import DaemonProcess, TestDatabase, credits, run_cli, wait_until
from tests.support.ops_support import ask, ask_error
from tests.support.projections import Ledger
from tests.support.role_support import TemporaryRoles, temporary_roles

BOTH = "tests.integration.test_drift_security:accounts_and_ledger"

QUOTED = 'we"ird, evil text, "x'  # unquoted, this would declare three columns


class Quoted(Projection):
    name = "quoted"
    event_types = ("Noted",)
    tables = {"quoted": Table({"id": "uuid PRIMARY KEY", QUOTED: "text"}, indexes=[(QUOTED,)])}

    async def on(self, event: Event, conn: AsyncConnection[Any]) -> None: ...


quoted = [Quoted]


def test_a_column_name_with_a_double_quote_is_one_column(db: TestDatabase) -> None:
    db.init("tests.integration.test_drift_security:quoted")
    columns = db.rows(
        "SELECT attname FROM pg_attribute WHERE attrelid = 'quoted'::regclass AND attnum > 0"
        " ORDER BY attnum"
    )
    assert columns == [("id",), (QUOTED,)]
    assert check(db.url, [Quoted()]) == []
    assert repair(db.url, [Quoted()])["statements"] == []


def accounts_and_ledger() -> list[Projection]:
    return [Accounts(), Ledger()]


@pytest.fixture
def roles(pg_admin_url: str, db: TestDatabase) -> Iterator[TemporaryRoles]:
    yield from temporary_roles(pg_admin_url, db.url)


@pytest.fixture
def mallory(db: TestDatabase, roles: TemporaryRoles) -> Iterator[str]:
    """A role that may create in the read-model schema (what every role could in `public` up to
    PostgreSQL 14), and a sequence of hers that counts each time her code runs."""
    name = roles.create("mallory")
    as_mallory(db, name, "GRANT CREATE ON SCHEMA public TO {me}", admin=True)
    as_mallory(db, name, "CREATE SEQUENCE spy")
    yield name
    # Casts are nobody's: DROP OWNED BY (the roles' cleanup) cannot drop her functions under them.
    as_mallory(db, name, "DROP TYPE IF EXISTS mtype CASCADE", admin=True)


def as_mallory(db: TestDatabase, mallory: str, statements: str, *, admin: bool = False) -> None:
    """Run `statements` as mallory (a real role: SET ROLE), or as the administrator."""
    with db.connect(autocommit=True) as conn:
        if not admin:
            conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(mallory)))
        conn.execute(statements.replace("{me}", sql.Identifier(mallory).as_string()).encode())


def spied(db: TestDatabase) -> int:
    """How often mallory's code ran (her sequence survives any rollback)."""
    return int(db.scalar("SELECT last_value + (CASE WHEN is_called THEN 1 ELSE 0 END) FROM spy"))


TRAP = """
CREATE TABLE loot (event jsonb);
CREATE TABLE accounts (id uuid PRIMARY KEY, tenant_id uuid NOT NULL, owner text NOT NULL DEFAULT '',
    balance int8 NOT NULL DEFAULT 0, note varchar(40), opened_at timestamptz NOT NULL);
CREATE FUNCTION steal() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM nextval('spy');
    INSERT INTO loot SELECT to_jsonb(e) FROM projectord.events e;  -- as the writer
    RETURN NULL;
END $$;
CREATE TRIGGER steal AFTER INSERT ON accounts FOR EACH STATEMENT EXECUTE FUNCTION steal();
GRANT INSERT ON loot TO PUBLIC;
"""


def test_a_table_another_role_owns_is_refused_and_the_other_projections_run(
    db: TestDatabase, mallory: str, state_dir: Path
) -> None:
    as_mallory(db, mallory, TRAP)
    env = cli_env(db.url, BOTH)
    init = run_cli("init", env=env)
    assert init.returncode == 1
    assert '"public"."accounts" is owned by role "' + mallory + '"' in init.stderr
    assert "accounts" in init.stderr and db.scalar("SELECT to_regclass('ledger')") is not None
    assert ("foreign_owner", "accounts", None, "manual") in check(db.url, [Accounts()])

    with DaemonProcess(db.url, BOTH, state_dir, extra_env=env) as daemon:
        credits(db, 20)
        wait_until(lambda: db.scalar("SELECT count(*) FROM applied_log") == 20, 30)
        status = {p["name"]: p for p in ask(state_dir, "status")["projections"]}
        assert status["accounts"]["state"] == "refused"
        assert mallory in status["accounts"]["last_error"]["message"]
        assert status["ledger"]["state"] == "running"
        health = ask(state_dir, "health")
        assert health["status"] == "failing"
        assert "projection_refused" in {r["code"] for r in health["reasons"]}
        assert ask_error_code(state_dir, "rebuild", name="accounts") == "foreign_owner"
        assert daemon.has_logged("projection.refused_foreign_owner")
        # Nothing was written into her table, so her trigger never ran.
        assert db.scalar("SELECT count(*) FROM accounts") == 0
        assert db.scalar("SELECT count(*) FROM loot") == 0 and spied(db) == 1

        # An operator deals with it; the projection starts on its own.
        with db.connect(autocommit=True) as conn:
            conn.execute("DROP TRIGGER steal ON accounts")
            conn.execute("ALTER TABLE accounts OWNER TO CURRENT_USER")
        wait_until(lambda: db.scalar("SELECT count(*) FROM accounts") == 20, 30)
    assert db.scalar("SELECT count(*) FROM loot") == 0


def ask_error_code(state_dir: Path, command: str, **args: Any) -> str:
    return ask_error(state_dir, command, **args).code


# A type of mallory's whose casts to and from bigint, and equality, run her code.
MALLORY_TYPE = """
CREATE TYPE mtype AS (v bigint);
CREATE FUNCTION to_big(mtype) RETURNS bigint LANGUAGE plpgsql AS $$
BEGIN PERFORM nextval('spy'); RETURN ($1).v; END $$;
CREATE FUNCTION from_big(bigint) RETURNS mtype LANGUAGE plpgsql AS $$
BEGIN PERFORM nextval('spy'); RETURN ROW($1)::mtype; END $$;
CREATE FUNCTION meq(mtype, mtype) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN PERFORM nextval('spy'); RETURN true; END $$;
CREATE OPERATOR = (LEFTARG = mtype, RIGHTARG = mtype, FUNCTION = meq);
CREATE CAST (mtype AS bigint) WITH FUNCTION to_big(mtype) AS IMPLICIT;
CREATE CAST (bigint AS mtype) WITH FUNCTION from_big(bigint);
"""
TO_MALLORY_TYPE = (
    "ALTER TABLE accounts ALTER COLUMN balance DROP DEFAULT;"
    " ALTER TABLE accounts ALTER COLUMN balance TYPE mtype USING ROW(balance)::mtype"
)


def test_a_drift_check_runs_none_of_another_roles_code(db: TestDatabase, mallory: str) -> None:
    as_mallory(db, mallory, MALLORY_TYPE)
    db.init("tests.support.drift_projections:accounts")
    add_account(db)
    with db.connect(autocommit=True) as conn:  # drift: an administrator used her type
        conn.execute(TO_MALLORY_TYPE)
    before = spied(db)
    found = check(db.url, [Accounts()])
    assert ("type_mismatch", "accounts", "balance", "rebuild") in found
    assert spied(db) == before  # neither of her casts ran

    # Her own table, with her type: only its owner is reported; nothing of it is read.
    with db.connect(autocommit=True) as conn:
        conn.execute("DROP TABLE accounts")
    as_mallory(db, mallory, TRAP.split("CREATE FUNCTION")[0])
    row = "INSERT INTO accounts (id, tenant_id, opened_at) VALUES (gen_random_uuid(), %s, now());"
    as_mallory(db, mallory, row.replace("%s", f"'{TENANT}'") + TO_MALLORY_TYPE)
    before = spied(db)
    assert check(db.url, [Accounts()]) == [
        ("foreign_owner", "accounts", None, "manual"),
        ("schema_create", None, None, "manual"),  # she may create in the read-model schema
        ("foreign_object", None, None, "manual"),  # and her type and casts' functions are there
    ]
    assert spied(db) == before


EVIL = "x\nDROP TABLE accounts; --"


def test_catalog_text_cannot_leave_its_comment_or_quotes(db: TestDatabase) -> None:
    db.init("tests.support.drift_projections:accounts")
    with db.connect(autocommit=True) as conn:
        conn.execute(sql.SQL("ALTER TABLE accounts ADD COLUMN {} int").format(sql.Identifier(EVIL)))
    env = cli_env(db.url, "tests.support.drift_projections:accounts")
    human = run_cli("drift", "check", env=env)
    assert human.returncode == 1 and "DROP TABLE" in human.stdout
    assert all(
        line.startswith(("public.accounts.", "1 drift")) for line in human.stdout.splitlines()
    )

    dry = run_cli("drift", "repair", env=env)
    assert dry.returncode == 0, dry.stderr
    assert all(line.startswith("-- ") for line in dry.stdout.splitlines()), dry.stdout
    # Piped into psql it would run nothing; with --drop-extra, exactly the column's drop.
    with db.connect(autocommit=True) as conn:
        conn.execute(dry.stdout.encode())
    dropping = run_cli("drift", "repair", "--drop-extra", env=env)
    assert not any(line.startswith("DROP") for line in dropping.stdout.splitlines())
    with db.connect(autocommit=True) as conn:
        conn.execute(dropping.stdout.encode())
    assert check(db.url, [Accounts()]) == []


def test_drift_check_and_repair_through_the_control_socket(
    db: TestDatabase, state_dir: Path
) -> None:
    specs = "tests.support.drift_projections:accounts"
    db.init(specs)
    with DaemonProcess(db.url, specs, state_dir, extra_env=cli_env(db.url, specs)) as daemon:
        assert ask(state_dir, "drift_check") == {
            "schema": "public", "drift": [], "count": 0, "ok": True
        }  # fmt: skip
        with db.connect(autocommit=True) as conn:
            conn.execute("ALTER TABLE accounts DROP COLUMN note")
        report = ask(state_dir, "drift_check")
        assert [(d["kind"], d["column"]) for d in report["drift"]] == [("missing_column", "note")]

        for bad in ({"apply": "yes"}, {"apply": 1}, {"sql": "DROP TABLE accounts"}):
            assert ask_error_code(state_dir, "drift_repair", **bad) == "invalid_arguments"
        dry = ask(state_dir, "drift_repair")
        assert dry["applied"] is False and dry["statements"] == [
            'ALTER TABLE "public"."accounts" ADD COLUMN "note" character varying(40)'
        ]
        assert ask(state_dir, "drift_check")["count"] == 1  # a dry run changes nothing
        assert ask(state_dir, "drift_repair", apply=True)["applied"] is True
        assert ask(state_dir, "drift_check")["ok"] is True
        logged = [e for e in daemon.log_events() if e.get("event") == "control.command"]
        assert logged[-1]["command"] == "drift_repair" and logged[-1]["args"] == {"apply": True}


def test_extra_grants_are_drift_and_repair_revokes_them(
    db: TestDatabase, roles: TemporaryRoles
) -> None:
    reader, other = roles.create("reader"), roles.create("other")
    projections = secured_accounts(db.url, reader)
    with db.connect(autocommit=True) as conn:
        conn.execute(f'GRANT TRUNCATE, TRIGGER ON accounts TO "{reader}"')
        conn.execute(f'GRANT UPDATE (balance) ON accounts TO "{other}" WITH GRANT OPTION')
    found = check(db.url, projections)
    assert found == [
        ("extra_grant", "accounts", None, "in_place"),
        ("extra_grant", "accounts", None, "in_place"),
        ("extra_grant", "accounts", "balance", "in_place"),
    ]
    repair(db.url, projections, apply=True)
    assert check(db.url, projections) == []
    privileges = "SELECT has_table_privilege(%s, 'accounts', %s)"
    assert db.scalar(privileges, (reader, "SELECT"))
    for role, privilege in ((reader, "TRUNCATE"), (reader, "TRIGGER"), (other, "UPDATE")):
        assert not db.scalar(privileges, (role, privilege))
    assert not db.scalar(
        "SELECT has_column_privilege(%s, 'accounts', 'balance', 'UPDATE')", (other,)
    )
