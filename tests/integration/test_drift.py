"""Schema drift against a real Postgres: each kind detected with its column and repair class,
repaired, gone on the next check; repair twice changes nothing; extras reported and kept."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

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
from tests.support.harness import TestDatabase, run_cli
from tests.support.role_support import TemporaryRoles, temporary_roles


@pytest.fixture
def roles(pg_admin_url: str, db: TestDatabase) -> Iterator[TemporaryRoles]:
    yield from temporary_roles(pg_admin_url, db.url)


@pytest.fixture
def reader(roles: TemporaryRoles) -> str:
    return roles.create("reader")


# (damage done to a correct table, the drift expected: (kind, column, repair class) ...)
CASES = {
    "missing table": ("DROP TABLE accounts", [("missing_table", None, "in_place")]),
    "missing column": (
        "ALTER TABLE accounts DROP COLUMN note",
        [("missing_column", "note", "in_place")],
    ),
    "missing column with a default": (
        "ALTER TABLE accounts DROP COLUMN owner",  # drops the index on (tenant_id, owner) too
        [("missing_column", "owner", "in_place"), ("missing_index", None, "in_place")],
    ),
    "missing NOT NULL column without a default, in a table with rows": (
        "ALTER TABLE accounts DROP COLUMN opened_at",
        [("missing_column", "opened_at", "rebuild")],
    ),
    "widening type": (
        "ALTER TABLE accounts ALTER COLUMN balance TYPE integer",
        [("type_mismatch", "balance", "in_place")],
    ),
    "varchar is not text": (
        "ALTER TABLE accounts ALTER COLUMN note TYPE text",
        [("type_mismatch", "note", "in_place")],
    ),
    "values too long for the declared type": (
        "ALTER TABLE accounts ALTER COLUMN note TYPE text;"
        " UPDATE accounts SET note = repeat('x', 50)",
        [("type_mismatch", "note", "rebuild")],
    ),
    "type without a safe cast": (
        "ALTER TABLE accounts ALTER COLUMN balance DROP DEFAULT;"
        " ALTER TABLE accounts ALTER COLUMN balance TYPE text;"
        " ALTER TABLE accounts ALTER COLUMN balance SET DEFAULT 0",
        [("type_mismatch", "balance", "rebuild")],
    ),
    "nullable where NOT NULL is declared": (
        "ALTER TABLE accounts ALTER COLUMN owner DROP NOT NULL",
        [("nullability_mismatch", "owner", "in_place")],
    ),
    "NULLs where NOT NULL is declared": (
        "ALTER TABLE accounts ALTER COLUMN owner DROP NOT NULL; UPDATE accounts SET owner = NULL",
        [("nullability_mismatch", "owner", "rebuild")],
    ),
    "NOT NULL where nullable is declared": (
        "UPDATE accounts SET note = 'n'; ALTER TABLE accounts ALTER COLUMN note SET NOT NULL",
        [("nullability_mismatch", "note", "in_place")],
    ),
    "default": (
        "ALTER TABLE accounts ALTER COLUMN balance SET DEFAULT 1",
        [("default_mismatch", "balance", "in_place")],
    ),
    "primary key": (
        "ALTER TABLE accounts DROP CONSTRAINT accounts_pkey;"
        " ALTER TABLE accounts ADD PRIMARY KEY (id, tenant_id)",
        [("primary_key_mismatch", None, "rebuild")],
    ),
    "missing index": (
        "DROP INDEX accounts_tenant_id_owner_idx",
        [("missing_index", None, "in_place")],
    ),
    "row-level security off": (
        "ALTER TABLE accounts DISABLE ROW LEVEL SECURITY",
        [("rls_not_enabled", None, "in_place")],
    ),
    "row-level security not forced": (
        "ALTER TABLE accounts NO FORCE ROW LEVEL SECURITY",
        [("rls_not_forced", None, "in_place")],
    ),
    "policy missing": (
        "DROP POLICY projectord_read ON accounts",
        [("policy_missing", None, "in_place")],
    ),
    "policy different": (
        "DROP POLICY projectord_read ON accounts;"
        " CREATE POLICY projectord_read ON accounts FOR SELECT USING (true)",
        [("policy_different", None, "in_place")],
    ),
    "grant missing": (
        "REVOKE SELECT ON accounts FROM {reader}",
        [("grant_missing", None, "in_place")],
    ),
    "extra permissive policy": (  # widens access: repaired without --drop-extra
        "CREATE POLICY everyone ON accounts FOR SELECT USING (true)",
        [("extra_policy", None, "in_place")],
    ),
    "extra restrictive policy": (  # only narrows: kept unless dropped explicitly
        "CREATE POLICY narrower ON accounts AS RESTRICTIVE FOR SELECT USING (balance > 0)",
        [("extra_policy", None, "drop")],
    ),
    "extra column": (
        "ALTER TABLE accounts ADD COLUMN legacy integer",
        [("extra_column", "legacy", "drop")],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_drift_kind_is_detected_repaired_and_gone(
    db: TestDatabase, reader: str, case: str
) -> None:
    damage, expected = CASES[case]
    projections = secured_accounts(db.url, reader)
    add_account(db, balance=5)
    with db.connect(autocommit=True) as conn:
        conn.execute(damage.replace("{reader}", f'"{reader}"'))

    found = check(db.url, projections)
    assert found == [(kind, "accounts", column, how) for kind, column, how in expected]

    first = repair(db.url, projections, apply=True, drop_extra=True)
    assert first["applied"] and (first["statements"] or first["rebuilds"])
    assert check(db.url, projections) == []
    second = repair(db.url, projections, apply=True, drop_extra=True)
    assert second["statements"] == [] and second["rebuilds"] == [] and second["drift"] == []


def test_in_place_repairs_keep_the_rows(db: TestDatabase, reader: str) -> None:
    projections = secured_accounts(db.url, reader)
    add_account(db, balance=2**31 - 1, note="kept")
    with db.connect(autocommit=True) as conn:
        conn.execute("ALTER TABLE accounts ALTER COLUMN balance TYPE integer")
        conn.execute("ALTER TABLE accounts DROP COLUMN owner")  # has a default: added in place
    result = repair(db.url, projections, apply=True)
    assert result["rebuilds"] == [] and len(result["statements"]) == 3  # column, type, index
    assert db.rows("SELECT balance, note, owner FROM accounts") == [(2**31 - 1, "kept", "")]
    assert check(db.url, projections) == []


def test_types_are_compared_as_postgres_normalises_them(db: TestDatabase) -> None:
    class Spelled(Projection):
        name = "spelled"
        event_types = ("Spelled",)
        tables = {
            "spelled": Table(
                {"a": "int4", "b": "INT", "c": "character varying(9)", "d": "float8", "e": "bool"}
            )
        }

        async def on(self, event: Any, conn: Any) -> None: ...

    with db.connect(autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE spelled (a integer, b int4, c varchar(9), d double precision, e boolean)"
        )
    assert check(db.url, [Spelled()]) == []
    with db.connect(autocommit=True) as conn:
        conn.execute("ALTER TABLE spelled ALTER COLUMN c TYPE varchar(10)")
    assert check(db.url, [Spelled()]) == [("type_mismatch", "spelled", "c", "in_place")]
    with db.connect(autocommit=True) as conn:
        conn.execute("INSERT INTO spelled (c) VALUES ('ten chars!')")  # would not fit in 9
    assert check(db.url, [Spelled()]) == [("type_mismatch", "spelled", "c", "rebuild")]


def test_extra_columns_are_reported_and_kept(db: TestDatabase, reader: str) -> None:
    projections = secured_accounts(db.url, reader)
    add_account(db)
    with db.connect(autocommit=True) as conn:
        conn.execute("ALTER TABLE accounts ADD COLUMN legacy text DEFAULT 'hand-made'")
        conn.execute("ALTER TABLE accounts DROP CONSTRAINT accounts_pkey")  # needs a rebuild

    result = repair(db.url, projections, apply=True)
    assert result["statements"] == [] and result["rebuilds"] == []
    why = {item["kind"]: item["why"] for item in result["left"]}
    assert "--drop-extra" in why["extra_column"] and "--drop-extra" in why["primary_key_mismatch"]
    assert db.rows("SELECT legacy FROM accounts") == [("hand-made",)]
    assert ("extra_column", "accounts", "legacy", "drop") in check(db.url, projections)

    repair(db.url, projections, apply=True, drop_extra=True)
    assert check(db.url, projections) == []
    # Gone from the live table; the table the rebuild replaced is kept for a rollback.
    legacy = "SELECT attrelid::regclass::text FROM pg_attribute WHERE attname = 'legacy'"
    [(kept,)] = db.rows("SELECT tables_schema FROM projectord.projection_versions")
    assert db.rows(legacy) == [(f"{kept}.accounts",)]


def test_only_the_configured_read_model_schema_is_compared(db: TestDatabase) -> None:
    projections: list[Projection] = [Accounts()]
    with db.connect(autocommit=True) as conn:
        conn.execute("CREATE SCHEMA elsewhere")
        conn.execute("CREATE TABLE elsewhere.accounts (id text)")  # a same-named stranger
    assert check(db.url, projections) == [("missing_table", "accounts", None, "in_place")]
    kinds = {kind for kind, *_ in check(db.url, projections, read_model_schema="elsewhere")}
    assert {"type_mismatch", "missing_column", "primary_key_mismatch", "missing_index"} <= kinds
    repair(db.url, projections, apply=True)
    assert check(db.url, projections) == []
    assert db.scalar("SELECT count(*) FROM elsewhere.accounts") == 0  # untouched


def test_a_missing_role_is_reported_for_an_operator(
    db: TestDatabase, roles: TemporaryRoles
) -> None:
    absent = f"pd_absent_{uuid.uuid4().hex[:8]}"
    projections: list[Projection] = [Accounts([absent])]
    repair(db.url, projections, apply=True)
    found = check(db.url, projections)
    assert ("role_missing", None, None, "manual") in found
    left = repair(db.url, projections, apply=True)["left"]
    assert [item["kind"] for item in left] == ["role_missing"] and "CREATE ROLE" in left[0]["why"]

    roles.names.append(absent)
    with db.connect(autocommit=True) as conn:
        conn.execute(f'CREATE ROLE "{absent}" NOLOGIN')
    kinds = {kind for kind, *_ in check(db.url, projections)}
    assert kinds == {"policy_missing", "grant_missing"}
    repair(db.url, projections, apply=True)
    assert check(db.url, projections) == []


def test_missing_table_of_a_projection_with_applied_events_is_rebuilt(db: TestDatabase) -> None:
    projections: list[Projection] = [Accounts()]
    repair(db.url, projections, apply=True)
    with db.connect(autocommit=True) as conn:
        for amount in (3, 4):
            conn.execute(
                "INSERT INTO projectord.events (tenant_id, aggregate_id, version, type, payload)"
                " VALUES (%s, gen_random_uuid(), 1, 'Credited', jsonb_build_object('amount', %s))",
                (TENANT, amount),
            )
    run_cli(
        "rebuild",
        "accounts",
        "--online",
        env=cli_env(db.url, "tests.support.drift_projections:accounts"),
    ).check_returncode()
    with db.connect(autocommit=True) as conn:
        conn.execute("DROP TABLE accounts")
    assert check(db.url, projections) == [("missing_table", "accounts", None, "rebuild")]
    result = repair(db.url, projections, apply=True)
    assert result["rebuilds"] == ["accounts"]
    assert db.scalar("SELECT sum(balance) FROM accounts") == 7


def test_command_line_exit_statuses_and_json(db: TestDatabase, reader: str) -> None:
    env = cli_env(db.url, "tests.support.drift_projections:accounts", [reader])
    checked = run_cli("drift", "check", "--json", env=env)
    assert checked.returncode == 1, checked.stderr
    report = json.loads(checked.stdout)
    assert report["ok"] is False and report["count"] == 1
    assert set(report["drift"][0]) >= {"table", "column", "kind", "expected", "actual", "repair"}
    assert report["drift"][0]["kind"] == "missing_table"

    human = run_cli("drift", "check", env=env)
    assert human.returncode == 1 and "public.accounts: missing table" in human.stdout

    dry = run_cli("drift", "repair", env=env)
    assert dry.returncode == 0, dry.stderr
    assert 'CREATE TABLE IF NOT EXISTS "public"."accounts"' in dry.stdout
    assert "FORCE ROW LEVEL SECURITY" in dry.stdout
    assert db.scalar("SELECT to_regclass('public.accounts')") is None  # a dry run changes nothing

    applied = run_cli("drift", "repair", "--apply", env=env)
    assert applied.returncode == 0, applied.stderr
    clean = run_cli("drift", "check", env=env)
    assert clean.returncode == 0 and "no drift" in clean.stdout
    again = run_cli("drift", "repair", "--apply", env=env)
    assert again.returncode == 0 and "nothing to do" in again.stdout


def test_check_fails_with_status_2_and_one_line(db: TestDatabase) -> None:
    unreachable = cli_env(db.url, "tests.support.drift_projections:accounts")
    unreachable["PROJECTORD_DATABASE_URL"] = "postgresql://nobody:s3cret@127.0.0.1:1/none"
    failed = run_cli("drift", "check", env=unreachable)
    assert failed.returncode == 2
    lines = failed.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("projectord: ") and "s3cret" not in lines[0]

    no_tenant = run_cli(
        "drift", "check", env=cli_env(db.url, "tests.support.drift_projections:no_tenant")
    )
    assert no_tenant.returncode == 2
    assert "has no tenant_id column" in no_tenant.stderr
