"""Decoding a stored payload (`projectord.upcasting.decode_payload`), which every event a handler
reads goes through: its shortcut for version 1 of a type no upcaster knows must keep every
upcasting guarantee (docs/upcasting.md)."""

from __future__ import annotations

from typing import Any

import pytest

from projectord.upcasting import (
    SchemaVersionTooNew,
    Upcasters,
    UpcastingError,
    decode_payload,
    installed,
    installing,
)


def _v1_to_v2(payload: dict[str, Any]) -> dict[str, Any]:
    payload["cents"] = payload.pop("amount") * 100
    return payload


def test_version_1_of_a_type_no_upcaster_knows_is_parsed_as_stored() -> None:
    with installing(Upcasters()):
        assert decode_payload("Deposited", 1, '{"amount": 5}') == {"amount": 5}
        assert decode_payload("Deposited", 1, b'{"amount": 5}') == {"amount": 5}


def test_version_1_of_a_type_with_upcasters_is_upcast() -> None:
    upcasters = Upcasters()
    upcasters.add("Deposited", 1, _v1_to_v2)
    with installing(upcasters):
        assert decode_payload("Deposited", 1, '{"amount": 5}') == {"cents": 500}
        assert decode_payload("Deposited", 2, '{"cents": 7}') == {"cents": 7}
        assert decode_payload("Withdrawn", 1, '{"amount": 5}') == {"amount": 5}


def test_a_version_newer_than_the_code_is_refused_for_a_type_without_upcasters() -> None:
    with installing(Upcasters()):
        with pytest.raises(SchemaVersionTooNew):
            decode_payload("Deposited", 2, '{"amount": 5}')


def test_a_step_added_to_the_installed_registry_applies_to_the_next_decode() -> None:
    with installing(Upcasters()):
        assert decode_payload("Deposited", 1, '{"amount": 5}') == {"amount": 5}
        installed().add("Deposited", 1, _v1_to_v2)
        assert decode_payload("Deposited", 1, '{"amount": 5}') == {"cents": 500}


def test_version_1_of_a_type_whose_chain_has_a_gap_is_refused() -> None:
    gap = Upcasters()
    gap.add("Deposited", 2, _v1_to_v2)  # no step from version 1
    with installing(Upcasters()):
        installed().update(gap)  # `install` would refuse it; a registry changed later is not
        with pytest.raises(UpcastingError):
            decode_payload("Deposited", 1, '{"amount": 5}')
