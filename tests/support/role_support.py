"""Database roles made by a test. Roles are cluster-wide: each gets a unique name, and everything
they hold in the test's databases is dropped with them, so concurrent runs and reruns never
collide."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
from psycopg import sql


class TemporaryRoles:
    def __init__(self, admin_url: str) -> None:
        self.admin_url = admin_url
        self.names: list[str] = []

    def create(self, prefix: str, options: str = "NOLOGIN") -> str:
        """A new role `pd_<prefix>_<random>`; `options` are the test's own CREATE ROLE options."""
        name = f"pd_{prefix}_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE ROLE {} " + options).format(sql.Identifier(name)))
        self.names.append(name)
        return name

    def drop(self, *database_urls: str) -> None:
        """Drop the roles, after dropping what they own or were granted in those databases."""
        for url in database_urls:
            try:
                with psycopg.connect(url, autocommit=True) as conn:
                    for name in self.names:
                        conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(name)))
            except psycopg.OperationalError:
                continue  # the database is gone already
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            for name in self.names:
                conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name)))


def temporary_roles(admin_url: str, *database_urls: str) -> Iterator[TemporaryRoles]:
    """The body of a fixture: roles made during the test, dropped after it."""
    made = TemporaryRoles(admin_url)
    try:
        yield made
    finally:
        made.drop(*database_urls)


def read_as(url: str, role: str, claims: Any, query: str) -> list[tuple[Any, ...]]:
    """Run `query` in a session that has become `role` with these request claims (a value to
    encode as JSON, a raw string, or None for no claims at all)."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(role)))
        if claims is not None:
            raw = claims if isinstance(claims, str) else json.dumps(claims)
            conn.execute("SELECT set_config('request.jwt.claims', %s, false)", (raw,))
        return conn.execute(query).fetchall()
