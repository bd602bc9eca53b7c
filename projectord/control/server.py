"""The control socket: operators and scripts talk to the running daemon here.

A Unix stream socket (mode 0660: the owner and the operators' group) speaking newline-delimited
JSON, any number of requests per connection, several clients at once. Request
`{"command": "status", "args": {}}`; reply `{"ok": true, "result": …}` or
`{"ok": false, "error": {"code": …, "message": …}}`. The wire key stays `command` (CONTRACT.md),
but what it names is an operation: in projectord a command is the write side's.

It is built to survive its clients: a request over 64 KiB gets an error and a disconnect, a client
that stays silent past the idle timeout is disconnected, clients beyond the cap are turned away at
once, and nothing a client sends can stop the daemon or reach SQL unchecked (arguments are
validated against each operation's declared `Arg`s before the operation runs). Every request is
logged with the caller's uid and pid from SO_PEERCRED.

A socket file left by a crashed daemon is replaced; one that a live daemon answers on is not.
"""

from __future__ import annotations

import os
import socket
import stat
import struct
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import orjson
from anyio.abc import SocketAttribute, SocketStream
from anyio.streams.buffered import BufferedByteReceiveStream

from projectord.control.socket_path import reachable
from projectord.logs import get_logger

log = get_logger("projectord.control.server")

MAX_REQUEST_BYTES = 64 * 1024
SOCKET_MODE = 0o660
_UCRED = struct.Struct("3i")  # struct ucred {pid_t pid; uid_t uid; gid_t gid;}


class ControlSocketError(Exception):
    """The control socket cannot be set up; phrased for an operator."""


class RequestError(Exception):
    """A request the daemon refuses; becomes `{"ok": false, "error": {code, message}}`."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Arg:
    """One argument an operation accepts. `check` may refuse a well-typed value (for example a
    projection name that is not configured) by raising `RequestError`."""

    kind: type
    required: bool = False
    items: type | None = None  # element type, for lists
    check: Callable[[Any], None] | None = None


Handler = Callable[[dict[str, Any]], Awaitable[Any]]


@dataclass(frozen=True)
class Operation:
    handler: Handler
    args: Mapping[str, Arg]
    changes_state: bool = False  # logged at info; read-only operations at debug (polled often)


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int


def validate_args(name: str, operation: Operation, args: Any) -> dict[str, Any]:
    """Check a request's arguments against the operation's declaration."""
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise RequestError("invalid_arguments", f"{name}: args must be a JSON object")
    unknown = sorted(set(args) - set(operation.args))
    if unknown:
        allowed = ", ".join(sorted(operation.args)) or "none"
        given = ", ".join(map(repr, unknown))[:200]
        raise RequestError(
            "invalid_arguments", f"{name}: unknown argument(s) {given} (allowed: {allowed})"
        )
    for key, arg in operation.args.items():
        if key not in args:
            if arg.required:
                raise RequestError("invalid_arguments", f"{name}: argument {key!r} is required")
            continue
        _check_type(name, key, args[key], arg)
        if arg.check is not None:
            arg.check(args[key])
    return args


def _check_type(name: str, key: str, value: Any, arg: Arg) -> None:
    # bool is an int in Python; JSON true must not pass as a number, nor 1 as a boolean.
    ok = isinstance(value, arg.kind) and (arg.kind is bool or not isinstance(value, bool))
    if ok and arg.items is not None:
        ok = all(isinstance(item, arg.items) for item in value)
    if not ok:
        expected = _JSON_NAMES.get(arg.kind, arg.kind.__name__)
        if arg.items is not None:
            noun = _JSON_NAMES.get(arg.items, arg.items.__name__).split(" ")[-1]
            expected += f" of {noun}s"  # "a list of strings", not "of a strings"
        raise RequestError("invalid_arguments", f"{name}: argument {key!r} must be {expected}")


_JSON_NAMES = {
    str: "a string",
    bool: "a boolean",
    int: "an integer",
    float: "a number",
    list: "a list",
    dict: "an object",
}


def parse_request(line: bytes) -> tuple[str, Any]:
    """The operation name and raw args of one request line, or `RequestError`."""
    try:
        request = orjson.loads(line)
    except orjson.JSONDecodeError:
        raise RequestError("bad_request", "not a JSON object on one line") from None
    if not isinstance(request, dict):
        raise RequestError("bad_request", 'a request is a JSON object: {"command": …, "args": {}}')
    extra = set(request) - {"command", "args"}
    if extra:
        raise RequestError("bad_request", "a request has only the keys 'command' and 'args'")
    name = request.get("command")
    if not isinstance(name, str):
        raise RequestError("bad_request", "'command' must be a string")
    return name, request.get("args")


def encode(reply: Mapping[str, Any]) -> bytes:
    return orjson.dumps(reply, default=str) + b"\n"


def error_reply(code: str, message: str) -> bytes:
    return encode({"ok": False, "error": {"code": code, "message": message}})


class ControlServer:
    def __init__(
        self,
        path: Path,
        operations: Mapping[str, Operation],
        *,
        idle_timeout: float,
        max_clients: int,
    ) -> None:
        self.path = path
        self.operations = operations
        self.idle_timeout = idle_timeout
        self.max_clients = max_clients
        self.clients = 0
        self._listener: Any = None
        self._inode: int | None = None

    async def bind(self) -> None:
        """Create the socket, replacing a stale one; refuse to take over a live one."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ControlSocketError(
                f"control_socket: cannot create {self.path.parent}: {exc}"
            ) from None
        await self._clear_stale()
        try:
            with reachable(self.path) as address:
                self._listener = await anyio.create_unix_listener(address, mode=SOCKET_MODE)
        except OSError as exc:
            raise ControlSocketError(
                f"control_socket: cannot listen on {self.path}: {exc}"
            ) from None
        self._inode = os.stat(self.path).st_ino
        log.info("control.listening", path=str(self.path))

    async def _clear_stale(self) -> None:
        try:
            mode = os.lstat(self.path).st_mode
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(mode):
            raise ControlSocketError(
                f"control_socket: {self.path} exists and is not a socket; not replacing it"
            )
        if await _answers(self.path):
            raise ControlSocketError(
                f"another daemon is answering on {self.path}; not taking over its control socket"
                " (stop it first, or give this one another control_socket)"
            )
        self.path.unlink(missing_ok=True)
        log.info("control.stale_socket_replaced", path=str(self.path))

    async def serve(self) -> None:
        assert self._listener is not None, "bind() first"
        try:
            await self._listener.serve(self._handle)
        finally:
            self.close()

    def close(self) -> None:
        """Remove the socket file, if it is still ours."""
        try:
            if self._inode is not None and os.stat(self.path).st_ino == self._inode:
                self.path.unlink()
        except OSError:
            pass
        self._inode = None

    async def _handle(self, stream: SocketStream) -> None:
        async with stream:
            peer = _peer(stream)
            if self.clients >= self.max_clients:
                log.warning(
                    "control.client_refused", uid=peer.uid, pid=peer.pid, clients=self.clients
                )
                with anyio.move_on_after(1):
                    await stream.send(
                        error_reply(
                            "too_many_clients",
                            f"{self.clients} clients are connected (the limit); try again later",
                        )
                    )
                return
            self.clients += 1
            try:
                await self._converse(stream, peer)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                pass  # the client went away
            except Exception as exc:  # one client's trouble must not end the server
                log.error("control.client_error", uid=peer.uid, error=str(exc))
            finally:
                self.clients -= 1

    async def _converse(self, stream: SocketStream, peer: Peer) -> None:
        reader = BufferedByteReceiveStream(stream)
        while True:
            line = None
            with anyio.move_on_after(self.idle_timeout):
                try:
                    line = await reader.receive_until(b"\n", MAX_REQUEST_BYTES)
                except anyio.DelimiterNotFound:
                    log.warning(
                        "control.request_rejected",
                        code="request_too_large",
                        uid=peer.uid,
                        pid=peer.pid,
                    )
                    await self._send(
                        stream,
                        error_reply(
                            "request_too_large",
                            f"a request may be at most {MAX_REQUEST_BYTES} bytes; disconnecting",
                        ),
                    )
                    return
                except (anyio.IncompleteRead, anyio.EndOfStream):
                    return
            if line is None:
                log.debug("control.client_idle", uid=peer.uid, pid=peer.pid)
                await self._send(
                    stream,
                    error_reply(
                        "idle_timeout",
                        f"no complete request for {self.idle_timeout:g}s; disconnecting",
                    ),
                )
                return
            await self._send(stream, await self.execute(line, peer))

    async def _send(self, stream: SocketStream, data: bytes) -> None:
        """Send a reply; a client that does not read it within the idle timeout is dropped."""
        with anyio.fail_after(self.idle_timeout):
            await stream.send(data)

    async def execute(self, line: bytes, peer: Peer) -> bytes:
        """Run one request line; always returns a reply line."""
        started = time.perf_counter()
        name = None
        try:
            name, raw_args = parse_request(line)
            operation = self.operations.get(name)
            if operation is None:
                known = ", ".join(sorted(self.operations))
                raise RequestError("unknown_command", f"unknown command (known: {known})")
            args = validate_args(name, operation, raw_args)
            result = await operation.handler(args)
        except RequestError as exc:
            log.warning(
                "control.request_rejected",
                code=exc.code,
                command=_printable(name),
                uid=peer.uid,
                pid=peer.pid,
                message=exc.message,
            )
            return error_reply(exc.code, exc.message)
        except Exception as exc:
            log.exception("control.command_failed", command=name, uid=peer.uid, pid=peer.pid)
            return error_reply("internal_error", f"{type(exc).__name__}: {exc}"[:500])
        level = log.info if operation.changes_state else log.debug
        level(
            "control.command",
            command=name,
            args=args,
            uid=peer.uid,
            pid=peer.pid,
            duration_ms=round((time.perf_counter() - started) * 1000, 2),
        )
        return encode({"ok": True, "result": result})


def _printable(name: str | None) -> str | None:
    """An operation name for the log: bounded, since it came from the client."""
    return None if name is None else name[:64]


def _peer(stream: SocketStream) -> Peer:
    try:
        sock = stream.extra(SocketAttribute.raw_socket)
        pid, uid, gid = _UCRED.unpack(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        )
        return Peer(pid, uid, gid)
    except (OSError, anyio.TypedAttributeLookupError):
        return Peer(-1, -1, -1)


async def _answers(path: Path) -> bool:
    """Whether something accepts connections on the socket at `path` (a live daemon)."""
    try:
        with anyio.fail_after(2), reachable(path) as address:
            stream = await anyio.connect_unix(address)
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except TimeoutError:
        return True  # its backlog is full: very much alive
    except OSError as exc:
        raise ControlSocketError(f"control_socket: cannot check {path}: {exc}") from None
    await stream.aclose()
    return True
