"""The docs' examples, the part that needs no database: README.md and docs/*.md.

How examples are marked (tests/support/doc_examples.py has the details):

- Fenced ```python and ```sh blocks are examples and are run; ```text, ```console, ```sql,
  ```toml and untagged blocks are output, fragments or other languages, and are not.
- `<!-- docs-test: skip (why) -->` on the line before a fence: not run (still compiled, or
  checked by `bash -n`). `<!-- docs-test: database -->`: run by tests/integration/test_docs.py
  against a test database; `<!-- docs-test: daemon -->`: the same, with the daemon running.
  `<!-- docs-test: config -->` on a ```toml block: loaded as a configuration file.
- A page's Python blocks run in order in one namespace; top-level `await` is allowed.

This tier compiles every Python block, checks every shell block's syntax, runs the unmarked ones
(defining the example projections and aggregates, and checking that they are valid), loads the
configuration examples, checks that the configuration reference lists every key with its real
default, and that every relative link between the pages resolves, anchors included.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import anyio
import pytest
from pydantic import ByteSize, TypeAdapter

from projectord.commands.aggregate import Aggregate, CommandRegistry
from projectord.config import Settings, load_settings
from projectord.projection import Projection, load_projections, validate
from tests.support.doc_examples import (
    PAGES,
    Example,
    check_shell_syntax,
    compile_python,
    examples,
    new_namespace,
    run_python,
    run_shell,
)
from tests.support.harness import ROOT

ALL = [example for page in PAGES for example in examples(page)]


def _ids(items: list[Example]) -> list[str]:
    return [item.where for item in items]


def test_the_pages_have_examples_of_each_kind() -> None:
    """Guards the finder itself: a change to the fence or marker syntax that found nothing would
    otherwise pass every test below."""
    tags = {(e.tag, e.marker) for e in ALL}
    assert {("python", None), ("python", "database"), ("sh", None), ("sh", "database")} <= tags
    assert ("python", "skip") in tags and ("toml", "config") in tags


PYTHON = [e for e in ALL if e.tag == "python"]
SHELL = [e for e in ALL if e.tag == "sh"]


@pytest.mark.parametrize("example", PYTHON, ids=_ids(PYTHON))
def test_python_example_compiles(example: Example) -> None:
    compile_python(example)


@pytest.mark.parametrize("example", SHELL, ids=_ids(SHELL))
def test_shell_example_is_valid_bash(example: Example) -> None:
    result = check_shell_syntax(example)
    assert result.returncode == 0, result.stderr


def _defined(namespace: dict[str, Any], base: type) -> list[type]:
    return [
        value
        for value in namespace.values()
        if isinstance(value, type) and issubclass(value, base) and value is not base
    ]


PAGES_WITH_PYTHON = [
    page for page in PAGES if any(e.tag == "python" and e.marker is None for e in examples(page))
]


@pytest.mark.parametrize("page", PAGES_WITH_PYTHON, ids=[p.name for p in PAGES_WITH_PYTHON])
def test_python_examples_run_and_define_valid_classes(page: Path) -> None:
    namespace = new_namespace(page)
    blocks = [e for e in examples(page) if e.tag == "python" and e.marker is None]

    async def run_all() -> None:
        for block in blocks:
            await run_python(block, namespace)

    anyio.run(run_all)
    projections = _defined(namespace, Projection)
    aggregates = _defined(namespace, Aggregate)
    for projection in projections:
        validate(projection())  # raises ProjectionError naming what is wrong
    if aggregates:
        registry = CommandRegistry(aggregates)
        assert registry.command_types, f"{page.name}: no aggregate handles a command"


LOCAL_SHELL = [e for e in SHELL if e.marker is None]


@pytest.mark.parametrize("example", LOCAL_SHELL, ids=_ids(LOCAL_SHELL))
def test_shell_example_runs(example: Example, tmp_path: Path) -> None:
    result = run_shell(example, tmp_path, env={"PROJECTORD_STATE_DIR": str(tmp_path)})
    assert result.returncode == 0, f"{example.where}:\n{result.stdout}\n{result.stderr}"


CONFIGS = [e for e in ALL if e.marker == "config"]


@pytest.mark.parametrize("example", CONFIGS, ids=_ids(CONFIGS))
def test_configuration_example_loads(example: Example, tmp_path: Path) -> None:
    path = tmp_path / "projectord.toml"
    path.write_text(example.text)
    settings = load_settings(path)
    assert load_projections(settings.projections), "the example names no loadable projection"


# --- the configuration reference ------------------------------------------------------------

_ROW = re.compile(r"^\| `(\w+)` \| (.*?) \| (.*) \|$")


def _reference() -> dict[str, str]:
    """key -> its default cell, from docs/configuration.md's table of every key."""
    rows = {}
    for line in (ROOT / "docs" / "configuration.md").read_text().splitlines():
        match = _ROW.match(line)
        if match:
            rows[match.group(1)] = match.group(2)
    return rows


def test_configuration_reference_lists_every_key() -> None:
    documented = _reference()
    missing = sorted(set(Settings.model_fields) - set(documented))
    unknown = sorted(set(documented) - set(Settings.model_fields))
    assert not missing, f"docs/configuration.md lacks a row for {missing}"
    assert not unknown, f"docs/configuration.md documents keys projectord does not have: {unknown}"


@pytest.mark.parametrize("key", sorted(Settings.model_fields))
def test_configuration_reference_gives_the_real_default(key: str) -> None:
    cell = _reference().get(key)
    if cell is None:
        pytest.skip("no row: test_configuration_reference_lists_every_key reports it")
    default = Settings.model_fields[key].default
    first = re.search(r"`([^`]*)`", cell)
    if default is None:
        # Unset, or computed at run time (control_socket, instance_name): the cell says which.
        assert cell.startswith("unset") or first, cell
        return
    assert first, f"{key}: no default in {cell!r}"
    written = first.group(1)
    if isinstance(default, bool | str):
        assert written == str(default), (key, written, default)
    elif isinstance(default, ByteSize):
        assert TypeAdapter(ByteSize).validate_python(written) == default, (key, written)
    elif isinstance(default, int | float):
        assert float(written) == float(default), (key, written, default)
    elif isinstance(default, Path):
        assert Path(written) == default, (key, written, default)
    elif isinstance(default, list):
        assert written == repr(default), (key, written, default)
    else:
        raise AssertionError(f"{key}: a default of type {type(default).__name__} is not checked")


# --- links between the pages --------------------------------------------------------------

_LINK = re.compile(r"\]\(([^)\s]+)\)")


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    in_fence = False
    anchors = set()
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            in_fence = not in_fence
        elif not in_fence and line.startswith("#"):
            anchors.add(_slug(line.lstrip("#")))
    return anchors


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_relative_links_resolve(page: Path) -> None:
    broken = []
    for target in _LINK.findall(page.read_text()):
        if re.match(r"^[a-z]+:", target):
            continue  # http:, https:, mailto:
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(f"{target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            broken.append(f"{target}: no heading with that anchor")
    assert not broken, f"{page.name}: {broken}"
