"""How a drift item prints: names from the catalog (which other roles may have filled) can pass
for no other name and can never start a line of their own; an item survives JSON both ways."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from projectord.schema.drift_items import (
    Drift,
    Kind,
    Repair,
    display_name,
    printable,
    sql_identifier,
)


def test_plain_names_print_bare_and_others_quoted() -> None:
    assert display_name("balances") == "balances"
    assert display_name("Balances") == '"Balances"'
    assert display_name("a.b") == '"a.b"'
    assert display_name('say "hi"') == '"say ""hi"""'


@given(st.text())
def test_printable_text_is_one_line(text: str) -> None:
    shown = printable(text)
    assert shown.isprintable()
    assert "\n" not in shown and "\r" not in shown


@given(st.text(max_size=20), st.text(max_size=20))
def test_printable_is_unambiguous(a: str, b: str) -> None:
    """Two different names never print the same (a literal backslash-n is not a newline)."""
    if a != b:
        assert printable(a) != printable(b)


def test_a_newline_in_a_name_cannot_start_a_line_of_sql() -> None:
    assert printable("x\nDROP TABLE t; --") == "x\\nDROP TABLE t; --"
    assert printable("x\\nDROP") == "x\\\\nDROP"
    assert sql_identifier("x\nDROP").as_string(None) == 'U&"x\\+00000ADROP"'
    assert sql_identifier("plain").as_string(None) == '"plain"'


def test_an_item_reads_as_one_line_and_survives_json() -> None:
    item = Drift("p", "t", "n\nx", Kind.TYPE_MISMATCH, "bigint", "integer", Repair.REBUILD,
                 "no safe cast from integer to bigint")  # fmt: skip
    assert item.line("rm") == (
        'rm.t."n\\nx": type mismatch (expected bigint, found integer); repair: rebuild'
        " (no safe cast from integer to bigint)"
    )
    assert Drift.from_json(item.as_json()) == item
    assert item.as_json()["kind"] == "type_mismatch"


def test_an_item_without_a_table_is_about_its_projection_or_the_database() -> None:
    role = Drift("p", None, None, Kind.ROLE_MISSING, "role r", None, Repair.MANUAL, "create it")
    schema = Drift(None, None, None, Kind.SCHEMA_CREATE, None, None, Repair.MANUAL)
    assert role.line("rm").startswith("projection p: role missing (expected role r, found none)")
    assert schema.line("rm") == "database: schema create; repair: manual"
