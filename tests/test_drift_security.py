"""Drift and read-model tables against the database's other users (issue 18, points 2, 6, 7):
tables another role owns, drift checks that run no user code, catalog text that cannot break out
of a comment, extra grants, and declared column names that cannot break out of their quotes."""

from __future__ import annotations

from typing import Any

from psycopg import AsyncConnection

from projectord import Event
from projectord.projection import Projection, Table
from tests.drift_support import check, repair
from tests.harness import TestDatabase

QUOTED = 'we"ird, evil text, "x'  # unquoted, this would declare three columns


class Quoted(Projection):
    name = "quoted"
    event_types = ("Noted",)
    tables = {"quoted": Table({"id": "uuid PRIMARY KEY", QUOTED: "text"}, indexes=[(QUOTED,)])}

    async def on(self, event: Event, conn: AsyncConnection[Any]) -> None: ...


quoted = [Quoted]


def test_a_column_name_with_a_double_quote_is_one_column(db: TestDatabase) -> None:
    db.init("tests.test_drift_security:quoted")
    columns = db.rows(
        "SELECT attname FROM pg_attribute WHERE attrelid = 'quoted'::regclass AND attnum > 0"
        " ORDER BY attnum"
    )
    assert columns == [("id",), (QUOTED,)]
    assert check(db.url, [Quoted()]) == []
    assert repair(db.url, [Quoted()])["statements"] == []
