"""The command line's side of the control socket: one request, one reply, plain blocking I/O.

`NoDaemon` means nothing answered (no socket, connection refused, no reply in time): the CLI exits
3 so scripts can tell "the daemon is down" from "the daemon said no" (`ControlError`, exit 1).
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

from projectord.control.server import RequestError
from projectord.control.socket_access import permission_denied
from projectord.control.socket_path import reachable

DEFAULT_TIMEOUT = 30.0


class NoDaemon(Exception):
    """No daemon answers on the control socket."""


# The daemon's refusal, as it sent it: `code` and `message`.
ControlError = RequestError


class ControlClient:
    def __init__(self, path: Path, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.path = path
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._reader: Any = None

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            with reachable(self.path) as address:
                sock.connect(address)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            sock.close()
            raise NoDaemon(f"no daemon answers on {self.path} ({exc.strerror.lower()})") from None
        except PermissionError:
            sock.close()
            raise ControlError("permission_denied", permission_denied(self.path)) from None
        except OSError as exc:
            sock.close()
            raise NoDaemon(f"no daemon answers on {self.path} ({exc})") from None
        self._sock = sock
        self._reader = sock.makefile("rb")

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def request(self, operation: str, **args: Any) -> Any:
        """Ask for one operation; return its result or raise `ControlError` / `NoDaemon`."""
        if self._sock is None:
            self.connect()
        assert self._sock is not None
        line = json.dumps({"command": operation, "args": args}).encode() + b"\n"
        try:
            self._sock.sendall(line)
            reply_line = self._reader.readline()
        except TimeoutError:
            self.close()
            raise NoDaemon(
                f"the daemon on {self.path} did not answer within {self.timeout:g}s"
            ) from None
        except OSError as exc:
            self.close()
            raise NoDaemon(f"the daemon on {self.path} went away ({exc})") from None
        if not reply_line:
            self.close()
            raise NoDaemon(f"the daemon on {self.path} closed the connection")
        reply = json.loads(reply_line)
        if not reply.get("ok"):
            error = reply.get("error") or {}
            raise ControlError(error.get("code", "error"), error.get("message", "failed"))
        return reply.get("result")
