"""Drift comparison on catalog snapshots built by hand: which difference is which kind of drift,
how it is repaired, and which facts about the live data the comparison asks for (and only those).

The reading side (`projectord.schema.drift`) is covered against PostgreSQL by
tests/integration/test_drift*.py; here the rules alone, without a server.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from projectord.projection import Projection
from projectord.schema.catalog import ColumnShape, IndexShape, PolicyShape, TableShape
from projectord.schema.drift_comparison import compare, data_questions
from projectord.schema.drift_items import Drift, Kind, Repair
from projectord.schema.drift_snapshot import (
    DatabaseSnapshot,
    ExtraGrant,
    LiveData,
    ProjectionGrants,
)
from projectord.schema.foreign_owner import ForeignCode, ForeignTable
from projectord.schema.schema_trust import ForeignObjects, UntrustedCreate
from projectord.schema.security import READ_POLICY, WRITE_POLICY


def projection(name: str, tables: Iterable[str], read_access: tuple[str, ...] = ()) -> Projection:
    """A projection as the comparison sees it: a name, table names and readers."""
    attrs = {"name": name, "event_types": ("E",), "tables": dict.fromkeys(tables),
             "read_access": read_access}  # fmt: skip
    return type("P", (Projection,), attrs)()


def column(
    name: str,
    type_: str = "integer",
    *,
    not_null: bool = False,
    default: str | None = None,
    special: bool = False,
    oid: int = 23,
) -> ColumnShape:
    return ColumnShape(name, type_, oid, not_null, default, special)


def table(name: str, *columns: ColumnShape, key: tuple[str, ...] = ("id",)) -> TableShape:
    shape = TableShape(name, "projectord", primary_key=key)
    shape.columns = {c.name: c for c in (column("id", not_null=True), *columns)}
    return shape


def db(*tables: TableShape, **fields: object) -> DatabaseSnapshot:
    return DatabaseSnapshot("rm", {t.name: t for t in tables}, **fields)  # type: ignore[arg-type]


def kinds(items: list[Drift]) -> list[tuple[Kind, Repair]]:
    return [(item.kind, item.repair) for item in items]


def only(items: list[Drift]) -> Drift:
    assert len(items) == 1, items
    return items[0]


P = projection("p", ["t"])


def test_identical_snapshots_have_no_drift_and_ask_nothing_of_the_data() -> None:
    shape = table("t", column("n", "bigint", not_null=True, default="0"))
    live = db(replace(shape))
    assert compare([P], {"t": shape}, live, LiveData()) == []
    questions = data_questions([P], {"t": shape}, live)
    assert (questions.rows, questions.nulls, questions.casts, questions.applied_events) == (
        set(),
        set(),
        [],
        set(),
    )


@pytest.mark.parametrize(("applied", "repair"), [(False, Repair.IN_PLACE), (True, Repair.REBUILD)])
def test_missing_table_is_rebuilt_only_once_its_projection_has_applied_events(
    applied: bool, repair: Repair
) -> None:
    expected = {"t": table("t")}
    assert data_questions([P], expected, db()).applied_events == {"p"}
    item = only(compare([P], expected, db(), LiveData(applied_events={"p": applied})))
    assert (item.kind, item.repair, item.table) == (Kind.MISSING_TABLE, repair, "t")


def test_missing_nullable_column_is_added_in_place_without_reading_the_table() -> None:
    expected = {"t": table("t", column("note", "text"))}
    live = db(table("t"))
    assert data_questions([P], expected, live).rows == set()
    item = only(compare([P], expected, live, LiveData()))
    assert (item.kind, item.repair, item.column, item.expected) == (
        Kind.MISSING_COLUMN,
        Repair.IN_PLACE,
        "note",
        "text",
    )


@pytest.mark.parametrize(("has_rows", "repair"), [(False, Repair.IN_PLACE), (True, Repair.REBUILD)])
def test_missing_not_null_column_without_default_depends_on_the_table_having_rows(
    has_rows: bool, repair: Repair
) -> None:
    expected = {"t": table("t", column("n", not_null=True))}
    live = db(table("t"))
    assert data_questions([P], expected, live).rows == {"t"}
    item = only(compare([P], expected, live, LiveData(rows={"t": has_rows})))
    assert (item.kind, item.repair) == (Kind.MISSING_COLUMN, repair)
    assert ("existing rows" in item.reason) is has_rows


@pytest.mark.parametrize(
    ("missing", "key", "reason"),
    [
        (column("k", not_null=True), ("id", "k"), "part of the primary key"),
        (column("s", default="nextval('t_s_seq'::regclass)"), ("id",), "serial"),
        (column("g", special=True, default="GENERATED ALWAYS AS IDENTITY"), ("id",), "identity"),
    ],
)
def test_missing_key_or_generated_column_needs_a_rebuild_whatever_the_data(
    missing: ColumnShape, key: tuple[str, ...], reason: str
) -> None:
    expected = {"t": table("t", missing, key=key)}
    live = db(table("t", key=key))
    assert data_questions([P], expected, live).rows == set()
    items = [i for i in compare([P], expected, live, LiveData()) if i.column == missing.name]
    assert kinds(items) == [(Kind.MISSING_COLUMN, Repair.REBUILD)]
    assert reason in items[0].reason


@pytest.mark.parametrize(
    ("problem", "repair"), [("", Repair.IN_PLACE), ("no safe cast", Repair.REBUILD)]
)
def test_type_change_is_in_place_only_when_the_cast_probe_finds_no_problem(
    problem: str, repair: Repair
) -> None:
    found = column("n", "integer")
    wanted = column("n", "bigint", oid=20)
    live = db(table("t", found))
    expected = {"t": table("t", wanted)}
    assert data_questions([P], expected, live).casts == [("t", found, wanted)]
    item = only(compare([P], expected, live, LiveData(cast_problems={("t", "n"): problem})))
    assert (item.kind, item.repair, item.expected, item.actual, item.reason) == (
        Kind.TYPE_MISMATCH,
        repair,
        "bigint",
        "integer",
        problem,
    )


def test_type_change_of_a_generated_column_is_a_rebuild_without_probing() -> None:
    live = db(table("t", column("n", "integer", special=True, default="GENERATED ALWAYS AS (1)")))
    expected = {
        "t": table("t", column("n", "bigint", special=True, default="GENERATED ALWAYS AS (1)"))
    }
    assert data_questions([P], expected, live).casts == []
    item = only(compare([P], expected, live, LiveData()))
    assert (item.kind, item.repair) == (Kind.TYPE_MISMATCH, Repair.REBUILD)


@pytest.mark.parametrize(("nulls", "repair"), [(False, Repair.IN_PLACE), (True, Repair.REBUILD)])
def test_set_not_null_depends_on_nulls_in_the_column(nulls: bool, repair: Repair) -> None:
    live = db(table("t", column("n")))
    expected = {"t": table("t", column("n", not_null=True))}
    assert data_questions([P], expected, live).nulls == {("t", "n")}
    item = only(compare([P], expected, live, LiveData(nulls={("t", "n"): nulls})))
    assert (item.kind, item.repair, item.expected, item.actual) == (
        Kind.NULLABILITY_MISMATCH,
        repair,
        "NOT NULL",
        "NULL",
    )


def test_drop_not_null_is_in_place_unless_the_live_key_holds_the_column() -> None:
    expected = {"t": table("t", column("n"))}
    plain = db(table("t", column("n", not_null=True)))
    keyed = db(table("t", column("n", not_null=True), key=("id", "n")))
    assert data_questions([P], expected, plain).nulls == set()
    assert kinds(compare([P], expected, plain, LiveData())) == [
        (Kind.NULLABILITY_MISMATCH, Repair.IN_PLACE)
    ]
    assert kinds(compare([P], expected, keyed, LiveData())) == [
        (Kind.NULLABILITY_MISMATCH, Repair.REBUILD),
        (Kind.PRIMARY_KEY_MISMATCH, Repair.REBUILD),
    ]


def test_default_changes_are_in_place_unless_a_sequence_is_involved() -> None:
    live = db(table("t", column("a", default="0"), column("b", default="nextval('s'::regclass)")))
    expected = {"t": table("t", column("a", default="1"), column("b", default="2"))}
    items = compare([P], expected, live, LiveData())
    assert [(i.column, i.kind, i.repair) for i in items] == [
        ("a", Kind.DEFAULT_MISMATCH, Repair.IN_PLACE),
        ("b", Kind.DEFAULT_MISMATCH, Repair.REBUILD),
    ]


def test_extra_column_is_only_dropped_on_request_and_extra_index_is_not_drift() -> None:
    have = table("t", column("old", "text"))
    have.indexes = {IndexShape(False, "USING btree (old)")}
    items = compare([P], {"t": table("t")}, db(have), LiveData())
    item = only(items)
    assert (item.kind, item.repair, item.column, item.actual) == (
        Kind.EXTRA_COLUMN,
        Repair.DROP,
        "old",
        "text",
    )


def test_missing_indexes_are_reported_in_a_stable_order() -> None:
    want = table("t", column("a"), column("b"))
    want.indexes = {IndexShape(False, "USING btree (b)"), IndexShape(True, "USING btree (a)")}
    items = compare([P], {"t": want}, db(table("t", column("a"), column("b"))), LiveData())
    assert [(i.kind, i.expected) for i in items] == [
        (Kind.MISSING_INDEX, "UNIQUE USING btree (a)"),
        (Kind.MISSING_INDEX, "USING btree (b)"),
    ]


def test_primary_key_change_is_a_rebuild() -> None:
    expected = {"t": table("t", column("k", not_null=True), key=("id", "k"))}
    live = db(table("t", column("k", not_null=True)))
    item = only(compare([P], expected, live, LiveData()))
    assert (item.kind, item.repair, item.expected, item.actual) == (
        Kind.PRIMARY_KEY_MISMATCH,
        Repair.REBUILD,
        "(id, k)",
        "(id)",
    )


def test_table_another_role_owns_is_reported_and_never_compared_or_probed() -> None:
    expected = {"t": table("t", column("n", not_null=True))}
    live = db(table("t", column("n", "text")), foreign={"t": ForeignTable("t", "mallory", "po")})
    questions = data_questions([P], expected, live)
    assert (questions.rows, questions.nulls, questions.casts) == (set(), set(), [])
    item = only(compare([P], expected, live, LiveData()))
    assert (item.kind, item.repair, item.subject) == (Kind.FOREIGN_OWNER, Repair.MANUAL, "mallory")


def test_a_rule_stops_the_comparison_of_its_table_a_trigger_does_not() -> None:
    expected = {"t": table("t", column("n", not_null=True))}
    rule = ForeignCode("t", "rule", "r", None, None)
    trigger = ForeignCode("t", "trigger", "g", "f()", "mallory")
    ruled = db(table("t", column("n")), code={"t": [rule]})
    triggered = db(table("t", column("n")), code={"t": [trigger]})
    assert data_questions([P], expected, ruled).nulls == set()
    assert kinds(compare([P], expected, ruled, LiveData())) == [(Kind.FOREIGN_RULE, Repair.MANUAL)]
    items = compare([P], expected, triggered, LiveData(nulls={("t", "n"): False}))
    assert kinds(items) == [
        (Kind.FOREIGN_TRIGGER, Repair.MANUAL),
        (Kind.NULLABILITY_MISMATCH, Repair.IN_PLACE),
    ]
    assert "mallory" in (items[0].actual or "")


def _secured(shape: TableShape, *policies: PolicyShape) -> TableShape:
    shape.rls_enabled = shape.rls_forced = True
    shape.policies = {p.name: p for p in policies}
    return shape


READ = PolicyShape(READ_POLICY, "SELECT", True, ("reader",), "true", None)
WRITE = PolicyShape(WRITE_POLICY, "ALL", True, ("projectord",), "true", "true")


def test_secured_table_needs_rls_enabled_forced_and_exactly_projectords_policies() -> None:
    secured = projection("p", ["t"], read_access=("reader",))
    expected = {"t": _secured(table("t"), READ, WRITE)}
    widened = replace(READ, roles=("public", "reader"))
    extra_permissive = PolicyShape("open", "SELECT", True, ("public",), "true", None)
    extra_restrictive = PolicyShape("narrow", "SELECT", False, ("public",), "false", None)
    have = table("t")
    have.policies = {p.name: p for p in (widened, extra_permissive, extra_restrictive)}
    live = db(have, readers={"reader"})
    items = compare([secured], expected, live, LiveData())
    assert [(i.kind, i.repair, i.subject) for i in items] == [
        (Kind.RLS_NOT_ENABLED, Repair.IN_PLACE, None),
        (Kind.RLS_NOT_FORCED, Repair.IN_PLACE, None),
        (Kind.POLICY_DIFFERENT, Repair.IN_PLACE, READ_POLICY),
        (Kind.POLICY_MISSING, Repair.IN_PLACE, WRITE_POLICY),
        (Kind.EXTRA_POLICY, Repair.DROP, "narrow"),
        (Kind.EXTRA_POLICY, Repair.IN_PLACE, "open"),
    ]


def test_security_is_not_compared_for_a_projection_without_readers() -> None:
    expected = {"t": _secured(table("t"), READ, WRITE)}
    assert compare([P], expected, db(table("t")), LiveData()) == []


def test_readers_missing_roles_and_grants_and_extra_grants() -> None:
    secured = projection("p", ["t"], read_access=("reader", "ghost"))
    shape = _secured(table("t"), READ, WRITE)
    grants = ProjectionGrants(
        extra=(
            ExtraGrant("t", "mallory", "UPDATE", None),
            ExtraGrant("t", "eve", "SELECT", "secret"),
            ExtraGrant("t", "reader", "SELECT WITH GRANT OPTION", None),
        ),
        missing_select=(("t", "reader"),),
        missing_usage=("reader",),
    )
    live = db(replace(shape), readers={"reader"}, grants={"p": grants})
    items = compare([secured], {"t": shape}, live, LiveData())
    assert [(i.kind, i.repair, i.subject, i.table) for i in items] == [
        (Kind.EXTRA_GRANT, Repair.IN_PLACE, "mallory", "t"),
        (Kind.EXTRA_GRANT, Repair.IN_PLACE, "eve", "t"),
        (Kind.EXTRA_GRANT, Repair.IN_PLACE, "reader", "t"),
        (Kind.ROLE_MISSING, Repair.MANUAL, "ghost", None),
        (Kind.GRANT_MISSING, Repair.IN_PLACE, "reader", "t"),
        (Kind.GRANT_MISSING, Repair.IN_PLACE, "reader", None),
    ]
    assert "only projectord writes" in items[0].reason
    assert items[1].column == "secret" and "not a read_access role" in items[1].reason
    assert "grant option" in items[2].reason
    assert 'CREATE ROLE "ghost"' in items[3].reason


def test_schema_owner_comes_first_and_schema_trust_last() -> None:
    untrusted = [
        UntrustedCreate("rm", "public"),
        ForeignObjects("rm", "mallory", 1, 0, 0, ("f()",)),
    ]
    live = db(table("t"), schema_owner=("mallory", "projectord"), untrusted=untrusted)
    expected = {"t": table("t", column("n"))}
    items = compare([P], expected, live, LiveData())
    assert kinds(items) == [
        (Kind.SCHEMA_OWNER, Repair.MANUAL),
        (Kind.MISSING_COLUMN, Repair.IN_PLACE),
        (Kind.SCHEMA_CREATE, Repair.MANUAL),
        (Kind.FOREIGN_OBJECT, Repair.MANUAL),
    ]
    assert items[0].actual == "owner mallory" and "ALTER SCHEMA" in items[0].reason
    assert items[2].reason == 'REVOKE CREATE ON SCHEMA "rm" FROM PUBLIC'


def test_projections_are_reported_in_declaration_order() -> None:
    first, second = projection("b", ["tb"]), projection("a", ["ta"])
    expected = {"ta": table("ta"), "tb": table("tb")}
    items = compare([first, second], expected, db(), LiveData(applied_events={"a": 0, "b": 0}))
    assert [(i.projection, i.table) for i in items] == [("b", "tb"), ("a", "ta")]


# -- properties over generated snapshots ---------------------------------------------------------

NAMES = ("id", "a", "b", "c")
TYPES = (("integer", 23), ("bigint", 20), ("text", 25))
DEFAULTS = (None, "0", "nextval('s'::regclass)")


@st.composite
def shapes(draw: st.DrawFn) -> TableShape:
    names = draw(st.lists(st.sampled_from(NAMES), unique=True, min_size=1))
    columns = {}
    for name in names:
        type_, oid = draw(st.sampled_from(TYPES))
        columns[name] = ColumnShape(
            name,
            type_,
            oid,
            draw(st.booleans()),
            draw(st.sampled_from(DEFAULTS)),
            draw(st.booleans()),
        )
    key = tuple(draw(st.lists(st.sampled_from(names), unique=True, max_size=2)))
    shape = TableShape("t", "projectord", columns, key)
    shape.indexes = {
        IndexShape(False, f"USING btree ({n})") for n in draw(st.sets(st.sampled_from(names)))
    }
    return shape


@settings(max_examples=60, deadline=None)
@given(
    want=shapes(),
    have=st.one_of(st.none(), shapes()),
    answer=st.booleans(),
    problem=st.sampled_from(["", "lossy"]),
)
def test_compare_needs_exactly_the_live_data_data_questions_asks_for(
    want: TableShape, have: TableShape | None, answer: bool, problem: str
) -> None:
    """Every lookup `compare` makes is a question `data_questions` asked (else KeyError here):
    the reader asks the database those and no more."""
    live = db(*([have] if have else []))
    questions = data_questions([P], {"t": want}, live)
    data = LiveData(
        applied_events=dict.fromkeys(questions.applied_events, answer),
        rows=dict.fromkeys(questions.rows, answer),
        nulls=dict.fromkeys(questions.nulls, answer),
        cast_problems={(t, w.name): problem for t, _, w in questions.casts},
    )
    items = compare([P], {"t": want}, live, data)
    for item in items:
        assert item.projection == "p" and item.table == "t"
        if item.repair is Repair.DROP:
            assert item.kind is Kind.EXTRA_COLUMN
        # A rebuild is always explained; so is anything an operator must do.
        if item.repair in (Repair.REBUILD, Repair.MANUAL):
            assert item.reason


@settings(max_examples=40, deadline=None)
@given(shape=shapes())
def test_a_table_compared_with_itself_has_no_drift(shape: TableShape) -> None:
    live = db(replace(shape, columns=dict(shape.columns), indexes=set(shape.indexes)))
    assert compare([P], {"t": shape}, live, LiveData()) == []
