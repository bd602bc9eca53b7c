"""Two versions of one projection, for the blue/green tests (docs/evolution.md).

Both read `Noted` events (`{"key": k, "value": v}`) into the table `notes`, one row per key.

- `NotesV1` (version 1) adds the values up: `total`, and counts the events: `events`.
- `NotesV2` (version 2) has a different fold, not commutative: the last value wins (`value`,
  the value of the last event of the key in commit order), counts the events, and has a new
  column, `last_position`, the position of that last event. Applied twice, or in another order,
  or partly, it shows.

`TEST_NOTES_SLOW` (seconds per batch) slows either down, so a test can kill a daemon in the middle
of a build.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from typing import Any

from psycopg import AsyncConnection

from projectord import Event, Projection, Table


async def _slow() -> None:
    delay = float(os.environ.get("TEST_NOTES_SLOW", "0"))
    if delay:
        await asyncio.sleep(delay)


class NotesV1(Projection):
    name = "notes"
    event_types = ("Noted",)
    version = 1
    tables = {
        "notes": Table(
            {"key": "int PRIMARY KEY", "total": "bigint NOT NULL", "events": "bigint NOT NULL"}
        )
    }

    async def handle(self, events: Sequence[Event], conn: AsyncConnection[Any]) -> None:
        await _slow()
        await conn.execute(
            "INSERT INTO notes AS n (key, total, events)"
            " SELECT k, sum(v), count(*) FROM unnest(%s::int[], %s::bigint[]) AS u(k, v)"
            " GROUP BY k"
            " ON CONFLICT (key) DO UPDATE"
            " SET total = n.total + excluded.total, events = n.events + excluded.events",
            (
                [int(e.payload["key"]) for e in events],
                [int(e.payload["value"]) for e in events],
            ),
        )


class NotesV2(Projection):
    name = "notes"
    event_types = ("Noted",)
    version = 2
    tables = {
        "notes": Table(
            {
                "key": "int PRIMARY KEY",
                "value": "bigint NOT NULL",
                "events": "bigint NOT NULL",
                "last_position": "bigint NOT NULL",
            }
        )
    }

    async def handle(self, events: Sequence[Event], conn: AsyncConnection[Any]) -> None:
        await _slow()
        last: dict[int, tuple[int, int]] = {}
        counts: dict[int, int] = {}
        for event in events:  # commit order: the last one of a key wins
            key = int(event.payload["key"])
            last[key] = (int(event.payload["value"]), event.global_position)
            counts[key] = counts.get(key, 0) + 1
        keys = list(last)
        await conn.execute(
            "INSERT INTO notes AS n (key, value, events, last_position)"
            " SELECT k, v, c, p FROM unnest(%s::int[], %s::bigint[], %s::bigint[], %s::bigint[])"
            " AS u(k, v, c, p)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value,"
            " events = n.events + excluded.events, last_position = excluded.last_position",
            (
                keys,
                [last[k][0] for k in keys],
                [counts[k] for k in keys],
                [last[k][1] for k in keys],
            ),
        )


def v1() -> list[Projection]:
    return [NotesV1()]


def v2() -> list[Projection]:
    return [NotesV2()]


def v1_and_ledger() -> list[Projection]:
    from tests.support.projections import Ledger

    return [NotesV1(), Ledger()]


def v2_and_ledger() -> list[Projection]:
    from tests.support.projections import Ledger

    return [NotesV2(), Ledger()]
