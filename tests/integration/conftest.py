"""Test fixtures: a real Postgres (embedded by default, or the server named by
PROJECTORD_TEST_DATABASE_URL), a fresh database per test cloned from a migrated template, and
helpers to run the real daemon as a process."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from projectord.embedded import EmbeddedPostgres
from tests.support.harness import (
    TestDatabase,
    grant_create_on_database,
    init_database,
    prepare_for_daemon_role,
    temporary_database,
)
from tests.support.role_support import TemporaryRoles, temporary_roles

TEST_URL_ENV = "PROJECTORD_TEST_DATABASE_URL"
# Per process: under pytest-xdist each worker has its own template (and, embedded, its own server).
TEMPLATE = f"projectord_template_{os.getpid()}"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "target_server: uses the test server (its fixtures reach pg_admin_url); set by"
        " the conftest, so `-m target_server` selects what a run against another server exercises",
    )


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by markers
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Marks each test that reaches the test server. The others (the CLI facing an unreachable
    URL, tests that start servers of their own, ...) run the same whatever the server, so CI's
    second run, against the machine's server, leaves them out with `-m target_server`."""
    for item in items:
        if "pg_admin_url" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.target_server)


@pytest.fixture(scope="session")
def pg_admin_url() -> Iterator[str]:
    """A superuser URL of the server the tests use."""
    url = os.environ.get(TEST_URL_ENV)
    if url:
        yield url
        return
    # Outside pytest's numbered temporary directories: a concurrent pytest session of the same
    # OS user may prune those, and with them this server's data and socket.
    home = Path(tempfile.mkdtemp(prefix="projectord-test-pg-"))
    server = EmbeddedPostgres(home / "pgdata", durable=False)
    try:
        server.start()
        yield server.url
    finally:
        server.destroy()
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="session")
def template_db(pg_admin_url: str) -> Iterator[str]:
    """A database with projectord's schema migrated, cloned for every test."""
    with psycopg.connect(pg_admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{TEMPLATE}"')
        conn.execute(f'CREATE DATABASE "{TEMPLATE}"')
    prepare_for_daemon_role(make_conninfo(pg_admin_url, dbname=TEMPLATE))
    init_database(make_conninfo(pg_admin_url, dbname=TEMPLATE))
    yield TEMPLATE
    with psycopg.connect(pg_admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{TEMPLATE}" WITH (FORCE)')


@pytest.fixture
def db(pg_admin_url: str, template_db: str) -> Iterator[TestDatabase]:
    with temporary_database(pg_admin_url, "pd_test", template_db) as name:
        url = make_conninfo(pg_admin_url, dbname=name)
        grant_create_on_database(url)
        yield TestDatabase(url, name)


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    path = tmp_path / "state"
    path.mkdir()
    return path


@pytest.fixture
def roles(pg_admin_url: str, db: TestDatabase) -> Iterator[TemporaryRoles]:
    """Roles made for one test (cluster-wide, so uniquely named), dropped after it."""
    yield from temporary_roles(pg_admin_url, db.url)


@pytest.fixture
def stranger(roles: TemporaryRoles) -> str:
    """A login role with only the CONNECT every role has by default: no grant at all."""
    return roles.create("stranger", "LOGIN")
