"""Helpers for the operations tests: talk to the daemon's control socket, raw or politely."""

from __future__ import annotations

import json
import socket
import uuid
from pathlib import Path
from typing import Any

import psycopg

from projectord.control.client import ControlClient, ControlError
from projectord.control.socket_path import reachable
from tests.support.harness import TENANT, DaemonProcess, TestDatabase, run_cli

LEDGER_AND_PICKY = "tests.support.ops_projections:ledger_and_picky"


def socket_of(state_dir: Path) -> Path:
    """Where the daemon puts its control socket by default."""
    return state_dir / "control.sock"


def ask(state_dir: Path, command: str, **args: Any) -> Any:
    """One request over the real socket; the result, or `ControlError`."""
    with ControlClient(socket_of(state_dir), timeout=30) as client:
        return client.request(command, **args)


def ask_error(state_dir: Path, command: str, **args: Any) -> ControlError:
    try:
        ask(state_dir, command, **args)
    except ControlError as exc:
        return exc
    raise AssertionError(f"{command} {args} succeeded")


def projection(state_dir: Path, name: str) -> dict[str, Any]:
    result = ask(state_dir, "status", names=[name])
    return result["projections"][0]


def cli(state_dir: Path, *args: str, timeout: float = 60) -> Any:
    """`projectord ARGS` against the daemon of `state_dir`; the CompletedProcess."""
    return run_cli(*args, "--state-dir", str(state_dir), timeout=timeout)


def cli_json(state_dir: Path, *args: str) -> dict[str, Any]:
    result = cli(state_dir, *args, "--json")
    assert result.returncode in (0, 1, 2), result.stderr  # health: ok, degraded, failing
    return json.loads(result.stdout)


class RawClient:
    """A client that sends whatever bytes it is given and reads reply lines."""

    def __init__(self, path: Path, timeout: float = 10) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        with reachable(path) as address:
            self.sock.connect(address)
        self.buffer = b""

    def send(self, data: bytes) -> bool:
        """False once the daemon has closed the connection."""
        try:
            self.sock.sendall(data)
            return True
        except (BrokenPipeError, ConnectionResetError):
            return False

    def reply(self) -> dict[str, Any] | None:
        """The next reply line, or None when the daemon closed the connection."""
        while b"\n" not in self.buffer:
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                return None
            if not chunk:
                return None
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return json.loads(line)

    def close(self) -> None:
        self.sock.close()


def credit(db: TestDatabase, account: int = 1, amount: int = 1, **extra: Any) -> None:
    append(db, "Credited", {"account": account, "amount": amount, **extra})


def append(db: TestDatabase, type_: str, payload: dict[str, Any], count: int = 1) -> None:
    with db.connect() as conn:
        conn.execute(
            "INSERT INTO projectord.events (tenant_id, aggregate_id, version, type, payload)"
            " SELECT %s, gen_random_uuid(), 1, %s, %s FROM generate_series(1, %s)",
            (TENANT, type_, psycopg.types.json.Jsonb(payload), count),
        )


def ledger_rows(db: TestDatabase) -> list[tuple[Any, ...]]:
    return db.rows("SELECT account, total, events FROM ledger ORDER BY account")


def start(
    db: TestDatabase, specs: str, state_dir: Path, env: dict[str, str] | None = None
) -> DaemonProcess:
    db.init(specs)
    return DaemonProcess(db.url, specs, state_dir, extra_env=env)


def unique() -> str:
    return uuid.uuid4().hex[:8]
