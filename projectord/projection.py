"""The projection API: a `Projection` declares its event types, tables and readers, and handles
batches of events inside the transaction that also moves its checkpoint."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import psycopg
from psycopg import AsyncConnection

from projectord.cursor_reuse import reused_cursors
from projectord.event_store import Event
from projectord.queries import quote_ident
from projectord.specs import resolve_spec


class ProjectionError(Exception):
    """A projection that cannot be loaded or is declared wrongly; phrased for an operator."""


@dataclass(frozen=True)
class Table:
    """A read-model table a projection owns: column name → SQL type and constraints.

    `indexes` are extra indexes as column lists, e.g. `[("tenant_id", "created_at")]`.
    Column names are identifiers, quoted wherever they are used. Column *types* are raw SQL, by
    design (`"uuid PRIMARY KEY"`, `"int8 NOT NULL DEFAULT 0"`, `"text CHECK (…)"`): they are
    trusted code, written by the projection's author, never built from data.
    """

    columns: Mapping[str, str]
    indexes: Sequence[Sequence[str]] = field(default_factory=tuple)

    def create_sql(self, qualified_name: str) -> str:
        cols = ", ".join(f"{quote_ident(name)} {type_}" for name, type_ in self.columns.items())
        return f"CREATE TABLE IF NOT EXISTS {qualified_name} ({cols})"


class Projection:
    """Base class of a projection. Subclasses set `name`, `event_types`, `tables`, `read_access`
    and define `handle` (a whole batch) or `on` (one event at a time)."""

    name: ClassVar[str]
    event_types: ClassVar[tuple[str, ...]]
    tables: ClassVar[dict[str, Table]] = {}
    read_access: ClassVar[tuple[str, ...]] = ()
    # The default `handle` runs `on` in psycopg's pipeline mode: each statement is sent without
    # waiting for the previous one's result, so a batch costs a few round trips instead of one
    # per event (about 10x faster). An error then surfaces when the pipeline syncs, at the end of
    # the batch, not at the `execute` that caused it; the batch rolls back either way. Set it to
    # False for an `on` that catches the errors of its own statements.
    pipeline: ClassVar[bool] = True
    # The error policy (projectord/runner/error_policy.py); None takes the configuration's value.
    on_error: ClassVar[str | None] = None  # "pause" or "skip"
    max_attempts: ClassVar[int | None] = None
    handler_timeout: ClassVar[float | None] = None
    # The version of the projection's code: raising it deploys the new code blue/green (its
    # tables are built from the first event beside the live ones, then swapped in; the old ones
    # are kept for a rollback). docs/evolution.md.
    version: ClassVar[int] = 1

    async def handle(self, events: Sequence[Event], conn: AsyncConnection[Any]) -> None:
        """Apply a batch, in commit order. The default calls `on` for each event, handing out
        again the cursors of statements whose results nobody holds (projectord/cursor_reuse.py)."""
        async with reused_cursors(conn):
            # Pipelined unless the projection says not to, or the runner already sends the batch
            # as one pipeline (a nested one would sync, a round trip, on the way in and out).
            if not self.pipeline or conn.pgconn.pipeline_status != psycopg.pq.PipelineStatus.OFF:
                await self._on_each(events, conn)
                return
            async with conn.pipeline():
                await self._on_each(events, conn)

    async def _on_each(self, events: Sequence[Event], conn: AsyncConnection[Any]) -> None:
        for event in events:
            await self.on(event, conn)

    async def on(self, event: Event, conn: AsyncConnection[Any]) -> None:
        raise NotImplementedError(
            f"projection {type(self).__name__} defines neither handle() nor on()"
        )

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {getattr(self, 'name', '?')!r}>"


def load_projections(specs: Iterable[str]) -> list[Projection]:
    """Import every `module:attr` and return the checked projection instances.

    `attr` is a list of projections (instances or classes), or a zero-argument callable
    returning one.
    """
    found: list[Projection] = []
    for spec in specs:
        found.extend(_load_spec(spec))
    seen: set[str] = set()
    for projection in found:
        validate(projection)
        if projection.name in seen:
            raise ProjectionError(f"projection name {projection.name!r} is used twice")
        seen.add(projection.name)
    return found


def _load_spec(spec: str) -> list[Projection]:
    result = []
    for item in resolve_spec(spec, "projections", ProjectionError):
        if isinstance(item, type) and issubclass(item, Projection):
            item = item()
        if not isinstance(item, Projection):
            raise ProjectionError(f"projections: {spec} holds {item!r}, which is not a Projection")
        result.append(item)
    return result


def validate(projection: Projection) -> None:
    """Check a projection's declaration, so a mistake stops start-up instead of a batch."""
    cls = type(projection).__name__
    name = getattr(projection, "name", None)
    if not isinstance(name, str) or not name:
        raise ProjectionError(f"projection class {cls} has no `name`")
    types = getattr(projection, "event_types", None)
    if isinstance(types, str) or not isinstance(types, (tuple, list)) or not types:
        raise ProjectionError(
            f"projection {name!r} ({cls}) has no `event_types` (a non-empty tuple of type names)"
        )
    if not all(isinstance(t, str) for t in types):
        raise ProjectionError(f"projection {name!r}: every event type must be a string")
    for table_name, table in projection.tables.items():
        if not isinstance(table, Table):
            raise ProjectionError(f"projection {name!r}: table {table_name!r} is not a Table")
    if type(projection).handle is Projection.handle and type(projection).on is Projection.on:
        raise ProjectionError(f"projection {name!r} ({cls}) defines neither handle() nor on()")
    _validate_policy(projection, name)
    version = projection.version
    if type(version) is not int or version < 1:
        raise ProjectionError(f"projection {name!r}: version must be a whole number >= 1")
    if "#" in name:
        raise ProjectionError(
            f"projection {name!r}: '#' is reserved for the rows of versions and rebuilds"
        )


def _validate_policy(projection: Projection, name: str) -> None:
    """The error policy's overrides, checked at start-up like the rest of the declaration."""
    on_error, attempts, timeout = (
        projection.on_error,
        projection.max_attempts,
        projection.handler_timeout,
    )
    if on_error is not None and on_error not in ("pause", "skip"):
        raise ProjectionError(f"projection {name!r}: on_error must be 'pause' or 'skip'")
    if attempts is not None and (type(attempts) is not int or attempts < 1):
        raise ProjectionError(f"projection {name!r}: max_attempts must be a whole number >= 1")
    if timeout is not None and (type(timeout) not in (int, float) or timeout <= 0):
        raise ProjectionError(f"projection {name!r}: handler_timeout must be seconds > 0")
