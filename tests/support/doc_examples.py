"""The examples of README.md and docs/*.md, found and run the same way by both test tiers.

The convention, which the pages follow:

- A fenced block tagged `python` or `sh` is an example, and is run. Any other tag (`text`,
  `console`, `sql`, `toml`, or none) is output, a fragment or another language, and is not.
- An HTML comment on the line just before the fence (invisible when the page is rendered) changes
  that: `<!-- docs-test: skip (why) -->` means not run (a Python block is still compiled and a
  shell block still checked by `bash -n`); `<!-- docs-test: database -->` means run by the
  integration tier, against a fresh migrated test database; `<!-- docs-test: daemon -->` the same,
  with `projectord run` running the README's minimal projection on it; `<!-- docs-test: config -->`
  on a `toml` block means loaded as a projectord configuration file.
- The Python blocks of a page run in order in one namespace, like a doctest session: a later block
  uses what an earlier one defined. Top-level `await` is allowed; database blocks find `conn`, an
  autocommit psycopg `AsyncConnection` to the test database.
- A shell block runs as one `bash -euo pipefail` script in a temporary directory, with this
  interpreter's `projectord` first on PATH. Database blocks get `PROJECTORD_DATABASE_URL`,
  `PROJECTORD_STATE_DIR` (where a daemon's control socket is) and, as `PROJECTORD_PROJECTIONS`,
  the README's minimal projection (`balances`).
"""

from __future__ import annotations

import ast
import inspect
import os
import re
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.harness import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUN_TAGS = ("python", "sh")
MARKERS = ("skip", "database", "daemon", "config")

_FENCE = re.compile(r"^```(\S*)\s*$")
_MARKER = re.compile(r"^<!--\s*docs-test:\s*(\w+)(?:\s*\((.*)\))?\s*-->\s*$")


@dataclass(frozen=True)
class Example:
    """One fenced block of a page."""

    page: Path
    line: int  # of the opening fence, 1-based
    tag: str
    marker: str | None  # "skip", "database", "config" or None
    text: str

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"

    @property
    def runs(self) -> bool:
        return self.tag in RUN_TAGS and self.marker != "skip"

    @property
    def needs_database(self) -> bool:
        return self.marker in ("database", "daemon")


def examples(page: Path) -> list[Example]:
    """Every fenced block of `page`, with the marker on the line before it, if any.

    Raises `ValueError` for a marker that names no known kind or stands before no fence, so a typo
    cannot silently turn an example off."""
    lines = page.read_text().splitlines()
    found: list[Example] = []
    pending: tuple[int, str] | None = None
    index = 0
    while index < len(lines):
        line = lines[index]
        marker = _MARKER.match(line)
        if marker:
            if marker.group(1) not in MARKERS:
                raise ValueError(f"{page.name}:{index + 1}: unknown docs-test marker {line!r}")
            pending = (index + 1, marker.group(1))
            index += 1
            continue
        fence = _FENCE.match(line)
        if fence is None:
            if pending is not None and line.strip():
                raise _stray_marker(page, pending[0])
            index += 1
            continue
        end = index + 1
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        if end == len(lines):
            raise ValueError(f"{page.name}:{index + 1}: fence never closed")
        text = "\n".join(lines[index + 1 : end]) + "\n"
        found.append(Example(page, index + 1, fence.group(1), pending and pending[1], text))
        pending = None
        index = end + 1
    if pending is not None:
        raise _stray_marker(page, pending[0])
    return found


def _stray_marker(page: Path, line: int) -> ValueError:
    return ValueError(f"{page.name}:{line}: a docs-test marker must stand just before a fence")


def compile_python(example: Example) -> Any:
    """Compile a Python block as a module body in which top-level `await` is allowed."""
    return compile(
        example.text, example.where, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT, dont_inherit=True
    )


async def run_python(example: Example, namespace: dict[str, Any]) -> None:
    """Run one Python block in `namespace`, awaiting it if it awaits at top level."""
    result = eval(compile_python(example), namespace)  # the docs' own examples, nothing else
    if inspect.iscoroutine(result):
        await result


def new_namespace(page: Path) -> dict[str, Any]:
    """A fresh module-like namespace for one page's Python session."""
    return {"__name__": f"docs_example_{page.stem.replace('-', '_').lower()}"}


def run_shell(
    example: Example, cwd: Path, env: Mapping[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run one shell block as a script; the caller asserts on the result."""
    bin_dir = str(Path(sys.executable).parent)
    full_env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": os.pathsep.join([str(cwd), str(ROOT)]),
        **(env or {}),
    }
    return subprocess.run(
        ["bash", "-euo", "pipefail", "-c", example.text],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def check_shell_syntax(example: Example) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "-n", "-c", example.text], capture_output=True, text=True)


def readme_projection() -> Example:
    """The README's minimal projection: its first Python block."""
    return next(e for e in examples(ROOT / "README.md") if e.tag == "python")


def write_readme_projection(directory: Path) -> str:
    """Write the README's minimal projection as module `readme_projection` in `directory`; return
    its spec for `projections`."""
    (directory / "readme_projection.py").write_text(readme_projection().text)
    return "readme_projection:Balances"
