"""What a drift check finds: a `Drift` item (its kind, what was expected and found, how it can be
repaired), and how the catalog's names are printed in it.

Every difference is a `Drift` with a kind, the column it concerns, what was expected and found, and
how it can be repaired:

- `in_place`: a safe change of the live table (add a column with its default, a widening type
  change, set or drop NOT NULL when the data allows, an index, row-level security, a policy, a
  grant);
- `rebuild`: the table's contents must be recomputed from events (a type without a safe cast, a new
  primary key, a NOT NULL column for existing rows, a missing table of a projection that has applied
  events): an online rebuild into shadow tables, swapped in when caught up;
- `drop`: something extra (a column, a policy) that only an explicit flag removes;
- `manual`: something only an operator can do (create a role, deal with a table another role
  owns or a trigger or rule someone attached, give the read-model schema a trusted owner,
  revoke CREATE another role holds on our schemas and drop what it created there).

The names in an item come from the catalog, which other roles may have filled: they are printed so
that none can pass for another name or start a line of its own.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any

from psycopg import sql

_PLAIN_NAME = re.compile(r"[a-z_][a-z0-9_$]*")


def display_name(name: str) -> str:
    """A name from the catalog as an operator reads it: bare when plain, else double-quoted with
    `"` doubled, so a name holding dots, quotes or spaces cannot pass for something else."""
    return name if _PLAIN_NAME.fullmatch(name) else '"' + name.replace('"', '""') + '"'


def printable(text: str) -> str:
    """One line, whatever the catalog held: control and line-breaking characters are escaped, so
    a column named `x\nDROP TABLE t; --` cannot start a line of its own (in a dry run's
    comment, a line of its own would be SQL). A backslash prints as `\\\\`, so the escape of a
    newline cannot be confused with a name that spells it."""
    return "".join(_printable_char(ch) for ch in text)


def _printable_char(ch: str) -> str:
    """A backslash is doubled: otherwise a name holding the two characters `\\n` would print
    exactly like one holding a real newline, and escaping would be ambiguous."""
    if ch == "\\":
        return "\\\\"
    if ch.isprintable() or ch == " ":
        return ch
    return ch.encode("unicode_escape").decode("ascii")


def sql_identifier(name: str) -> sql.Composable:
    """A name from the catalog, as SQL that stays on its line: quoted as usual, or, when it holds
    a character that is not printable (a newline...), spelled as a Unicode-escaped identifier
    (`U&"x\\000aDROP"`), which means the same name to Postgres."""
    if name.isprintable():
        return sql.Identifier(name)
    escaped = "".join(ch if ch.isprintable() and ch != "\\" else f"\\+{ord(ch):06X}" for ch in name)
    return sql.SQL('U&"' + escaped.replace('"', '""') + '"')


GRANT_OPTION = " WITH GRANT OPTION"  # suffix of an extra_grant's privilege: only the option


class DriftError(Exception):
    """Drift cannot be checked (a declaration that cannot be enforced); one line."""


class Kind(StrEnum):
    MISSING_TABLE = "missing_table"
    MISSING_COLUMN = "missing_column"
    EXTRA_COLUMN = "extra_column"
    TYPE_MISMATCH = "type_mismatch"
    NULLABILITY_MISMATCH = "nullability_mismatch"
    DEFAULT_MISMATCH = "default_mismatch"
    PRIMARY_KEY_MISMATCH = "primary_key_mismatch"
    MISSING_INDEX = "missing_index"
    RLS_NOT_ENABLED = "rls_not_enabled"
    RLS_NOT_FORCED = "rls_not_forced"
    POLICY_MISSING = "policy_missing"
    POLICY_DIFFERENT = "policy_different"
    EXTRA_POLICY = "extra_policy"
    GRANT_MISSING = "grant_missing"
    ROLE_MISSING = "role_missing"
    SCHEMA_CREATE = "schema_create"  # a role that should not may create in our schemas
    FOREIGN_OBJECT = "foreign_object"  # its functions, operators or types there
    FOREIGN_OWNER = "foreign_owner"
    EXTRA_GRANT = "extra_grant"
    FOREIGN_TRIGGER = "foreign_trigger"
    FOREIGN_RULE = "foreign_rule"
    SCHEMA_OWNER = "schema_owner"


class Repair(StrEnum):
    IN_PLACE = "in_place"
    REBUILD = "rebuild"
    DROP = "drop"
    MANUAL = "manual"


@dataclass(frozen=True)
class Drift:
    projection: str | None
    table: str | None
    column: str | None
    kind: Kind
    expected: str | None
    actual: str | None
    repair: Repair
    reason: str = ""
    subject: str | None = None  # the role or policy the item is about, if any

    def where(self, schema: str) -> str:
        """What the item is about: `schema.table.column` (names quoted when they need it), the
        projection, or the database."""
        if self.table:
            return ".".join(display_name(p) for p in (schema, self.table, self.column) if p)
        return f"projection {self.projection}" if self.projection else "database"

    def line(self, schema: str) -> str:
        text = f"{self.where(schema)}: {self.kind.value.replace('_', ' ')}"
        if self.expected is not None or self.actual is not None:
            text += f" (expected {self.expected or 'none'}, found {self.actual or 'none'})"
        repair = self.repair.value.replace("_", " ")
        text += f"; repair: {repair}" + (f" ({self.reason})" if self.reason else "")
        return printable(text)

    def as_json(self) -> dict[str, Any]:
        return asdict(self) | {"kind": self.kind.value, "repair": self.repair.value}

    @classmethod
    def from_json(cls, item: dict[str, Any]) -> Drift:
        return cls(**item | {"kind": Kind(item["kind"]), "repair": Repair(item["repair"])})
