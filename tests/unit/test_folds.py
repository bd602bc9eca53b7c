"""Folds without a database: the sample `Balances` projection's batch fold, and the write side's
aggregate machinery (replay = fold of its events, handle = decide, routing of command types)."""

from __future__ import annotations

import uuid
from collections import defaultdict
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from projectord.commands.aggregate import (
    Aggregate,
    AggregateError,
    Change,
    CommandPayload,
    CommandRegistry,
    CommandRejected,
    InvalidPayload,
    handles,
    load_aggregates,
)
from projectord.commands.dispatch import event_positions
from projectord.commands.store import Command, json_object
from projectord.event_store import Event
from projectord.samples import (
    DEPOSITED,
    WITHDRAWN,
    Account,
    Balances,
    Deposit,
    Withdraw,
    fold_balances,
)

TENANT = uuid.UUID(int=1)
ACCOUNTS = [uuid.UUID(int=100 + i) for i in range(3)]


def event(
    position: int,
    type_: str,
    payload: dict[str, Any] | str,
    *,
    aggregate: uuid.UUID = ACCOUNTS[0],
    version: int = 1,
    tenant: uuid.UUID = TENANT,
    aggregate_type: str = "account",
) -> Event:
    return Event(
        position, uuid.uuid4(), tenant, aggregate, aggregate_type, version, type_, payload, "{}", 0
    )


movements = st.lists(
    st.tuples(
        st.sampled_from(ACCOUNTS),
        st.sampled_from([DEPOSITED, WITHDRAWN]),
        st.integers(min_value=1, max_value=10**12),
    ),
    max_size=40,
)


@settings(max_examples=50)
@given(movements)
def test_balances_fold_is_one_row_per_account_with_its_net_change(
    batch: list[tuple[uuid.UUID, str, int]],
) -> None:
    events = [
        event(i, type_, f'{{"amount": {amount}}}', aggregate=account)
        for i, (account, type_, amount) in enumerate(batch, 1)
    ]
    expected: dict[uuid.UUID, list[int]] = defaultdict(lambda: [0, 0])
    for account, type_, amount in batch:
        expected[account][0] += amount if type_ == DEPOSITED else -amount
        expected[account][1] += 1
    rows = fold_balances(events)
    assert len(rows) == len({row["id"] for row in rows})  # upsert_many needs unique keys
    assert {row["id"]: [row["balance"], row["events"]] for row in rows} == expected
    assert all(row["tenant_id"] == TENANT for row in rows)


@settings(max_examples=50)
@given(movements, st.integers(min_value=0, max_value=60))
def test_folding_a_batch_in_two_parts_adds_up_to_folding_it_whole(
    batch: list[tuple[uuid.UUID, str, int]], cut: int
) -> None:
    """What makes `add=["balance", "events"]` in the upsert right: the fold is a sum."""
    events = [
        event(i, type_, {"amount": amount}, aggregate=account)
        for i, (account, type_, amount) in enumerate(batch, 1)
    ]
    totals: dict[uuid.UUID, list[int]] = defaultdict(lambda: [0, 0])
    for part in (events[:cut], events[cut:]):
        for row in fold_balances(part):
            totals[row["id"]][0] += row["balance"]
            totals[row["id"]][1] += row["events"]
    assert totals == {row["id"]: [row["balance"], row["events"]] for row in fold_balances(events)}


def test_balances_declares_what_it_folds() -> None:
    assert set(Balances.event_types) == {DEPOSITED, WITHDRAWN}
    assert fold_balances([]) == []


# -- the Account aggregate: fold its events, decide on a command --------------------------------


def account(*events: Event) -> Account:
    aggregate = Account(ACCOUNTS[0], TENANT)
    aggregate.replay(events)
    return aggregate


def test_replay_folds_the_balance_and_takes_the_last_version() -> None:
    state = account(
        event(1, DEPOSITED, {"amount": 50}, version=1),
        event(2, WITHDRAWN, {"amount": 20}, version=2),
        event(3, "Noted", {}, version=3),
    )
    assert (state.balance, state.version) == (30, 3)


def test_handle_decides_without_changing_state() -> None:
    state = account(event(1, DEPOSITED, {"amount": 50}))
    changes = state.handle(Withdraw(account_id=ACCOUNTS[0], amount=50))
    assert changes == [Change(WITHDRAWN, {"amount": 50})]
    assert state.balance == 50  # only an appended, replayed event changes it


def test_a_business_rule_rejects_the_command() -> None:
    state = account(event(1, DEPOSITED, {"amount": 10}))
    with pytest.raises(CommandRejected, match="insufficient funds"):
        state.handle(Withdraw(account_id=ACCOUNTS[0], amount=11))


@pytest.mark.parametrize(
    ("other", "message"),
    [
        ({"tenant": uuid.UUID(int=2)}, "belongs to another tenant"),
        ({"aggregate_type": "order"}, "is a 'order', not a 'account'"),
    ],
)
def test_replay_refuses_another_tenants_or_another_kinds_events(
    other: dict[str, Any], message: str
) -> None:
    with pytest.raises(CommandRejected, match=message):
        account(event(1, DEPOSITED, {"amount": 1}, **other))


def test_events_appended_by_plain_sql_carry_no_aggregate_type_and_are_accepted() -> None:
    assert account(event(1, DEPOSITED, {"amount": 7}, aggregate_type="")).balance == 7


# -- routing and payload validation -------------------------------------------------------------


def test_registry_routes_each_command_type_to_its_handler() -> None:
    registry = CommandRegistry([Account])
    assert registry.command_types == ["Deposit", "Withdraw"]
    handler = registry.route("Deposit")
    assert handler is not None
    assert (handler.aggregate, handler.method) == (Account, "deposit")
    assert registry.route("Transfer") is None


@pytest.mark.parametrize(
    ("payload", "problem"),
    [
        ({"account_id": str(ACCOUNTS[0]), "amount": 0}, "amount: Input should be greater than 0"),
        ({"account_id": str(ACCOUNTS[0]), "amount": "5"}, "amount: Input should be a valid int"),
        ({"account_id": "not-a-uuid", "amount": 5}, "account_id: "),
        ({"amount": 5}, "account_id: Field required"),
        ({"account_id": str(ACCOUNTS[0]), "amount": 5, "memo": "x"}, "memo: Extra inputs"),
    ],
)
def test_invalid_payloads_are_one_line_naming_the_field(
    payload: dict[str, Any], problem: str
) -> None:
    handler = CommandRegistry([Account]).route("Deposit")
    assert handler is not None
    with pytest.raises(InvalidPayload) as caught:
        handler.parse(payload)
    assert str(caught.value).startswith("invalid payload for Deposit: ")
    assert problem in str(caught.value)
    assert "\n" not in str(caught.value)


def test_a_valid_payload_names_its_target() -> None:
    handler = CommandRegistry([Account]).route("Deposit")
    assert handler is not None
    command = handler.parse({"account_id": str(ACCOUNTS[1]), "amount": 5})
    assert isinstance(command, Deposit) and command.target_id == ACCOUNTS[1]


class Note(CommandPayload):
    aggregate_id: uuid.UUID


def test_an_aggregate_without_type_or_handlers_is_refused() -> None:
    class Untyped(Aggregate):
        @handles(Note)
        def note(self, command: Note) -> list[Change]:
            return []

    class Idle(Aggregate):
        aggregate_type = "idle"

    with pytest.raises(AggregateError, match="no `aggregate_type`"):
        CommandRegistry([Untyped])
    with pytest.raises(AggregateError, match="handles no command"):
        CommandRegistry([Idle])


def test_one_command_type_has_one_handler() -> None:
    class Other(Aggregate):
        aggregate_type = "other"

        @handles(Deposit)
        def deposit(self, command: Deposit) -> list[Change]:
            return []

    with pytest.raises(AggregateError, match="handled by both Account and Other"):
        CommandRegistry([Account, Other])


def test_a_payload_without_a_uuid_target_field_is_refused_at_class_creation() -> None:
    class Untargeted(CommandPayload):
        amount: int

    with pytest.raises(AggregateError, match="needs a UUID field 'aggregate_id'"):

        class Broken(Aggregate):
            aggregate_type = "broken"

            @handles(Untargeted)
            def go(self, command: Untargeted) -> list[Change]:
                return []


def test_load_aggregates_resolves_specs_and_refuses_non_aggregates() -> None:
    assert load_aggregates(["projectord.samples:demo_aggregates"]).command_types == [
        "Deposit",
        "Withdraw",
    ]
    with pytest.raises(AggregateError, match="not an Aggregate class"):
        load_aggregates(["projectord.samples:Balances"])


# -- stored commands and where their events land ----------------------------------------------


def test_a_command_compares_equal_to_its_stored_copy() -> None:
    first = Command(TENANT, "Deposit", {"account_id": ACCOUNTS[0], "amount": 5})
    stored = Command(TENANT, "Deposit", {"account_id": str(ACCOUNTS[0]), "amount": 5}, id=first.id)
    assert first.payload == {"account_id": str(ACCOUNTS[0]), "amount": 5}
    assert first.same_request_as(stored)
    assert not first.same_request_as(Command(TENANT, "Deposit", {"amount": 6}))


def test_a_command_payload_that_json_cannot_hold_is_refused() -> None:
    with pytest.raises(TypeError, match="payload is not JSON"):
        json_object({"x": object()}, "payload")
    with pytest.raises(TypeError, match="must be a JSON object"):
        json_object([1], "payload")  # type: ignore[arg-type]


def test_event_positions_target_each_projections_last_event_of_the_command() -> None:
    command = Command(TENANT, "Deposit")
    command.result = {
        "transaction_id": "77",
        "events": [
            {"type": DEPOSITED, "global_position": 10},
            {"type": "Noted", "global_position": 11},
            {"type": WITHDRAWN, "global_position": 12},
        ],
    }
    feed = type("Feed", (Balances,), {"name": "feed", "event_types": ("Noted",)})()
    other = type("Other", (Balances,), {"name": "other", "event_types": ("Closed",)})()
    assert event_positions(command, [Balances(), feed, other]) == {
        "balances": (77, 12),
        "feed": (77, 11),
    }
    assert event_positions(Command(TENANT, "Deposit"), [Balances()]) == {}
