"""Set-based writes into read-model tables, for projections' `handle`.

`upsert_many` writes a whole batch's rows in one statement. Rows travel as one JSON document
(encoded by orjson, in C) that `json_populate_recordset` turns into rows of the table's own type on
the server. Measured against the usual `unnest` of one array per column, it spends a quarter of the
client CPU (psycopg dumps arrays element by element in Python) and writes faster; against one
`INSERT … ON CONFLICT` per row, it is several times faster even in pipeline mode.

Values must be what orjson encodes (str, int, float, bool, None, UUID, datetime, date, dicts and
lists for json/jsonb columns) or a `Decimal`; Postgres converts each from its JSON text to the
column's type. Keys must be unique within one call: `ON CONFLICT` cannot touch a row twice in one
statement, so fold first (that is the point of a batch).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from decimal import Decimal
from typing import Any

import orjson
from psycopg import AsyncConnection, sql


def _default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return str(value)  # Postgres parses the text exactly; a float would round
    raise TypeError(f"upsert_many cannot send a {type(value).__name__} value")


async def upsert_many(
    conn: AsyncConnection[Any],
    table: str,
    rows: Sequence[Mapping[str, Any]],
    *,
    key: Sequence[str],
    add: Iterable[str] = (),
    keep: Iterable[str] = (),
) -> None:
    """Insert `rows` into `table`, or update the rows whose `key` columns already exist.

    On a conflict, columns in `add` are added to the stored value (counters, balances), columns
    in `keep` keep the stored value, and every other column given takes the new value. The
    columns are those of the first row; every row must have the same keys. `table` may be
    schema-qualified (`"schema.table"`); unqualified, it resolves like any name in a handler.
    """
    if not rows:
        return
    columns = tuple(rows[0])
    query = _upsert_query(table, columns, tuple(key), frozenset(add), frozenset(keep))
    document = orjson.dumps(rows, default=_default)
    await conn.execute(query, (document.decode(),))


@functools.lru_cache(maxsize=256)
def _upsert_query(
    table: str,
    columns: tuple[str, ...],
    key: tuple[str, ...],
    add: frozenset[str],
    keep: frozenset[str],
) -> sql.Composed:
    unknown = (set(key) | add | keep) - set(columns)
    if unknown:
        raise ValueError(f"upsert_many into {table}: {sorted(unknown)} not among the row's columns")
    if not key:
        raise ValueError(f"upsert_many into {table}: `key` names no column")
    name = sql.Identifier(*table.split("."))
    cols = sql.SQL(", ").join(map(sql.Identifier, columns))
    updates = []
    for column in columns:
        if column in key or column in keep:
            continue
        ident = sql.Identifier(column)
        if column in add:
            updates.append(sql.SQL("{0} = t.{0} + excluded.{0}").format(ident))
        else:
            updates.append(sql.SQL("{0} = excluded.{0}").format(ident))
    action = (
        sql.SQL("DO UPDATE SET ") + sql.SQL(", ").join(updates)
        if updates
        else sql.SQL("DO NOTHING")
    )
    return sql.SQL(
        "INSERT INTO {name} AS t ({cols})"
        " SELECT {cols} FROM pg_catalog.json_populate_recordset(NULL::{name}, %s::json)"
        " ON CONFLICT ({key}) {action}"
    ).format(
        name=name,
        cols=cols,
        key=sql.SQL(", ").join(map(sql.Identifier, key)),
        action=action,
    )
