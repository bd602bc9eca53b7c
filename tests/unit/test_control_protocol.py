"""The control protocol without a socket: parsing a request line, validating its arguments
against the command's declaration, the reply to every kind of bad request, and the operations
table's own checks (configured projection names, a stopping daemon, a projection run elsewhere).

The transport (size limit, idle timeout, client cap, SO_PEERCRED) is covered over a real socket
by tests/integration/test_control_socket.py and test_control_garbage.py.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anyio
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from projectord.control.operations import Operations
from projectord.control.server import (
    Arg,
    ControlServer,
    Operation,
    Peer,
    RequestError,
    parse_request,
    validate_args,
)

PEER = Peer(pid=1, uid=1000, gid=1000)


def refused(call: Any, *args: Any) -> RequestError:
    with pytest.raises(RequestError) as caught:
        call(*args)
    return caught.value


# -- one request line ---------------------------------------------------------------------------


def test_a_well_formed_request() -> None:
    assert parse_request(b'{"command": "status", "args": {"names": ["a"]}}\n') == (
        "status",
        {"names": ["a"]},
    )
    assert parse_request(b'{"command": "health"}') == ("health", None)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b"", "not a JSON object on one line"),
        (b"status\n", "not a JSON object on one line"),
        (b'{"command": "status"', "not a JSON object on one line"),
        (b"\xff\xfe\n", "not a JSON object on one line"),
        (b'["status"]\n', "a request is a JSON object"),
        (b'"status"\n', "a request is a JSON object"),
        (b"null\n", "a request is a JSON object"),
        (b'{"command": "status", "sudo": true}\n', "only the keys 'command' and 'args'"),
        (b'{"args": {}}\n', "'command' must be a string"),
        (b'{"command": 7}\n', "'command' must be a string"),
    ],
)
def test_garbage_lines_are_bad_requests(line: bytes, message: str) -> None:
    error = refused(parse_request, line)
    assert error.code == "bad_request"
    assert message in error.message


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=200))
def test_no_bytes_make_the_parser_raise_anything_but_a_request_error(line: bytes) -> None:
    try:
        name, _ = parse_request(line)
    except RequestError as exc:
        assert exc.code == "bad_request"
    else:
        assert isinstance(name, str)


# -- arguments ------------------------------------------------------------------------------------


def _no_admin(value: str) -> None:
    if value == "admin":
        raise RequestError("unknown_projection", "no projection named 'admin'")


async def _echo(args: dict[str, Any]) -> dict[str, Any]:
    return args


COMMAND = Operation(
    _echo,
    {
        "name": Arg(str, required=True, check=_no_admin),
        "names": Arg(list, items=str),
        "apply": Arg(bool),
        "limit": Arg(int),
    },
)


def test_valid_arguments_pass_unchanged() -> None:
    args = {"name": "p", "names": ["a", "b"], "apply": True, "limit": 3}
    assert validate_args("cmd", COMMAND, args) == args
    assert validate_args("health", Operation(_echo, {}), None) == {}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "cmd: args must be a JSON object"),
        ("name=p", "cmd: args must be a JSON object"),
        ({}, "cmd: argument 'name' is required"),
        ({"name": 1}, "cmd: argument 'name' must be a string"),
        ({"name": "p", "apply": 1}, "cmd: argument 'apply' must be a boolean"),
        ({"name": "p", "limit": True}, "cmd: argument 'limit' must be an integer"),
        ({"name": "p", "limit": 1.5}, "cmd: argument 'limit' must be an integer"),
        ({"name": "p", "names": "a"}, "cmd: argument 'names' must be a list of strings"),
        ({"name": "p", "names": ["a", 2]}, "cmd: argument 'names' must be a list of strings"),
        (
            {"name": "p", "force": True},
            "cmd: unknown argument(s) 'force' (allowed: apply, limit, name, names)",
        ),
    ],
)
def test_bad_arguments_are_refused_before_the_handler_runs(args: Any, message: str) -> None:
    error = refused(validate_args, "cmd", COMMAND, args)
    assert (error.code, error.message) == ("invalid_arguments", message)


def test_a_well_typed_value_can_still_be_refused_by_the_arguments_check() -> None:
    assert refused(validate_args, "cmd", COMMAND, {"name": "admin"}).code == "unknown_projection"


def test_unknown_argument_names_are_bounded_in_the_reply() -> None:
    error = refused(validate_args, "cmd", COMMAND, {"x" * 10_000: 1, "name": "p"})
    assert len(error.message) < 300


# -- a request line through the server (no socket) ----------------------------------------------


async def _fails(args: dict[str, Any]) -> None:
    raise ZeroDivisionError("division by zero")


def server() -> ControlServer:
    commands = {"echo": COMMAND, "fails": Operation(_fails, {})}
    return ControlServer(Path("unused.sock"), commands, idle_timeout=1, max_clients=1)


def execute(line: bytes) -> dict[str, Any]:
    reply = anyio.run(server().execute, line, PEER)
    assert reply.endswith(b"\n") and reply.count(b"\n") == 1  # one reply line, always
    result: dict[str, Any] = orjson.loads(reply)
    return result


def test_a_request_is_answered_with_its_result() -> None:
    assert execute(b'{"command": "echo", "args": {"name": "p"}}\n') == {
        "ok": True,
        "result": {"name": "p"},
    }


@pytest.mark.parametrize(
    ("line", "code"),
    [
        (b"garbage\n", "bad_request"),
        (b'{"command": "drop_everything"}\n', "unknown_command"),
        (b'{"command": "echo", "args": {"name": 5}}\n', "invalid_arguments"),
        (b'{"command": "echo", "args": {"name": "admin"}}\n', "unknown_projection"),
        (b'{"command": "fails"}\n', "internal_error"),
    ],
)
def test_every_refusal_is_an_error_reply(line: bytes, code: str) -> None:
    reply = execute(line)
    assert reply["ok"] is False
    assert reply["error"]["code"] == code


def test_an_unknown_command_reply_lists_the_known_ones() -> None:
    assert execute(b'{"command": "nope"}')["error"]["message"] == (
        "unknown command (known: echo, fails)"
    )


def test_a_failing_handler_is_reported_not_raised() -> None:
    assert execute(b'{"command": "fails"}')["error"]["message"] == (
        "ZeroDivisionError: division by zero"
    )


# -- the operations table's own checks ------------------------------------------------------------


def operations(*, stopping: bool = False, local: set[str] | None = None) -> Operations:
    """The operations over runners named a and b. Only the names and the reporter's flags are
    used by the checks below; nothing here reaches a database."""
    runners = [SimpleNamespace(name="a"), SimpleNamespace(name="b")]
    reporter = SimpleNamespace(stopping=stopping, local=local, instance="host-1")
    return Operations(runners, reporter, health=None)  # type: ignore[arg-type]


def test_operations_declare_their_arguments() -> None:
    commands = operations().table()
    assert set(commands) == {"status", "health", "pause", "resume", "rebuild", "skip"}
    assert [name for name, c in sorted(commands.items()) if c.changes_state] == [
        "pause",
        "rebuild",
        "resume",
        "skip",
    ]
    rebuild = commands["rebuild"]
    assert validate_args("rebuild", rebuild, {"name": "a", "allow_undeclared": True})
    assert refused(validate_args, "rebuild", rebuild, {}).code == "invalid_arguments"


@pytest.mark.parametrize("command", ["pause", "resume", "rebuild", "skip"])
def test_a_projection_that_is_not_configured_is_refused(command: str) -> None:
    spec = operations().table()[command]
    error = refused(validate_args, command, spec, {"name": "c"})
    assert error.code == "unknown_projection"
    assert error.message == "no projection named 'c' is configured (configured: a, b)"


def test_status_checks_every_name() -> None:
    status = operations().table()["status"]
    assert validate_args("status", status, {"names": ["a", "b"]}) == {"names": ["a", "b"]}
    assert refused(validate_args, "status", status, {"names": ["a", "zz"]}).code == (
        "unknown_projection"
    )


def test_a_stopping_daemon_refuses_changes() -> None:
    ops = operations(stopping=True)
    for call in (ops.pause, ops.rebuild, ops.skip):
        error = refused(anyio.run, call, {"name": "a"})
        assert error.code == "stopping"


def test_rebuild_and_skip_are_refused_where_the_projection_does_not_run() -> None:
    ops = operations(local={"b"})
    for call in (ops.rebuild, ops.skip):
        error = refused(anyio.run, call, {"name": "a"})
        assert error.code == "not_owner"
        assert "host-1" in error.message
