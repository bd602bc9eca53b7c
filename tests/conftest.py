"""What every tier shares: each test starts with the upcaster registry it found.

The registry is process-wide (projectord/upcasting.py), and a test, or a docs example it runs
(docs/upcasting.md installs one), may install upcasters; a later test must not decode its events
through them."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from projectord.upcasting import installed, installing


@pytest.fixture(autouse=True)
def _upcasters_as_found() -> Iterator[None]:
    with installing(installed()):
        yield
