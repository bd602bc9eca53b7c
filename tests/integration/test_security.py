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
from psycopg import sql
from psycopg.types.json import Jsonb

from projectord.projection import Projection
from tests.support.drift_projections import Accounts, Savings
from tests.support.drift_support import add_account, check, cli_env, repair, secured_accounts
from tests.support.harness import DaemonProcess, TestDatabase, run_cli, wait_until
from tests.support.role_support import TemporaryRoles, read_as, temporary_roles

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
    env = cli_env(db.url, "tests.support.drift_projections:accounts", [a, b])
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


def test_a_claimed_role_counts_only_when_the_session_holds_it(
    db: TestDatabase, readers: tuple[str, str], roles: TemporaryRoles
) -> None:
    """DB role a claiming reader role b reads nothing: the claim must name a role the session is
    (or is a member of, so could SET ROLE to anyway)."""
    a, b = readers
    assert tenants_seen(db, a, {"role": b, "tenant_id": str(TENANT_A)}) == []
    assert tenants_seen(db, b, {"role": a, "tenant_id": str(TENANT_B)}) == []
    absent = f"pd_absent_{uuid.uuid4().hex[:8]}"  # a claim of no role at all: no rows, no error
    assert tenants_seen(db, a, {"role": absent, "tenant_id": str(TENANT_A)}) == []
    both = roles.create("both")
    with db.connect(autocommit=True) as conn:
        conn.execute(f'GRANT "{a}", "{b}" TO "{both}"')
    assert tenants_seen(db, both, {"role": b, "tenant_id": str(TENANT_B)}) == [TENANT_B] * 2
    assert tenants_seen(db, a, {"role": a, "tenant_id": str(TENANT_A)}) == [TENANT_A] * 3


def test_the_claimed_tenant_is_the_authenticators_choice(
    db: TestDatabase, readers: tuple[str, str]
) -> None:
    """What the database cannot enforce, pinned down as documented (docs/security-roles.md): a
    session that may set its own claims chooses its tenant. Hence reader roles must be reachable
    only through a trusted authenticator that sets the claims."""
    a, _ = readers
    assert tenants_seen(db, a, {"role": a, "tenant_id": str(TENANT_B)}) == [TENANT_B] * 2
    with psycopg.connect(db.url, autocommit=True) as conn:  # raw SQL, no authenticator
        conn.execute(f'SET ROLE "{a}"')
        claims = json.dumps({"role": a, "tenant_id": str(TENANT_B)})
        conn.execute(sql.SQL("SET request.jwt.claims = {}").format(sql.Literal(claims)))
        assert conn.execute("SELECT count(*) FROM accounts").fetchone() == (2,)


OLD_POLICY = (  # the reader policy as projectord made it before claims were tied to the session
    "CREATE POLICY projectord_read ON accounts AS PERMISSIVE FOR SELECT TO {roles}"
    " USING ((SELECT projectord.request_claims() ->> 'role') = ANY (ARRAY[{claimed}]::text[])"
    " AND tenant_id = (SELECT projectord.request_tenant_id()))"
)


def test_init_replaces_a_policy_of_the_old_shape(
    db: TestDatabase, readers: tuple[str, str]
) -> None:
    a, b = readers
    with db.connect(autocommit=True) as conn:
        conn.execute("DROP POLICY projectord_read ON accounts")
        conn.execute(OLD_POLICY.format(roles=f'"{a}", "{b}"', claimed=f"'{a}', '{b}'"))
    assert tenants_seen(db, a, {"role": b, "tenant_id": str(TENANT_A)}) == [TENANT_A] * 3
    assert check(db.url, secured(a, b)) == [("policy_different", "accounts", None, "in_place")]

    env = cli_env(db.url, "tests.support.drift_projections:accounts", [a, b])
    init = run_cli("init", env=env)
    assert init.returncode == 0, init.stderr
    assert "policy_different on public.accounts (projectord_read)" in init.stdout
    assert tenants_seen(db, a, {"role": b, "tenant_id": str(TENANT_A)}) == []
    assert check(db.url, secured(a, b)) == []


def test_each_projection_policy_names_its_own_readers(
    db: TestDatabase, readers: tuple[str, str]
) -> None:
    """A projection with fewer readers is not `policy different` forever, and a policy widened
    to another projection's readers is reported."""
    a, b = readers
    projections: list[Projection] = [Accounts([a, b]), Savings([a])]
    repair(db.url, projections, apply=True)
    assert check(db.url, projections) == []
    assert repair(db.url, projections, apply=True)["statements"] == []

    with db.connect(autocommit=True) as conn:  # widened by hand: b may now read savings
        conn.execute("DROP POLICY projectord_read ON savings")
        conn.execute(
            OLD_POLICY.replace("ON accounts", "ON savings")
            .replace("request_claims() ->> 'role'", "request_role()")
            .format(roles=f'"{a}", "{b}"', claimed=f"'{a}'")
        )
    assert check(db.url, projections) == [("policy_different", "savings", None, "in_place")]
    repair(db.url, projections, apply=True)
    assert check(db.url, projections) == []
    with db.connect(autocommit=True) as conn:
        roles = conn.execute(
            "SELECT polroles::regrole[]::text[] FROM pg_policy"
            " WHERE polrelid = 'savings'::regclass AND polname = 'projectord_read'"
        ).fetchone()
    assert roles == ([a],)
