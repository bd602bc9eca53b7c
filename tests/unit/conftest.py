"""The unit tier: no PostgreSQL. tests/integration/conftest.py (which starts one) is not loaded
here, and a unit test that tries to connect fails at once instead of waiting for a server.

Run it alone with `pytest tests/unit` (seconds); plain `pytest` runs it with the integration tier.
"""

from __future__ import annotations

from typing import Any, NoReturn

import psycopg
import pytest


def _no_database(*args: Any, **kwargs: Any) -> NoReturn:
    raise AssertionError("a unit test tried to connect to PostgreSQL: it belongs in integration")


@pytest.fixture(autouse=True)
def no_database(monkeypatch: pytest.MonkeyPatch) -> None:
    """Per test, so the guard never outlives the unit tier in a run of the whole suite."""
    monkeypatch.setattr(psycopg.Connection, "connect", _no_database)
    monkeypatch.setattr(psycopg.AsyncConnection, "connect", _no_database)
