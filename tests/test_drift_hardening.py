"""Drift and the read-model schema against a role that may create there, second review (issue 18):
operators that shadow pg_catalog's, CREATE held by others, SELECT grants and permissive policies
that widen access, repair ordering, one search path for declared types, escaped backslashes."""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from typing import Any

import anyio
import pytest
from psycopg import AsyncConnection, sql

from projectord import Event
from projectord.drift import Drift, Kind, Repair, drift_check, printable
from projectord.projection import Projection, Table
from projectord.repair import drift_repair
from tests.drift_support import (
    add_account,
    check,
    cli_env,
    repair,
    secured_accounts,
    settings_for,
)
from tests.harness import TestDatabase, as_daemon_role, daemon_role, run_cli
from tests.role_support import TemporaryRoles, read_as, temporary_roles


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


# -- 5. SELECT grants and permissive policies that widen access ---------------------------------


def test_select_grants_outside_read_access_and_grant_options_are_revoked(
    db: TestDatabase, roles: TemporaryRoles
) -> None:
    reader, mallory = roles.create("reader"), roles.create("mallory")
    projections = secured_accounts(db.url, reader)
    with db.connect(autocommit=True) as conn:
        conn.execute("GRANT SELECT ON accounts TO PUBLIC")
        conn.execute(f'GRANT SELECT ON accounts TO "{mallory}" WITH GRANT OPTION')
        conn.execute(f'GRANT SELECT (owner) ON accounts TO "{mallory}"')
        conn.execute(f'GRANT SELECT ON accounts TO "{reader}" WITH GRANT OPTION')
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
    reader, other = roles.create("reader"), roles.create("other")
    projections = secured_accounts(db.url, reader)
    with db.connect(autocommit=True) as conn:
        conn.execute("ALTER TABLE accounts ADD COLUMN x int")
        conn.execute(f'GRANT UPDATE (x) ON accounts TO "{other}"')
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
    env = cli_env(db.url, "tests.test_drift_hardening:moods") | {
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
