"""Resolving `"module:attr"` entries of the `projections` and `aggregates` keys, and the
projection declarations that loading checks before anything starts."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from projectord.projection import ProjectionError, load_projections
from projectord.specs import resolve_spec

MODULE = """
from projectord.projection import Projection, Table


class Counter(Projection):
    name = "counter"
    event_types = ("Counted",)
    tables = {"counts": Table({"id": "uuid PRIMARY KEY"})}

    async def on(self, event, conn):
        pass


class Nested:
    class Inner:
        value = 42


def factory():
    return [Counter()]


def one():
    return "made"


PAIR = (1, 2)
NOT_A_PROJECTION = 5


class Nameless(Projection):
    event_types = ("E",)

    async def on(self, event, conn):
        pass


class NoTypes(Projection):
    name = "no_types"
    event_types = "Counted"

    async def on(self, event, conn):
        pass


class NoHandler(Projection):
    name = "idle"
    event_types = ("E",)


class Twice(Counter):
    pass


class BadPolicy(Counter):
    name = "bad_policy"
    on_error = "explode"
"""


@pytest.fixture(autouse=True)
def spec_module(tmp_path: Path) -> Iterator[str]:
    (tmp_path / "unit_specs_mod.py").write_text(MODULE)
    sys.path.insert(0, str(tmp_path))
    yield "unit_specs_mod"
    sys.path.remove(str(tmp_path))
    sys.modules.pop("unit_specs_mod", None)


class SpecError(Exception):
    pass


def resolve(spec: str) -> list[object]:
    return resolve_spec(spec, "projections", SpecError)


def test_a_class_is_returned_as_is_not_instantiated() -> None:
    [found] = resolve("unit_specs_mod:Counter")
    assert isinstance(found, type) and found.__name__ == "Counter"


def test_a_zero_argument_function_is_called_and_its_list_unpacked() -> None:
    assert [type(p).__name__ for p in resolve("unit_specs_mod:factory")] == ["Counter"]
    assert resolve("unit_specs_mod:one") == ["made"]


def test_tuples_are_unpacked_and_dotted_attributes_followed() -> None:
    assert resolve("unit_specs_mod:PAIR") == [1, 2]
    assert resolve("unit_specs_mod:Nested.Inner.value") == [42]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_such_module_xyz:thing", "projections: cannot import 'no_such_module_xyz'"),
        ("unit_specs_mod:Absent", "projections: 'unit_specs_mod' has no attribute 'Absent'"),
        ("unit_specs_mod:Nested.Gone", "has no attribute 'Nested.Gone'"),
    ],
)
def test_problems_name_the_key_in_the_callers_error(spec: str, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        resolve(spec)


def test_load_projections_instantiates_classes_and_checks_names_are_unique() -> None:
    [counter] = load_projections(["unit_specs_mod:Counter"])
    assert counter.name == "counter"
    with pytest.raises(ProjectionError, match="'counter' is used twice"):
        load_projections(["unit_specs_mod:Counter", "unit_specs_mod:Twice"])


@pytest.mark.parametrize(
    ("attr", "message"),
    [
        ("NOT_A_PROJECTION", "holds 5, which is not a Projection"),
        ("Nameless", "projection class Nameless has no `name`"),
        ("NoTypes", "'no_types' .* has no `event_types`"),
        ("NoHandler", "'idle' .* defines neither handle\\(\\) nor on\\(\\)"),
        ("BadPolicy", "bad_policy"),
    ],
)
def test_declaration_mistakes_stop_loading(attr: str, message: str) -> None:
    with pytest.raises(ProjectionError, match=message):
        load_projections([f"unit_specs_mod:{attr}"])
