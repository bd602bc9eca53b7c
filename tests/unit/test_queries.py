"""The named SQL files (sql/queries/*.sql): each loads, names are unique, the schema is filled in
quoted, and every query name the code looks up exists, so a typo in a name fails here, in
seconds, instead of in the one integration test that happens to reach that line."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import projectord
from projectord.queries import Queries, _raw_queries

PACKAGE = Path(projectord.__file__).parent
LOOKUP = re.compile(r"queries\[\"(\w+)\"\]")


def test_every_query_the_code_looks_up_is_defined() -> None:
    used = {name for path in PACKAGE.rglob("*.py") for name in LOOKUP.findall(path.read_text())}
    assert len(used) > 30  # the pattern still finds the lookups
    assert sorted(used - set(_raw_queries())) == []


def test_queries_are_loaded_without_their_comment_lines_and_trailing_semicolon() -> None:
    for name, text in _raw_queries().items():
        assert text, name
        assert not text.endswith(";"), name
        assert not any(line.lstrip().startswith("--") for line in text.splitlines()), name


def test_the_schema_is_filled_in_as_a_quoted_identifier() -> None:
    raw = next(text for text in _raw_queries().values() if "{schema}" in text)
    name = next(n for n, text in _raw_queries().items() if text == raw)
    filled = Queries("my_schema")[name]
    assert "{schema}" not in filled and '"my_schema".' in filled
    assert Queries("my_schema").schema_sql == '"my_schema"'


def test_an_unknown_query_name_is_a_key_error() -> None:
    with pytest.raises(KeyError):
        Queries("projectord")["no_such_query"]
