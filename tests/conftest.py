"""What every tier shares: each test starts with the upcaster registry it found.

The registry is process-wide (projectord/upcasting.py), and a test, or a docs example it runs
(docs/upcasting.md installs one), may install upcasters; a later test must not decode its events
through them."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from projectord.upcasting import installed, installing


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int | None:
    """`-n auto` (pyproject.toml): a worker per core, each with its own embedded server; but one
    worker against an existing server (PROJECTORD_TEST_DATABASE_URL). The horizon projectord
    reads below is the cluster's: one test holding a transaction open there (as the horizon and
    held-back tests do) would hold back the events of the tests running beside it."""
    return 1 if os.environ.get("PROJECTORD_TEST_DATABASE_URL") else None


@pytest.fixture(autouse=True)
def _upcasters_as_found() -> Iterator[None]:
    with installing(installed()):
        yield
