"""Row-level security from `read_access`, proved with real roles: each session becomes a role
(`SET ROLE`) and carries its own request claims, as PostgREST or Supabase would set them."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import make_conninfo
from psycopg.types.json import Jsonb

from projectord.projection import Projection
from tests.drift_projections import Accounts
from tests.drift_support import add_account, check, cli_env, repair, secured_accounts
from tests.harness import DaemonProcess, TestDatabase, run_cli, wait_until
from tests.role_support import TemporaryRoles, read_as, temporary_roles

TENANT_A = uuid.UUID("00000000-0000-0000-0000-00000000aaaa")
TENANT_B = uuid.UUID("00000000-0000-0000-0000-00000000bbbb")
TENANTS = "SELECT tenant_id FROM accounts"


@pytest.fixture
def roles(pg_admin_url: str, db: TestDatabase) -> Iterator[TemporaryRoles]:
    yield from temporary_roles(pg_admin_url, db.url)


@pytest.fixture
def readers(db: TestDatabase, roles: TemporaryRoles) -> tuple[str, str]:
    """Two reader roles in `read_access`, and the secured table holding 3 rows of tenant A and
    2 of tenant B."""
    a, b = roles.create("reader_a"), roles.create("reader_b")
    secured_accounts(db.url, a, b)
    for tenant, count in ((TENANT_A, 3), (TENANT_B, 2)):
        for _ in range(count):
            add_account(db, tenant_id=tenant)
    return a, b


def tenants_seen(db: TestDatabase, role: str, claims: Any) -> list[uuid.UUID]:
    return sorted(row[0] for row in read_as(db.url, role, claims, TENANTS))


def test_a_reader_sees_only_its_tenant(db: TestDatabase, readers: tuple[str, str]) -> None:
    a, b = readers
    assert tenants_seen(db, a, {"role": a, "tenant_id": str(TENANT_A)}) == [TENANT_A] * 3
    assert tenants_seen(db, b, {"role": b, "tenant_id": str(TENANT_B)}) == [TENANT_B] * 2
    # Claims of another tenant see that tenant's rows, none of A's.
    assert tenants_seen(db, a, {"role": a, "tenant_id": str(TENANT_B)}) == [TENANT_B] * 2
    # Extra claims are ignored; the uuid's spelling does not matter.
    claims = {"role": a, "tenant_id": str(TENANT_A).upper(), "sub": "x", "exp": 1}
    assert tenants_seen(db, a, claims) == [TENANT_A] * 3


@pytest.mark.parametrize(
    "claims",
    [
        None,
        "",
        "not json",
        "[1, 2]",
        '"just a string"',
        "null",
        {"tenant_id": str(TENANT_A)},
        {"role": "not_a_reader", "tenant_id": str(TENANT_A)},
        {"role": "{reader}", "tenant_id": "not-a-uuid"},
        {"role": "{reader}"},
        {"role": "{reader}", "tenant_id": None},
    ],
    ids=repr,
)
def test_missing_or_malformed_claims_read_nothing(
    db: TestDatabase, readers: tuple[str, str], claims: Any
) -> None:
    a, _ = readers
    if isinstance(claims, dict):
        claims = {k: a if v == "{reader}" else v for k, v in claims.items()}
    assert tenants_seen(db, a, claims) == []


MALICIOUS = [
    {"role": "{reader}", "tenant_id": f"{TENANT_A}' OR '1'='1"},
    {"role": "{reader}", "tenant_id": "' OR 1=1 --"},
    {"role": "{reader}' OR '1'='1", "tenant_id": str(TENANT_A)},
    {"role": ["{reader}"], "tenant_id": str(TENANT_A)},
    {"role": {"$in": ["{reader}"]}, "tenant_id": str(TENANT_A)},
    {"role": "{reader}", "tenant_id": {"id": str(TENANT_A)}},
    {"role": "{reader}", "tenant_id": [str(TENANT_A), str(TENANT_B)]},
    {"role": "{reader}", "tenant_id": "x" * 1_000_000},
    {"role": "x" * 1_000_000, "tenant_id": str(TENANT_A)},
    '{"role": "{reader}"}; DROP TABLE accounts; --',
    "'); DROP TABLE accounts; --",
    "\\x00\\u0000",
]


@pytest.mark.parametrize("claims", MALICIOUS, ids=lambda c: repr(c)[:40])
def test_malicious_claim_values_change_nothing(
    db: TestDatabase, readers: tuple[str, str], claims: Any
) -> None:
    a, _ = readers
    raw = json.dumps(claims) if not isinstance(claims, str) else claims
    assert tenants_seen(db, a, raw.replace("{reader}", a)) == []
    assert db.scalar("SELECT count(*) FROM accounts") == 5  # as the superuser: all still there


def test_a_role_outside_read_access_sees_nothing(
    db: TestDatabase, readers: tuple[str, str], roles: TemporaryRoles
) -> None:
    a, _ = readers
    outsider = roles.create("outsider")
    with pytest.raises(psycopg.errors.InsufficientPrivilege):  # no grant: not even the table
        read_as(db.url, outsider, {"role": a, "tenant_id": str(TENANT_A)}, TENANTS)
    with db.connect(autocommit=True) as conn:  # someone grants it by hand anyway
        conn.execute(f'GRANT SELECT ON accounts TO "{outsider}"')
    # Even claiming to be a reader: the policy is for the read_access roles only.
    assert tenants_seen(db, outsider, {"role": a, "tenant_id": str(TENANT_A)}) == []
    assert tenants_seen(db, outsider, {"role": outsider, "tenant_id": str(TENANT_A)}) == []


def append(url: str, type_: str, tenant: uuid.UUID, aggregate: uuid.UUID, version: int) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO projectord.events (tenant_id, aggregate_id, version, type, payload)"
            " VALUES (%s, %s, %s, %s, %s)",
            (tenant, aggregate, version, type_, Jsonb({"owner": "ann", "amount": 7})),
        )


def test_owner_without_bypassrls_sees_nothing_while_the_daemon_applies(
    db: TestDatabase, readers: tuple[str, str], roles: TemporaryRoles, state_dir: Path
) -> None:
    a, b = readers
    account = uuid.uuid4()
    env = cli_env(db.url, "tests.drift_projections:accounts", [a, b])
    with DaemonProcess(db.url, env["PROJECTORD_PROJECTIONS"], state_dir, extra_env=env):
        append(db.url, "Opened", TENANT_A, account, 1)
        append(db.url, "Credited", TENANT_A, account, 2)
        wait_until(
            lambda: db.scalar("SELECT balance FROM accounts WHERE id = %s", (account,)) == 14, 30
        )
    seen = read_as(db.url, a, {"role": a, "tenant_id": str(TENANT_A)}, "SELECT id FROM accounts")
    assert (account,) in seen and len(seen) == 4
    assert check(db.url, secured(a, b)) == []
    # Handed to an owner without BYPASSRLS (which the daemon then refuses to write into, see
    # test_drift_security.py): FORCE keeps that owner out of every tenant.
    owner = roles.create("owner")
    with db.connect(autocommit=True) as conn:
        conn.execute(f'ALTER TABLE accounts OWNER TO "{owner}"')
    assert tenants_seen(db, owner, None) == []
    assert tenants_seen(db, owner, {"role": a, "tenant_id": str(TENANT_A)}) == []


def secured(*readers: str) -> list[Projection]:
    return [Accounts(readers)]


@pytest.fixture
def writer_database(pg_admin_url: str, roles: TemporaryRoles) -> Iterator[tuple[str, str, str]]:
    """A database owned by a login role without BYPASSRLS, which runs projectord in it:
    (its name, the role, the role's URL)."""
    writer = roles.create("writer", "LOGIN")
    name = f"pd_rls_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(pg_admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}" OWNER "{writer}"')
    try:
        yield name, writer, make_conninfo(pg_admin_url, user=writer, dbname=name)
    finally:
        with psycopg.connect(pg_admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_the_daemon_refuses_to_start_when_forced_rls_would_stop_its_writes(
    pg_admin_url: str,
    writer_database: tuple[str, str, str],
    roles: TemporaryRoles,
    state_dir: Path,
) -> None:
    name, writer, writer_url = writer_database
    admin_url = make_conninfo(pg_admin_url, dbname=name)
    reader = roles.create("reader")
    env = cli_env(writer_url, "tests.drift_projections:accounts", [reader])
    assert run_cli("init", env=env).returncode == 0

    found = check(writer_url, secured(reader))
    assert ("writer_cannot_bypass_rls", None, None, "manual") in found
    refused = run_cli("drift", "repair", "--apply", env=env)
    assert refused.returncode == 1 and "BYPASSRLS" in refused.stderr
    assert check(writer_url, secured(reader))[0][0] == "rls_not_enabled"  # nothing was applied
    with psycopg.connect(admin_url, autocommit=True) as conn:  # an administrator forces it anyway
        conn.execute("ALTER TABLE accounts ENABLE ROW LEVEL SECURITY")
        conn.execute("ALTER TABLE accounts FORCE ROW LEVEL SECURITY")

    started = run_cli("run", env=env | {"PROJECTORD_STATE_DIR": str(state_dir)}, timeout=60)
    assert started.returncode == 1
    assert "BYPASSRLS" in started.stderr and "public.accounts" in started.stderr

    with psycopg.connect(pg_admin_url, autocommit=True) as conn:
        conn.execute(f'ALTER ROLE "{writer}" BYPASSRLS')
    repair(writer_url, secured(reader), apply=True)  # the policy and grants, by the tables' owner
    account = uuid.uuid4()
    with DaemonProcess(writer_url, env["PROJECTORD_PROJECTIONS"], state_dir, extra_env=env):
        append(writer_url, "Opened", TENANT_A, account, 1)
        wait_until(lambda: _balance(admin_url, account) == 7, 30)
    assert check(writer_url, secured(reader)) == []


def _balance(url: str, account: uuid.UUID) -> Any:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT balance FROM accounts WHERE id = %s", (account,)).fetchone()
        return row[0] if row else None
