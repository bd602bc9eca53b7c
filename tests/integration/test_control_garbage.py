"""Garbage in: thousands of malformed requests over the real socket. Each gets an error reply or a
disconnect; afterwards the daemon still answers and still applies events."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.harness import TestDatabase, wait_until
from tests.support.ops_support import RawClient, ask, credit, socket_of, start

LEDGER = "tests.support.projections:ledger_only"
ERROR_CODES = {
    "bad_request",
    "unknown_command",
    "invalid_arguments",
    "unknown_projection",
    "request_too_large",
    "not_stuck",
}
MIB = 1024 * 1024


@dataclass(frozen=True)
class Garbage:
    data: bytes
    kind: str  # "line": expects one error reply; "huge": error or disconnect; "half": then EOF


def line(value: object) -> Garbage:
    return Garbage(json.dumps(value).encode() + b"\n", "line")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
not_objects = json_values.filter(lambda v: not isinstance(v, dict)).map(line)
raw_bytes = st.binary(max_size=300).map(lambda b: Garbage(b.replace(b"\n", b"") + b"\n", "raw"))
wrong_command_type = json_values.filter(lambda v: not isinstance(v, str)).map(
    lambda v: line({"command": v, "args": {}})
)
unknown_commands = (
    st.text(max_size=30)
    .filter(lambda t: t not in {"status", "health", "pause", "resume", "rebuild", "skip"})
    .map(lambda t: line({"command": t, "args": {}}))
)
known = st.sampled_from(["status", "health", "pause", "resume", "rebuild", "skip"])
wrong_args = st.tuples(
    known, json_values.filter(lambda v: not isinstance(v, dict) and v is not None)
)
bad_names = st.one_of(
    json_values.filter(lambda v: not isinstance(v, str)),
    st.text(max_size=40).filter(lambda t: t != "ledger"),
    st.just("ledger'; DROP TABLE ledger; --"),
)
wrong_arg_values = st.tuples(st.sampled_from(["pause", "resume", "rebuild", "skip"]), bad_names)
extra_keys = st.dictionaries(
    st.text(min_size=1, max_size=8).filter(lambda k: k not in ("command", "args")),
    json_values,
    min_size=1,
    max_size=3,
)
garbage = st.one_of(
    not_objects,
    raw_bytes,
    wrong_command_type,
    unknown_commands,
    wrong_args.map(lambda ca: line({"command": ca[0], "args": ca[1]})),
    wrong_arg_values.map(lambda cn: line({"command": cn[0], "args": {"name": cn[1]}})),
    extra_keys.map(lambda extra: line({"command": "status", **extra})),
    st.just(Garbage(b'{"command": "status", "args": {"names": "ledger"}}\n', "line")),
    st.just(Garbage(b'{"command": "pause", "args": {"name": "\xff\xfe"}}\n', "line")),
    st.just(Garbage(b"[" * 3000 + b"]" * 3000 + b"\n", "line")),
    st.just(Garbage(b"x" * MIB + b"\n", "huge")),
    st.binary(min_size=1, max_size=200).map(lambda b: Garbage(b.replace(b"\n", b""), "half")),
)


def check_error(reply: dict | None) -> None:
    assert reply is not None, "no reply to a complete line"
    assert reply["ok"] is False, reply
    assert reply["error"]["code"] in ERROR_CODES, reply
    assert isinstance(reply["error"]["message"], str) and reply["error"]["message"]


def test_garbage_gets_errors_and_the_daemon_carries_on(db: TestDatabase, state_dir: Path) -> None:
    env = {"PROJECTORD_CONTROL_IDLE_TIMEOUT": "3"}
    with start(db, LEDGER, state_dir, env) as daemon:
        path = socket_of(state_dir)
        # Half lines, then silence, held open through the whole run.
        silent = [RawClient(path, timeout=30) for _ in range(4)]
        for client in silent:
            client.send(b'{"command": "status", "ar')
        sent = 0

        @settings(
            max_examples=400,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(st.lists(garbage, min_size=1, max_size=10))
        def send_garbage(items: list[Garbage]) -> None:
            nonlocal sent
            client = RawClient(path)
            try:
                for item in items:
                    sent += 1
                    if item.kind == "half":
                        client.send(item.data)
                        client.close()  # EOF in the middle of a line
                        client = RawClient(path)
                        continue
                    if not client.send(item.data):
                        assert item.kind == "huge", "disconnected for a small request"
                        client.close()
                        client = RawClient(path)
                        continue
                    reply = client.reply()
                    if item.kind == "huge":
                        assert reply is None or reply["error"]["code"] == "request_too_large"
                        client.close()
                        client = RawClient(path)
                    elif item.kind == "raw" and reply is not None and reply["ok"]:
                        continue  # random bytes that happen to be a valid request
                    else:
                        check_error(reply)
                # The same connection still serves a good request after its garbage.
                assert client.send(b'{"command": "status"}\n')
                reply = client.reply()
                assert reply is not None and reply["ok"]
            finally:
                client.close()

        send_garbage()
        # A plain flood on one connection: a thousand lines of nonsense, a thousand errors.
        flood = RawClient(path)
        flood.send(b"nonsense\n" * 1000)
        for _ in range(1000):
            check_error(flood.reply())
        flood.close()
        sent += 1000
        assert sent >= 2000

        # The silent clients were cut off; the daemon answers and applies events.
        for client in silent:
            reply = client.reply()
            assert reply is None or reply["error"]["code"] == "idle_timeout"
            assert client.reply() is None
            client.close()
        credit(db, amount=7)
        wait_until(
            lambda: ask(state_dir, "status")["projections"][0]["applied_total"] == 1, timeout=10
        )
        assert db.scalar("SELECT total FROM ledger WHERE account = 1") == 7
        assert db.scalar("SELECT count(*) FROM ledger") == 1, "garbage reached the read model"
        assert daemon.process.poll() is None
        assert daemon.stop() == 0
