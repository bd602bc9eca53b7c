"""Helpers of the drift, security and online-rebuild tests: check and repair in-process, the
secured accounts table, and the environment of a CLI or daemon process."""

from __future__ import annotations

import functools
import uuid
from collections.abc import Sequence
from typing import Any

import anyio
from psycopg import sql

from projectord.config import Settings, load_settings
from projectord.projection import Projection
from projectord.schema.drift import drift_check
from projectord.schema.repair import drift_repair
from tests.support.drift_projections import READERS_ENV, Accounts
from tests.support.harness import TestDatabase, as_daemon_role

TENANT = uuid.UUID("00000000-0000-0000-0000-0000000000a1")


def settings_for(url: str, **overrides: Any) -> Settings:
    return load_settings(None, database_url=url, **overrides)


def check(url: str, projections: Sequence[Projection], **overrides: Any) -> list[tuple]:
    """(kind, table, column, repair) of every drift item."""
    url = as_daemon_role(url)
    report = anyio.run(drift_check, url, settings_for(url, **overrides), projections)
    return [(d["kind"], d["table"], d["column"], d["repair"]) for d in report["drift"]]


def repair(url: str, projections: Sequence[Projection], **options: Any) -> dict[str, Any]:
    url = as_daemon_role(url)
    run = functools.partial(drift_repair, url, settings_for(url), projections, **options)
    return anyio.run(run)


def secured_accounts(url: str, *readers: str) -> list[Projection]:
    """The accounts table created by a repair from nothing, with its row-level security."""
    projections: list[Projection] = [Accounts(readers)]
    assert check(url, projections) == [("missing_table", "accounts", None, "in_place")]
    repair(url, projections, apply=True)
    assert check(url, projections) == []
    return projections


def add_account(db: TestDatabase, **values: Any) -> None:
    """A row written by hand (as the superuser, which bypasses row-level security)."""
    row = {"id": uuid.uuid4(), "tenant_id": TENANT, "owner": "o", "opened_at": "now"} | values
    query = sql.SQL("INSERT INTO accounts ({}) VALUES ({})").format(
        sql.SQL(", ").join(sql.Identifier(name) for name in row),
        sql.SQL(", ").join(sql.Placeholder() * len(row)),
    )
    with db.connect(autocommit=True) as conn:
        conn.execute(query, list(row.values()))


def cli_env(url: str, projections: str, readers: Sequence[str] = ()) -> dict[str, str]:
    return {
        "PROJECTORD_DATABASE_URL": url,
        "PROJECTORD_PROJECTIONS": projections,
        "PROJECTORD_LOG_FORMAT": "json",
        READERS_ENV: ",".join(readers),
    }
