"""Drift and the read-model schema against a role that may create there, second review (issue 18):
operators that shadow pg_catalog's, CREATE held by others, SELECT grants and permissive policies
that widen access, repair ordering, one search path for declared types, escaped backslashes."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import pytest
from psycopg import AsyncConnection, sql

from projectord import Event
from projectord.projection import Projection, Table
from projectord.read_model import upsert_many
from projectord.schema.drift import drift_check
from projectord.schema.drift_items import Drift, Kind, Repair, printable
from projectord.schema.repair import drift_repair
from tests.integration.test_drift_security import as_mallory, mallory, spied
from tests.support.drift_projections import accounts
from tests.support.drift_support import (
    add_account,
    check,
    cli_env,
    repair,
    secured_accounts,
    settings_for,
)
from tests.support.harness import (
    DaemonProcess,
    TestDatabase,
    append_sql,
    as_daemon_role,
    credits,
    daemon_role,
    run_cli,
    wait_until,
)
from tests.support.ops_support import ask
from tests.support.role_support import TemporaryRoles, read_as, temporary_roles

__all__ = ["mallory"]  # a fixture, used by name


@pytest.fixture
def roles(pg_admin_url: str, db: TestDatabase) -> Iterator[TemporaryRoles]:
    yield from temporary_roles(pg_admin_url, db.url)


def own_schema(db: TestDatabase, name: str) -> None:
    """A read-model schema owned by the role projectord runs as in this test run."""
    owner = sql.Identifier(daemon_role()) if daemon_role() else sql.SQL("CURRENT_USER")
    with db.connect(autocommit=True) as conn:
        create = sql.SQL("CREATE SCHEMA {} AUTHORIZATION {}")
        conn.execute(create.format(sql.Identifier(name), owner))


# -- 8. backslashes ------------------------------------------------------------------------------


def test_a_backslash_prints_doubled_so_no_name_spells_an_escape() -> None:
    spelled, real = "x\\nDROP", "x\nDROP"  # the two characters `\n`, and a newline
    assert printable(spelled) == "x\\\\nDROP"
    assert printable(real) == "x\\nDROP"
    assert printable(spelled) != printable(real)
    lines = [
        Drift("p", "t", name, Kind.EXTRA_COLUMN, None, "int", Repair.DROP).line("public")
        for name in (spelled, real)
    ]
    assert lines[0].startswith('public.t."x\\\\nDROP": extra column')
    assert lines[1].startswith('public.t."x\\nDROP": extra column')
    assert "\n" not in lines[0] + lines[1]


# -- 3. operators and functions that shadow pg_catalog's ------------------------------------------

# Types that projectord's queries and the catalog compare, combine or aggregate.
SHADOWED_TYPES = (
    "smallint", "integer", "bigint", "numeric", "double precision", "text", "name", '"char"',
    "oid", "regclass", "regnamespace", "regrole", "uuid", "jsonb", "json", "boolean",
    "timestamptz", "interval", "xid", "xid8", "text[]", "name[]", "oid[]",
)  # fmt: skip
COMPARISONS = ("=", "<>", "<", "<=", ">", ">=", "~~", "@>", "<@", "&&")
ARITHMETIC = ("+", "-", "*", "/", "%", "&", ">>", "<<")

# Mallory's shadows, in the read-model schema (public here): for every pair of types and every
# operator that pg_catalog lacks with exactly those operand types, her own, which counts on her
# sequence and runs as whoever calls it. A query that needs an implicit cast to reach the
# pg_catalog operator gets hers instead. The same for the polymorphic and "any" functions.
SHADOWS = """
GRANT USAGE ON SEQUENCE spy TO PUBLIC;
DO $shadows$
DECLARE
    types text[] := %(types)s;
    l text; r text; op text; ret text; fn text; n int := 0;
BEGIN
    FOREACH l IN ARRAY types LOOP
        FOREACH r IN ARRAY types LOOP
            n := n + 1;
            FOR op, ret IN
                SELECT o, CASE WHEN o = ANY(%(comparisons)s) THEN 'boolean'
                               WHEN o = '||' THEN 'text' ELSE l END
                FROM unnest(%(operators)s) AS o
            LOOP
                CONTINUE WHEN EXISTS (
                    SELECT 1 FROM pg_operator
                    WHERE oprname = op AND oprleft = l::regtype AND oprright = r::regtype
                      AND oprnamespace = 'pg_catalog'::regnamespace);
                fn := format('spy_%%s_%%s', n, md5(ret));
                EXECUTE format('CREATE OR REPLACE FUNCTION public.%%I(%%s, %%s) RETURNS %%s'
                    ' LANGUAGE plpgsql AS $f$BEGIN PERFORM nextval(%%L); RETURN NULL; END$f$',
                    fn, l, r, ret, 'public.spy');
                EXECUTE format('CREATE OPERATOR public.%%s (LEFTARG = %%s, RIGHTARG = %%s,'
                    ' FUNCTION = public.%%I)', op, l, r, fn);
            END LOOP;
        END LOOP;
    END LOOP;
END
$shadows$;
CREATE FUNCTION spy_any(anyelement) RETURNS int LANGUAGE plpgsql
    AS $f$BEGIN PERFORM nextval('public.spy'); RETURN 0; END$f$;
CREATE FUNCTION spy_count(bigint, anyelement) RETURNS bigint LANGUAGE plpgsql
    AS $f$BEGIN PERFORM nextval('public.spy'); RETURN 0; END$f$;
CREATE AGGREGATE count(text) (SFUNC = spy_count, STYPE = bigint);
CREATE AGGREGATE count(integer) (SFUNC = spy_count, STYPE = bigint);
CREATE AGGREGATE count(boolean) (SFUNC = spy_count, STYPE = bigint);
CREATE AGGREGATE lead(bigint) (SFUNC = spy_count, STYPE = bigint);  -- also a window function
CREATE FUNCTION unnest(text[]) RETURNS SETOF text LANGUAGE plpgsql
    AS $f$BEGIN PERFORM nextval('public.spy'); END$f$;
CREATE FUNCTION unnest(oid[]) RETURNS SETOF oid LANGUAGE plpgsql
    AS $f$BEGIN PERFORM nextval('public.spy'); END$f$;
CREATE FUNCTION unnest(smallint[]) RETURNS SETOF smallint LANGUAGE plpgsql
    AS $f$BEGIN PERFORM nextval('public.spy'); END$f$;
CREATE FUNCTION unnest(uuid[]) RETURNS SETOF uuid LANGUAGE plpgsql
    AS $f$BEGIN PERFORM nextval('public.spy'); END$f$;
CREATE FUNCTION has_database_privilege(name, text) RETURNS boolean LANGUAGE plpgsql
    AS $f$BEGIN PERFORM nextval('public.spy'); RETURN true; END$f$;
"""


def arm_shadows(db: TestDatabase, mallory: str) -> None:
    operators = [*COMPARISONS, *ARITHMETIC, "||"]
    statements = SHADOWS % {
        "types": "ARRAY[" + ", ".join(f"'{t}'" for t in SHADOWED_TYPES) + "]",
        "comparisons": "ARRAY[" + ", ".join(f"'{o}'" for o in COMPARISONS) + "]",
        "operators": "ARRAY[" + ", ".join(f"'{o}'" for o in operators) + "]",
    }
    as_mallory(db, mallory, statements)


class Tally(Projection):
    """Writes through `upsert_many` (json_populate_recordset, a `+` on conflict)."""

    name = "tally"
    event_types = ("Credited",)
    tables = {"tally": Table({"id": "uuid PRIMARY KEY", "tenant_id": "uuid NOT NULL",
                              "total": "bigint NOT NULL DEFAULT 0"})}  # fmt: skip

    async def handle(self, events: Sequence[Event], conn: AsyncConnection[Any]) -> None:
        tenant = events[0].tenant_id  # one tenant in this test
        row = {"id": tenant, "tenant_id": tenant, "total": len(events)}
        await upsert_many(conn, "tally", [row], key=("id",), add=("total",))


def accounts_and_tally() -> list[Projection]:
    return [*accounts(), Tally()]


SHADOWED = "tests.integration.test_drift_hardening:accounts_and_tally"


def test_operators_and_functions_another_role_created_never_run_as_projectord(
    db: TestDatabase, mallory: str, roles: TemporaryRoles, state_dir: Path
) -> None:
    reader = roles.create("reader")
    env = cli_env(db.url, SHADOWED, [reader])
    assert run_cli("init", env=env).returncode == 0
    arm_shadows(db, mallory)
    # Armed: the fetch's old expression, run as the daemon runs it, would call her operator.
    with db.connect(autocommit=True) as conn:
        before = spied(db)
        conn.execute("SET search_path TO public")
        conn.execute("SELECT (extract(epoch FROM now()) * 1000000)::bigint")
        conn.execute("SELECT 'x' || amname FROM pg_am LIMIT 1")
        assert spied(db) == before + 2

    before = spied(db)
    init = run_cli("init", env=env)  # migrations, tables, and the security step's drift check
    assert init.returncode == 0, init.stderr
    checked = run_cli("drift", "check", "--json", env=env)
    assert checked.returncode == 1, checked.stderr
    kinds = {(d["kind"], d["subject"]) for d in json.loads(checked.stdout)["drift"]}
    assert kinds == {("schema_create", mallory), ("foreign_object", mallory)}
    repaired = run_cli("drift", "repair", "--apply", env=env)
    assert repaired.returncode == 0, repaired.stderr
    with DaemonProcess(db.url, SHADOWED, state_dir, extra_env=env):
        credits(db, 20)
        with db.connect(autocommit=True) as conn:  # too big for the cheap read: by bytes
            append_sql(conn, "Credited", {"amount": 1, "pad": "x" * 2_000_000})
        wait_until(lambda: db.scalar("SELECT count(*) FROM accounts") == 21, 30)
        wait_until(lambda: db.scalar("SELECT total FROM tally") == 21, 30)
        status = run_cli("status", "--json", env=env | {"PROJECTORD_STATE_DIR": str(state_dir)})
        assert status.returncode == 0, status.stderr
        assert {p["state"] for p in json.loads(status.stdout)["projections"]} == {"running"}
        health = ask(state_dir, "health")
        assert health["status"] == "degraded"
        assert {r["code"] for r in health["reasons"]} == {"schema_untrusted"}
        assert mallory in " ".join(r["message"] for r in health["reasons"])
        assert ask(state_dir, "drift_check")["count"] == 2
    assert spied(db) == before


def test_create_on_projectords_schema_for_public_is_reported(db: TestDatabase) -> None:
    with db.connect(autocommit=True) as conn:
        conn.execute("GRANT CREATE ON SCHEMA projectord TO PUBLIC")
    report = anyio.run(drift_check, as_daemon_role(db.url), settings_for(db.url), [Tally()])
    found = [(d["kind"], d["subject"], d["repair"]) for d in report["drift"]]
    assert ("schema_create", "public", "manual") in found
    assert "REVOKE CREATE ON SCHEMA" in report["drift"][-1]["reason"]


# -- 5. SELECT grants and permissive policies that widen access ---------------------------------


def damaged_accounts(
    db: TestDatabase, roles: TemporaryRoles, *statements: str
) -> tuple[list[Projection], str, str]:
    """The secured accounts table of a new reader role, then `statements` run on it by the
    administrator, with `{reader}` and `{other}` (a second new role) filled in."""
    reader, other = roles.create("reader"), roles.create("other")
    projections = secured_accounts(db.url, reader)
    names = {"reader": sql.Identifier(reader), "other": sql.Identifier(other)}
    with db.connect(autocommit=True) as conn:
        for statement in statements:
            conn.execute(sql.SQL(statement).format(**names))
    return projections, reader, other


def test_select_grants_outside_read_access_and_grant_options_are_revoked(
    db: TestDatabase, roles: TemporaryRoles
) -> None:
    projections, reader, mallory = damaged_accounts(
        db, roles,
        "GRANT SELECT ON accounts TO PUBLIC",
        "GRANT SELECT ON accounts TO {other} WITH GRANT OPTION",
        "GRANT SELECT (owner) ON accounts TO {other}",
        "GRANT SELECT ON accounts TO {reader} WITH GRANT OPTION",
    )  # fmt: skip
    report = anyio.run(drift_check, as_daemon_role(db.url), settings_for(db.url), projections)
    found = {(d["subject"], d["column"], d["actual"], d["repair"]) for d in report["drift"]}
    assert found == {
        ("public", None, "SELECT", "in_place"),
        (mallory, None, "SELECT", "in_place"),
        (mallory, "owner", "SELECT", "in_place"),
        (reader, None, "SELECT WITH GRANT OPTION", "in_place"),
    }
    repair(db.url, projections, apply=True)  # no --drop-extra: these widen access
    assert check(db.url, projections) == []
    privilege = "SELECT has_table_privilege(%s, 'accounts', %s)"
    assert db.scalar(privilege, (reader, "SELECT"))
    assert not db.scalar(privilege, (reader, "SELECT WITH GRANT OPTION"))
    assert not db.scalar(privilege, (mallory, "SELECT"))
    assert not db.scalar("SELECT has_column_privilege(%s, 'accounts', 'owner', 'SELECT')",
                         (mallory,))  # fmt: skip
    assert not db.scalar("SELECT has_table_privilege('public', 'accounts', 'SELECT')")


def test_an_extra_permissive_policy_is_dropped_by_a_plain_repair(
    db: TestDatabase, roles: TemporaryRoles
) -> None:
    reader = roles.create("reader")
    projections = secured_accounts(db.url, reader)
    add_account(db)
    with db.connect(autocommit=True) as conn:
        conn.execute("CREATE POLICY p ON accounts FOR SELECT TO PUBLIC USING (true)")
    count = "SELECT count(*) FROM accounts"
    assert read_as(db.url, reader, None, count) == [(1,)]  # no claims, and yet a row
    assert check(db.url, projections) == [("extra_policy", "accounts", None, "in_place")]
    repair(db.url, projections, apply=True)
    assert check(db.url, projections) == []
    assert read_as(db.url, reader, None, count) == [(0,)]


# -- 6. revokes before drops ---------------------------------------------------------------------


def test_dropping_an_extra_column_with_a_column_grant_applies(
    db: TestDatabase, roles: TemporaryRoles
) -> None:
    projections, _, _ = damaged_accounts(
        db,
        roles,
        "ALTER TABLE accounts ADD COLUMN x int",
        "GRANT UPDATE (x) ON accounts TO {other}",
    )
    assert ("extra_grant", "accounts", "x", "in_place") in check(db.url, projections)
    repair(db.url, projections, apply=True, drop_extra=True)
    assert check(db.url, projections) == []
    assert db.scalar("SELECT count(*) FROM pg_attribute WHERE attname = 'x'"
                     " AND attrelid = 'accounts'::regclass AND NOT attisdropped") == 0  # fmt: skip


# -- 7. one search path for declared types -------------------------------------------------------


class Moods(Projection):
    name = "moods"
    event_types = ("Felt",)
    tables = {"moods": Table({"id": "uuid PRIMARY KEY", "mood": "mood_t"})}

    async def on(self, event: Event, conn: AsyncConnection[Any]) -> None: ...


moods = [Moods]


def test_a_declared_type_resolves_the_same_in_init_and_drift(db: TestDatabase) -> None:
    own_schema(db, "rm2")
    with db.connect(autocommit=True) as conn:
        conn.execute("CREATE TYPE public.mood_t AS ENUM ('ok')")
    env = cli_env(db.url, "tests.integration.test_drift_hardening:moods") | {
        "PROJECTORD_READ_MODEL_SCHEMA": "rm2"
    }
    init = run_cli("init", env=env)
    assert init.returncode == 0, init.stderr
    checked = run_cli("drift", "check", env=env)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    with db.connect(autocommit=True) as conn:
        conn.execute("ALTER TABLE rm2.moods DROP COLUMN mood")
    assert check(db.url, [Moods()], read_model_schema="rm2") == [
        ("missing_column", "moods", "mood", "in_place")
    ]
    url = as_daemon_role(db.url)
    # Re-adds it with the declared type, found the same way.
    anyio.run(partial(drift_repair, url, settings_for(url, read_model_schema="rm2"), [Moods()],
                      apply=True))  # fmt: skip
    assert check(db.url, [Moods()], read_model_schema="rm2") == []
