"""Projections for the fault and scale-out tests.

They misbehave only on events that ask for it, so the production code has no test hooks:
- `Flaky` gets a real serialization failure from the server the first time it meets an event
  with `{"flaky": true}` (once per daemon process), then applies it.
- `Hanging` hangs in `pg_sleep` on an event with `{"hang": true}`; its class attributes override
  the error policy: cancelled after 1 s, two attempts, then dead-lettered (`on_error = "skip"`).
- `Labels` indexes each event's `label`: one longer than a btree entry may be (about 2.7 kB)
  fails with SQLSTATE 54000 every time, a deterministic error psycopg calls `OperationalError`.
- `SlowServerSide` is pipelined (the default) and has seconds of server work after its writes
  (`{"seconds": S}`): in pipeline mode that work is waited for with the batch's COMMIT.
  `SlowPastTimeout` is the same with a 2 s handler timeout, two attempts, then dead letters.
- `ledgers()` returns several independent copies of `Ledger`, for several daemons to share.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from psycopg import AsyncConnection

from projectord import Event, Projection, Table
from tests.support.projections import APPLIED_LOG, LEDGER_TABLE, Ledger, log_applied

LEDGER_COPIES = 6


class Flaky(Projection):
    name = "flaky"
    event_types = ("Noted",)
    tables = {"flaky_seen": Table({"event_id": "uuid PRIMARY KEY"}), "applied_log": APPLIED_LOG}
    pipeline = False
    failed_once: set[Any] = set()  # event ids that already raised, in this process

    async def on(self, event: Event, conn: AsyncConnection[Any]) -> None:
        if event.payload.get("flaky") and event.event_id not in self.failed_once:
            self.failed_once.add(event.event_id)
            await conn.execute(
                "DO $$ BEGIN RAISE EXCEPTION 'could not serialize access (test)'"
                " USING ERRCODE = 'serialization_failure'; END $$"
            )
        await conn.execute("INSERT INTO flaky_seen VALUES (%s)", (event.event_id,))
        await log_applied(conn, self.name, [event])


class Hanging(Projection):
    name = "hanging"
    event_types = ("Noted",)
    tables = {"hanging_seen": Table({"event_id": "uuid PRIMARY KEY"})}
    on_error = "skip"
    max_attempts = 2
    handler_timeout = 1.0
    pipeline = False

    async def on(self, event: Event, conn: AsyncConnection[Any]) -> None:
        if event.payload.get("hang"):
            await conn.execute("SELECT pg_sleep(60) /* hanging handler */")
        await conn.execute("INSERT INTO hanging_seen VALUES (%s)", (event.event_id,))


class SlowServerSide(Projection):
    name = "slow_server_side"
    event_types = ("Slow",)
    tables = {"slow_seen": Table({"event_id": "uuid PRIMARY KEY"}), "applied_log": APPLIED_LOG}

    async def handle(self, events: Sequence[Event], conn: AsyncConnection[Any]) -> None:
        await conn.execute(
            "INSERT INTO slow_seen SELECT unnest(%s::uuid[])", ([e.event_id for e in events],)
        )
        await log_applied(conn, self.name, events)
        seconds = max(float(e.payload.get("seconds", 0)) for e in events)
        if seconds:
            await conn.execute("SELECT pg_sleep(%s) /* slow server side */", (seconds,))


class SlowPastTimeout(SlowServerSide):
    name = "slow_past_timeout"
    tables = {"slow_past_seen": Table({"event_id": "uuid PRIMARY KEY"})}
    on_error = "skip"
    max_attempts = 2
    handler_timeout = 2.0

    async def handle(self, events: Sequence[Event], conn: AsyncConnection[Any]) -> None:
        await conn.execute(
            "INSERT INTO slow_past_seen SELECT unnest(%s::uuid[])", ([e.event_id for e in events],)
        )
        seconds = max(float(e.payload.get("seconds", 0)) for e in events)
        if seconds:
            await conn.execute("SELECT pg_sleep(%s) /* slow past timeout */", (seconds,))


def slow_server_side() -> list[Projection]:
    return [SlowServerSide()]


def slow_past_timeout() -> list[Projection]:
    return [SlowPastTimeout()]


class Labels(Projection):
    name = "labels"
    event_types = ("Labelled",)
    tables = {
        "labels": Table(
            {"event_id": "uuid PRIMARY KEY", "label": "text NOT NULL"}, indexes=[("label",)]
        )
    }

    async def on(self, event: Event, conn: AsyncConnection[Any]) -> None:
        await conn.execute(
            "INSERT INTO labels VALUES (%s, %s)", (event.event_id, event.payload["label"])
        )


class BadPolicy(Projection):
    name = "bad_policy"
    event_types = ("Noted",)
    on_error = "ignore"

    async def on(self, event: Event, conn: AsyncConnection[Any]) -> None: ...


bad_policy = [BadPolicy]


def flaky() -> list[Projection]:
    return [Flaky()]


def labels() -> list[Projection]:
    return [Labels()]


def hanging_and_flaky() -> list[Projection]:
    return [Hanging(), Flaky()]


def ledger_copy(n: int) -> Ledger:
    """A `Ledger` named `ledger_<n>` with a totals table of its own (and the shared log)."""
    table = f"ledger_{n}"
    cls = type(
        f"Ledger{n}",
        (Ledger,),
        {
            "name": table,
            "totals": table,
            "tables": {table: LEDGER_TABLE, "applied_log": APPLIED_LOG},
        },
    )
    return cls()


def ledgers() -> list[Projection]:
    return [ledger_copy(n) for n in range(1, LEDGER_COPIES + 1)]
