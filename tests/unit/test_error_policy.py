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


TRANSIENT = [
    "08000",  # connection_exception
    "08003",  # connection_does_not_exist
    "08006",  # connection_failure
    "08P01",  # protocol_violation: still the connection
    "40001",  # serialization_failure
    "40P01",  # deadlock_detected
    "55P03",  # lock_not_available
    "57P01",  # admin_shutdown
    "57P02",  # crash_shutdown
    "57P03",  # cannot_connect_now
    "53000",  # insufficient_resources
    "53100",  # disk_full
    "53200",  # out_of_memory
    "53300",  # too_many_connections
]
COUNTED = [
    "54000",  # program_limit_exceeded: an index row too large for a btree
    "54001",  # statement_too_complex: stack depth exceeded
    "54011",  # too_many_columns
    "55000",  # object_not_in_prerequisite_state
    "55006",  # object_in_use
    "55P02",  # cant_change_runtime_param
    "58000",  # system_error
    "58030",  # io_error
    "57014",  # query_canceled: a statement_timeout, the event's own doing
    "57P04",  # database_dropped
    "40002",  # transaction_integrity_constraint_violation: class 40, not on the list
    "40003",  # statement_completion_unknown
    "23505",  # unique_violation
    "22P02",  # invalid_text_representation
    "42P01",  # undefined_table
    "XX000",  # internal_error
]


@pytest.mark.parametrize("sqlstate", TRANSIENT)
def test_listed_sqlstates_are_transient(sqlstate: str) -> None:
    assert is_transient(sqlstate_error(sqlstate))


@pytest.mark.parametrize("sqlstate", COUNTED)
def test_other_sqlstates_count_toward_max_attempts(sqlstate: str) -> None:
    assert not is_transient(sqlstate_error(sqlstate))


def test_connection_failures_without_a_sqlstate_are_transient() -> None:
    # Without the connection it was raised on, a libpq error is taken for a lost connection; on
    # a sound one the runner makes it a ClientSideError first (tests/integration/test_transient.py).
    assert is_transient(psycopg.OperationalError("the connection is closed"))
    assert is_transient(PoolTimeout("couldn't get a connection after 30 sec"))
    assert is_transient(DeadConnection("no answer within the query deadline"))


def test_errors_outside_the_database_count_toward_max_attempts() -> None:
    assert not is_transient(ValueError("a bug in the handler"))
    assert not is_transient(psycopg.InterfaceError("the handler misused the connection"))
    assert not is_transient(psycopg.NotSupportedError("COPY in pipeline mode"))
    assert not is_transient(TimeoutError())  # handler_timeout's own, not the database's


def test_classification_is_by_sqlstate_not_by_psycopg_class() -> None:
    # Both are OperationalError in psycopg; only one is the server going away.
    assert isinstance(sqlstate_error("54000"), psycopg.OperationalError)
    assert isinstance(sqlstate_error("57P01"), psycopg.OperationalError)
    assert not is_transient(sqlstate_error("54000"))
    assert is_transient(sqlstate_error("57P01"))


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
