"""The SQL `upsert_many` builds (without sending it): one INSERT … SELECT from the JSON document,
ON CONFLICT on the key, added / kept / replaced columns, every name quoted; and what it refuses."""

from __future__ import annotations

from decimal import Decimal

import orjson
import pytest

from projectord.read_model import _default, _upsert_query


def upsert_sql(
    table: str,
    columns: tuple[str, ...],
    key: tuple[str, ...],
    add: frozenset[str] = frozenset(),
    keep: frozenset[str] = frozenset(),
) -> str:
    return _upsert_query(table, columns, key, add, keep).as_string(None)


def test_added_kept_and_replaced_columns() -> None:
    text = upsert_sql(
        "balances", ("id", "tenant_id", "balance", "opened"), ("id",),
        add=frozenset({"balance"}), keep=frozenset({"opened"}),
    )  # fmt: skip
    assert text == (
        'INSERT INTO "balances" AS t ("id", "tenant_id", "balance", "opened")'
        ' SELECT "id", "tenant_id", "balance", "opened"'
        ' FROM pg_catalog.json_populate_recordset(NULL::"balances", %s::json)'
        ' ON CONFLICT ("id") DO UPDATE SET "tenant_id" = excluded."tenant_id",'
        ' "balance" = t."balance" + excluded."balance"'
    )


def test_only_key_and_kept_columns_means_do_nothing() -> None:
    text = upsert_sql("seen", ("id", "first_at"), ("id",), keep=frozenset({"first_at"}))
    assert text.endswith('ON CONFLICT ("id") DO NOTHING')


def test_a_schema_qualified_table_and_odd_names_are_quoted() -> None:
    text = upsert_sql("rm.Odd Table", ('we"ird', "k"), ("k",))
    assert 'INSERT INTO "rm"."Odd Table" AS t ("we""ird", "k")' in text
    assert 'NULL::"rm"."Odd Table"' in text


@pytest.mark.parametrize(
    ("key", "add", "message"),
    [
        (("missing",), frozenset(), r"\['missing'\] not among the row's columns"),
        (("id",), frozenset({"nope"}), r"\['nope'\] not among the row's columns"),
        ((), frozenset(), "`key` names no column"),
    ],
)
def test_refused_declarations(key: tuple[str, ...], add: frozenset[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        upsert_sql("t", ("id", "n"), key, add=add)


def test_decimals_travel_as_exact_text_and_other_types_are_refused() -> None:
    document = orjson.dumps([{"amount": Decimal("0.1000000000000000000001")}], default=_default)
    assert document == b'[{"amount":"0.1000000000000000000001"}]'
    with pytest.raises(TypeError, match="upsert_many cannot send a set value"):
        _default({1})
    with pytest.raises(TypeError):  # so the whole document is refused before anything is sent
        orjson.dumps([{"x": {1}}], default=_default)
