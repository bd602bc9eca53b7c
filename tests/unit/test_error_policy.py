"""Error classification (which failures say nothing about the handler), the error policy a
projection ends up with, and the bounds of every retry delay."""

from __future__ import annotations

import psycopg
import psycopg.errors
import pytest
from hypothesis import given
from hypothesis import strategies as st
from psycopg_pool import PoolTimeout

from projectord.backoff import jittered_delay, nominal_delay
from projectord.commands.dispatch import CONFLICT_BACKOFF, conflict_backoff
from projectord.config import Settings
from projectord.database import DeadConnection
from projectord.projection import Projection
from projectord.runner.error_policy import (
    HANDLER_BACKOFF,
    TRANSIENT_BACKOFF,
    ErrorPolicy,
    backoff,
    is_transient,
)


def sqlstate_error(sqlstate: str) -> psycopg.Error:
    """The exception psycopg raises for a server error with this SQLSTATE."""
    return psycopg.errors.lookup(sqlstate)("from the server")


@pytest.mark.parametrize(
    "sqlstate",
    [
        "40001",  # serialization failure
        "40P01",  # deadlock
        "55P03",  # lock not available
        "57P01",  # admin shutdown
        "57P02",  # crash shutdown
        "57P03",  # cannot connect now
        "08006",  # connection failure (class 08)
        "08001",
        "53100",  # disk full (class 53)
        "53200",  # out of memory
        "53300",  # too many connections
    ],
)
def test_server_and_concurrency_errors_are_transient(sqlstate: str) -> None:
    assert is_transient(sqlstate_error(sqlstate))


@pytest.mark.parametrize(
    "sqlstate",
    [
        "23505",  # unique violation: the handler's doing
        "22P02",  # invalid text representation
        "42P01",  # undefined table
        "54000",  # program limit exceeded: psycopg's OperationalError, yet deterministic
        "54001",  # statement too complex
        "55000",  # object not in prerequisite state
        "58030",  # io error
        "57014",  # query canceled (handler_timeout): counts as a handler failure
        "XX000",  # internal error
    ],
)
def test_errors_an_event_causes_count_toward_max_attempts(sqlstate: str) -> None:
    assert not is_transient(sqlstate_error(sqlstate))


def test_classification_is_by_sqlstate_not_by_psycopg_class() -> None:
    # Both are OperationalError in psycopg; only one is the server going away.
    assert isinstance(sqlstate_error("54000"), psycopg.OperationalError)
    assert isinstance(sqlstate_error("57P01"), psycopg.OperationalError)
    assert not is_transient(sqlstate_error("54000"))
    assert is_transient(sqlstate_error("57P01"))


def test_libpq_error_without_sqlstate_is_transient_without_its_connection() -> None:
    # Without the connection it was raised on, it is taken for a lost connection; with a sound
    # connection the runner turns it into a ClientSideError first (covered in integration).
    assert is_transient(psycopg.OperationalError("server closed the connection unexpectedly"))
    assert not is_transient(psycopg.InterfaceError("not an OperationalError"))


@pytest.mark.parametrize(
    "error", [DeadConnection("no answer in 10 s"), PoolTimeout("no free connection")]
)
def test_missed_deadline_and_exhausted_pool_are_transient(error: Exception) -> None:
    assert is_transient(error)


@pytest.mark.parametrize("error", [ValueError("bad payload"), KeyError("amount"), TimeoutError()])
def test_non_database_errors_are_handler_failures(error: Exception) -> None:
    assert not is_transient(error)


def test_every_known_sqlstate_is_transient_exactly_when_listed_or_in_a_transient_class() -> None:
    """Exhaustively over psycopg's SQLSTATE table: nothing else is retried for ever."""
    codes = {
        cls.sqlstate
        for cls in vars(psycopg.errors).values()
        if isinstance(cls, type) and issubclass(cls, psycopg.Error) and cls.sqlstate
    }
    assert len(codes) > 200
    listed = {"40001", "40P01", "55P03", "57P01", "57P02", "57P03"}
    wrong = sorted(
        code
        for code in codes
        if is_transient(sqlstate_error(code)) is not (code in listed or code[:2] in ("08", "53"))
    )
    assert wrong == []


# -- the policy a projection gets ---------------------------------------------------------------


class Plain(Projection):
    name = "plain"
    event_types = ("E",)


class Strict(Projection):
    name = "strict"
    event_types = ("E",)
    on_error = "skip"
    max_attempts = 1


def test_configuration_sets_the_default_policy() -> None:
    settings = Settings(on_error="skip", max_attempts=7, handler_timeout=3.5)
    assert ErrorPolicy.configured(settings) == ErrorPolicy("skip", 7, 3.5)


def test_projection_overrides_only_the_keys_it_sets() -> None:
    default = ErrorPolicy("pause", 9, 12.0)
    assert ErrorPolicy.of(Plain(), default) == default
    assert ErrorPolicy.of(Strict(), default) == ErrorPolicy("skip", 1, 12.0)


# -- backoff ---------------------------------------------------------------------------------

steps = st.integers(min_value=-1, max_value=100_000)
firsts = st.floats(min_value=0.001, max_value=10.0)
caps = st.floats(min_value=0.01, max_value=3600.0)


@given(step=steps, first=firsts, cap=caps)
def test_a_delay_is_jittered_below_its_nominal_value_which_never_passes_the_cap(
    step: int, first: float, cap: float
) -> None:
    nominal = nominal_delay(step, first, cap)
    assert nominal <= cap
    assert nominal / 2 <= jittered_delay(step, first, cap) <= nominal


@given(step=steps, first=firsts, cap=caps)
def test_delays_double_until_the_cap(step: int, first: float, cap: float) -> None:
    now, later = nominal_delay(step, first, cap), nominal_delay(step + 1, first, cap)
    assert later == min(cap, now * 2) or later == cap


def test_reconnect_delays_of_the_listener_and_the_ownership_session() -> None:
    # daemon/listener.py: from 0.1 s (first failure), capped at 5 s from the 7th failure on.
    assert nominal_delay(1, 0.05, 5.0) == 0.1
    assert [nominal_delay(n, 0.05, 5.0) for n in (6, 7, 10_000)] == [3.2, 5.0, 5.0]
    # daemon/ownership.py: capped at 2 s.
    assert nominal_delay(10_000, 0.05, 2.0) == 2.0


@given(attempts=st.integers(min_value=1, max_value=10_000))
def test_handler_failure_backoff_is_jittered_exponential_and_capped(attempts: int) -> None:
    first, cap = HANDLER_BACKOFF
    delay = backoff(attempts, ValueError("handler bug"))
    nominal = min(cap, first * 2.0 ** min(attempts - 1, 64))
    assert nominal / 2 <= delay <= nominal
    assert delay <= cap


@given(attempts=st.integers(min_value=1, max_value=10_000))
def test_transient_failures_are_retried_at_least_every_two_seconds(attempts: int) -> None:
    first, cap = TRANSIENT_BACKOFF
    delay = backoff(attempts, sqlstate_error("57P01"))
    assert first / 2 <= delay <= cap == 2.0


def test_backoff_grows_with_attempts_until_the_cap() -> None:
    # Jitter is at most a factor 2, so doubling the attempt's nominal delay twice always shows.
    error = ValueError("handler bug")
    assert max(backoff(1, error) for _ in range(50)) < min(backoff(3, error) for _ in range(50))
    assert min(backoff(30, error) for _ in range(50)) >= HANDLER_BACKOFF[1] / 2


@given(attempt=st.integers(min_value=0, max_value=1_000))
def test_conflict_backoff_is_short_and_bounded(attempt: int) -> None:
    first, largest = CONFLICT_BACKOFF
    delay = conflict_backoff(attempt)
    assert 0 <= delay <= min(largest, first * 2**attempt)
