"""The control socket's protocol and limits, against a real daemon process and a real socket."""

from __future__ import annotations

import json
import os
import socket
import stat
import threading
import time
from pathlib import Path

from tests.support.harness import DaemonProcess, TestDatabase, run_cli, wait_until
from tests.support.ops_support import RawClient, ask, credit, socket_of, start

LEDGER = "tests.support.projections:ledger_only"


def request(command: str, **args: object) -> bytes:
    return json.dumps({"command": command, "args": args}).encode() + b"\n"


def test_many_requests_per_connection_and_many_clients(db: TestDatabase, state_dir: Path) -> None:
    with start(db, LEDGER, state_dir) as daemon:
        path = socket_of(state_dir)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
        clients = [RawClient(path) for _ in range(5)]
        # Pipelined: three requests in one write, three replies in order.
        first = clients[0]
        assert first.send(request("status") + request("health") + request("status", names=[]))
        replies = [first.reply() for _ in range(3)]
        assert all(r is not None and r["ok"] for r in replies)
        assert "projections" in replies[0]["result"] and "status" in replies[1]["result"]
        # Interleaved over several connections, from several threads.
        errors: list[BaseException] = []

        def talk(client: RawClient) -> None:
            try:
                for _ in range(20):
                    assert client.send(request("status"))
                    reply = client.reply()
                    assert reply is not None and reply["ok"]
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=talk, args=(c,)) for c in clients]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert not errors, errors
        for client in clients:
            client.close()
        # State-changing commands are logged with the caller's uid and pid.
        ask(state_dir, "pause", name="ledger")
        logged = [e for e in daemon.log_events() if e.get("event") == "control.command"]
        assert logged[-1]["command"] == "pause" and logged[-1]["uid"] == os.getuid()
        assert logged[-1]["pid"] > 0


def test_limits_size_idle_and_client_cap(db: TestDatabase, state_dir: Path) -> None:
    env = {"PROJECTORD_CONTROL_IDLE_TIMEOUT": "2", "PROJECTORD_CONTROL_MAX_CLIENTS": "3"}
    with start(db, LEDGER, state_dir, env):
        path = socket_of(state_dir)
        # Over 64 KiB: an error reply, then the daemon hangs up.
        big = RawClient(path)
        big.send(b'{"command": "status", "args": {"x": "' + b"a" * 70_000 + b'"}}\n')
        reply = big.reply()
        assert reply is not None and reply["error"]["code"] == "request_too_large"
        assert big.reply() is None
        big.close()
        # A request of just under 64 KiB is fine (and refused for its argument, not its size).
        near = RawClient(path)
        near.send(b'{"command": "status", "args": {"x": "' + b"a" * 65_000 + b'"}}\n')
        reply = near.reply()
        assert reply is not None and reply["error"]["code"] == "invalid_arguments"
        near.close()
        # A half line, then silence: disconnected after the idle timeout.
        silent = RawClient(path)
        silent.send(b'{"command": "sta')
        began = time.monotonic()
        reply = silent.reply()
        assert reply is not None and reply["error"]["code"] == "idle_timeout"
        assert silent.reply() is None
        assert 1.8 < time.monotonic() - began < 6
        silent.close()
        # Three connected clients fill the cap: a fourth is turned away at once, others carry on.
        held = [RawClient(path) for _ in range(3)]
        assert all(ask_raw(client) for client in held)
        extra = RawClient(path)
        reply = extra.reply()
        assert reply is not None and reply["error"]["code"] == "too_many_clients"
        assert extra.reply() is None
        extra.close()
        assert ask_raw(held[1]) and ask_raw(held[2])
        held[0].close()
        wait_until(lambda: ask_after_connect(path), timeout=5)
        for client in held[1:]:
            client.close()


def ask_raw(client: RawClient) -> bool:
    client.send(request("status"))
    reply = client.reply()
    return reply is not None and reply["ok"]


def ask_after_connect(path: Path) -> bool:
    client = RawClient(path)
    try:
        return ask_raw(client)
    finally:
        client.close()


def test_a_stale_socket_is_replaced(db: TestDatabase, state_dir: Path) -> None:
    path = socket_of(state_dir)
    left_behind = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    left_behind.bind(str(path))
    left_behind.close()  # the file stays, nothing listens: what a crashed daemon leaves
    assert path.exists()
    with start(db, LEDGER, state_dir) as daemon:
        assert daemon.has_logged("control.stale_socket_replaced")
        assert ask(state_dir, "status")["projections"][0]["name"] == "ledger"
        assert daemon.stop() == 0
    assert not path.exists(), "the daemon left its socket behind after a clean stop"


def test_a_live_socket_is_not_stolen(db: TestDatabase, state_dir: Path) -> None:
    with start(db, LEDGER, state_dir) as first:
        second = DaemonProcess(db.url, LEDGER, state_dir)
        assert second.process.wait(30) == 1
        second.stop()
        text = second.log_path.read_text()
        assert "another daemon is answering on" in text
        assert not second.has_logged("daemon.started")
        # The first one still owns the socket and still works.
        credit(db)
        wait_until(
            lambda: ask(state_dir, "status")["projections"][0]["applied_total"] == 1, timeout=10
        )
        assert first.stop() == 0


def test_a_file_in_the_way_is_not_removed(db: TestDatabase, state_dir: Path) -> None:
    path = socket_of(state_dir)
    path.write_text("not a socket")
    db.init(LEDGER)
    result = run_cli(
        "run",
        "--database-url",
        db.url,
        "--projections",
        LEDGER,
        "--state-dir",
        str(state_dir),
        "--log-format",
        "json",
    )
    assert result.returncode == 1
    assert "exists and is not a socket" in result.stderr.splitlines()[-1]
    assert path.read_text() == "not a socket"
