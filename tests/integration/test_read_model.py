"""`upsert_many`: one statement per batch that inserts, adds, keeps or replaces, as declared."""

from __future__ import annotations

import uuid
from decimal import Decimal
from typing import Any

import anyio
import pytest

from projectord.database import connect
from projectord.read_model import upsert_many
from tests.support.harness import TestDatabase

TABLE = """
CREATE TABLE accounts (
    id uuid PRIMARY KEY, owner text NOT NULL, balance bigint NOT NULL DEFAULT 0,
    rate numeric, opened timestamptz, tags jsonb, note text DEFAULT 'none')
"""


def execute(db: TestDatabase, statement: str) -> None:
    with db.connect(autocommit=True) as conn:
        conn.execute(statement)


def upsert(db: TestDatabase, table: str, rows: list[dict[str, Any]], **options: Any) -> None:
    async def run() -> None:
        conn = await connect(db.url)
        async with conn, conn.transaction():
            await upsert_many(conn, table, rows, **options)

    anyio.run(run)


def test_inserts_then_adds_keeps_and_replaces(db: TestDatabase) -> None:
    execute(db, TABLE)
    a, b = uuid.uuid4(), uuid.uuid4()
    first = [
        {"id": a, "owner": "ann", "balance": 5, "rate": Decimal("0.10"), "tags": {"vip": True}},
        {"id": b, "owner": "bob", "balance": 7, "rate": None, "tags": ["x"]},
    ]
    upsert(db, "accounts", first, key=["id"], add=["balance"], keep=["owner"])
    upsert(
        db,
        "public.accounts",
        [{"id": a, "owner": "changed", "balance": -2, "rate": Decimal("0.25"), "tags": None}],
        key=["id"],
        add=["balance"],
        keep=["owner"],
    )
    rows = db.rows("SELECT id, owner, balance, rate, tags, note FROM accounts ORDER BY owner")
    assert rows == [
        (a, "ann", 3, Decimal("0.25"), None, "none"),  # added, kept, replaced; default untouched
        (b, "bob", 7, None, ["x"], "none"),
    ]


def test_nothing_to_update_inserts_or_does_nothing(db: TestDatabase) -> None:
    execute(db, "CREATE TABLE seen (id uuid PRIMARY KEY)")
    key = uuid.uuid4()
    upsert(db, "seen", [{"id": key}], key=["id"])
    upsert(db, "seen", [{"id": key}], key=["id"])
    upsert(db, "seen", [], key=["id"])
    assert db.scalar("SELECT count(*) FROM seen") == 1


def test_declaration_mistakes_are_reported_before_anything_is_sent(db: TestDatabase) -> None:
    execute(db, TABLE)
    row = {"id": uuid.uuid4(), "owner": "ann"}
    with pytest.raises(ValueError, match="balance"):
        upsert(db, "accounts", [row], key=["id"], add=["balance"])
    with pytest.raises(TypeError, match="bytes"):
        upsert(db, "accounts", [{**row, "note": b"raw"}], key=["id"])
