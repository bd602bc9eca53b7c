"""The two snapshots a drift check compares, beyond the tables' shapes (`catalog`): what the
database says about the read-model schema, and the few facts about its live data that a repair
class depends on (asked as `DataQuestions`, answered as `LiveData`). Plain data, built by
`drift` from the database and by the unit tests by hand.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from projectord.schema.catalog import ColumnShape, TableShape
from projectord.schema.foreign_owner import ForeignCode, ForeignTable
from projectord.schema.schema_trust import ForeignObjects, UntrustedCreate


@dataclass(frozen=True)
class ExtraGrant:
    """A privilege someone holds on a declared table and should not (query `extra_grants`)."""

    table: str
    role: str
    privilege: str  # 'SELECT', 'UPDATE', ..., or 'SELECT WITH GRANT OPTION'
    column: str | None  # a column privilege, or None for the table


@dataclass(frozen=True)
class ProjectionGrants:
    """The grants of one projection's tables that differ from what its `read_access` implies."""

    extra: tuple[ExtraGrant, ...] = ()
    missing_select: tuple[tuple[str, str], ...] = ()  # (table, role) without SELECT
    missing_usage: tuple[str, ...] = ()  # reader roles without USAGE on the schema


@dataclass
class DatabaseSnapshot:
    """What the catalog says about the read-model schema, as far as the declared tables go."""

    schema: str
    tables: dict[str, TableShape]  # the declared tables that exist, by name
    readers: set[str] = field(default_factory=set)  # the read_access roles that exist
    foreign: dict[str, ForeignTable] = field(default_factory=dict)  # owned by another role
    code: dict[str, list[ForeignCode]] = field(default_factory=dict)  # triggers, rules, by table
    schema_owner: tuple[str, str] | None = None  # (owner, projectord's role) when untrusted
    grants: dict[str, ProjectionGrants] = field(default_factory=dict)  # by projection name
    untrusted: list[UntrustedCreate | ForeignObjects] = field(default_factory=list)


@dataclass
class DataQuestions:
    """The live data a comparison depends on; see `data_questions`."""

    applied_events: set[str] = field(default_factory=set)  # projections with a missing table
    rows: set[str] = field(default_factory=set)  # tables: do they hold rows?
    nulls: set[tuple[str, str]] = field(default_factory=set)  # (table, column): any NULLs?
    # (table, live column, declared column): why can the type not change in place?
    casts: list[tuple[str, ColumnShape, ColumnShape]] = field(default_factory=list)


@dataclass
class LiveData:
    """The answers to `DataQuestions`. A question that was not asked is a KeyError in `compare`."""

    applied_events: dict[str, bool] = field(default_factory=dict)  # by projection name
    rows: dict[str, bool] = field(default_factory=dict)  # by table
    nulls: dict[tuple[str, str], bool] = field(default_factory=dict)  # by (table, column)
    cast_problems: dict[tuple[str, str], str] = field(default_factory=dict)  # "" when castable
