"""The unit tier: no PostgreSQL. tests/integration/conftest.py (which starts one) is not loaded
here, and a unit test that tries to connect fails at once instead of waiting for a server."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NoReturn

import psycopg
import pytest


def _no_database(*args: Any, **kwargs: Any) -> NoReturn:
    raise AssertionError("a unit test tried to connect to PostgreSQL: it belongs in integration")


@pytest.fixture(autouse=True, scope="session")
def no_database() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(psycopg.Connection, "connect", _no_database)
        patch.setattr(psycopg.AsyncConnection, "connect", _no_database)
        yield
