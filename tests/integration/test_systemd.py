"""systemd integration with a real daemon process: the test binds the notification socket itself
and reads what the daemon tells "systemd". Also: the unit file passes `systemd-analyze verify`."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from tests.support.harness import (
    ROOT,
    DaemonProcess,
    TestDatabase,
    as_daemon_role,
    wait_until,
)
from tests.support.ops_support import append, ask, credit, start


class NotifySocket:
    """A datagram socket standing in for systemd's; collects (monotonic time, message)."""

    def __init__(self, address: str, bind_to: str | bytes) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(bind_to)
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self._closed = False
        self._thread = threading.Thread(target=self._collect, daemon=True)
        self._thread.start()

    def _collect(self) -> None:
        while not self._closed:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            self.messages.append((time.monotonic(), data.decode()))

    def fields(self, key: str) -> list[tuple[float, str]]:
        """Every `key=value` received, with its arrival time."""
        found = []
        for at, message in list(self.messages):
            for item in message.split("\n"):
                name, _, value = item.partition("=")
                if name == key:
                    found.append((at, value))
        return found

    def close(self) -> None:
        self._closed = True
        self._thread.join(2)
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path: Path):  # type: ignore[no-untyped-def]
    path = tmp_path / "notify.sock"
    listener = NotifySocket(str(path), str(path))
    yield listener
    listener.close()


def test_ready_status_watchdog_and_stopping(
    db: TestDatabase, state_dir: Path, notify_socket: NotifySocket
) -> None:
    env = {"NOTIFY_SOCKET": notify_socket.address, "WATCHDOG_USEC": "300000"}
    daemon = start(db, "tests.support.projections:ledger_only", state_dir, env).wait_started()
    try:
        wait_until(lambda: notify_socket.fields("READY"), timeout=10)
        assert notify_socket.fields("READY")[0][1] == "1"
        statuses = [value for _, value in notify_socket.fields("STATUS")]
        assert "1 projections, 0 failed, max lag 0" in statuses
        # Pings every 150 ms while everything is alive.
        wait_until(lambda: len(notify_socket.fields("WATCHDOG")) >= 8, timeout=10)
        credit(db)
        wait_until(
            lambda: ask(state_dir, "status")["projections"][0]["applied_total"] == 1, timeout=10
        )
        assert not notify_socket.fields("STOPPING")
        stopped_at = time.monotonic()
        assert daemon.stop() == 0
        stopping = notify_socket.fields("STOPPING")
        assert stopping and stopping[0][1] == "1" and stopping[0][0] >= stopped_at
    finally:
        if daemon.process.poll() is None:
            daemon.kill()


def test_reload_follows_the_systemd_protocol(
    db: TestDatabase, state_dir: Path, notify_socket: NotifySocket
) -> None:
    """SIGHUP: one datagram with RELOADING=1 and MONOTONIC_USEC= (CLOCK_MONOTONIC, the same
    clock as this process's time.monotonic()), then READY=1; also when the new file is invalid."""
    config = state_dir / "projectord.toml"
    config.write_text('log_level = "info"\n')
    specs = "tests.support.projections:ledger_only"
    db.init(specs)
    env = {"NOTIFY_SOCKET": notify_socket.address}
    args = ["--config", str(config)]
    with DaemonProcess(db.url, specs, state_dir, extra_env=env, args=args) as daemon:
        wait_until(lambda: notify_socket.fields("READY"), timeout=10)
        for content, logged in (('log_level = "debug"\n', "config.reloaded"),
                                ("batch_size = -1\n", "config.reload_failed")):  # fmt: skip
            config.write_text(content)
            before = len(notify_socket.messages)
            sent_at = time.monotonic()
            daemon.process.send_signal(signal.SIGHUP)
            wait_until(
                lambda before=before: any(
                    "READY=1" in m for _, m in notify_socket.messages[before:]
                ),
                timeout=10,
            )
            messages = [m.split("\n") for _, m in notify_socket.messages[before:]]
            (reloading,) = [m for m in messages if "RELOADING=1" in m]
            usec = int(next(f for f in reloading if f.startswith("MONOTONIC_USEC="))[15:])
            assert sent_at * 1e6 <= usec <= time.monotonic() * 1e6
            assert messages.index(reloading) < max(
                i for i, m in enumerate(messages) if "READY=1" in m
            ), "READY=1 came before RELOADING=1"
            status = next(f for f in messages[-1] if f.startswith("STATUS="))
            expected = "reloaded" if logged == "config.reloaded" else "reload failed"
            assert expected in status, status
            assert daemon.has_logged(logged)
        assert daemon.stop() == 0


def test_log_priorities_under_journald(db: TestDatabase, state_dir: Path) -> None:
    """stderr is "the journal" (JOURNAL_STREAM names it): each line of the real daemon starts with
    its syslog priority, as journald expects, so `journalctl -p err` finds the errors."""
    config = state_dir / "projectord.toml"
    config.write_text('log_level = "debug"\n')
    specs = "tests.support.projections:ledger_only"
    db.init(specs)
    stderr_path = state_dir / "journal.log"
    with stderr_path.open("w") as stderr:
        info = os.fstat(stderr.fileno())
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "PROJECTORD_DATABASE_URL": as_daemon_role(db.url),
            "PROJECTORD_PROJECTIONS": specs,
            "PROJECTORD_STATE_DIR": str(state_dir),
            "JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino}",
        }
        process = subprocess.Popen(
            [sys.executable, "-m", "projectord", "run", "--config", str(config)],
            env=env, stdout=subprocess.DEVNULL, stderr=stderr, stdin=subprocess.DEVNULL,
        )  # fmt: skip

    def events() -> list[tuple[str, dict[str, object]]]:
        found = []
        for line in stderr_path.read_text().splitlines():
            prefix, _, rest = line.partition(">")
            if prefix.startswith("<") and rest.startswith("{"):
                found.append((prefix + ">", json.loads(rest)))
        return found

    try:
        wait_until(lambda: any(e["event"] == "daemon.started" for _, e in events()), timeout=30)
        config.write_text("batch_size = -1\n")  # refused at reload: logged as an error
        process.send_signal(signal.SIGHUP)
        wait_until(lambda: any(e["event"] == "config.reload_failed" for _, e in events()), 10)
        priorities = {e["event"]: p for p, e in events()}
        assert priorities["daemon.started"] == "<6>"
        assert priorities["config.reload_failed"] == "<3>"
        assert "<7>" in priorities.values(), "no debug line at log_level debug"
        lines = stderr_path.read_text().splitlines()
        assert lines and all(line[:1] == "<" for line in lines), "a line without its priority"
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


def test_abstract_notify_socket(db: TestDatabase, state_dir: Path) -> None:
    name = f"projectord-test-{uuid.uuid4().hex[:8]}"
    listener = NotifySocket(f"@{name}", b"\0" + name.encode())
    try:
        with start(
            db, "tests.support.projections:ledger_only", state_dir, {"NOTIFY_SOCKET": f"@{name}"}
        ) as daemon:
            wait_until(lambda: listener.fields("READY"), timeout=10)
            assert not listener.fields("WATCHDOG"), "pinged without WATCHDOG_USEC"
            assert daemon.stop() == 0
        assert listener.fields("STOPPING")
    finally:
        listener.close()


def test_a_wedged_runner_stops_the_watchdog(
    db: TestDatabase, state_dir: Path, notify_socket: NotifySocket
) -> None:
    env = {
        "NOTIFY_SOCKET": notify_socket.address,
        "WATCHDOG_USEC": "200000",
        "PROJECTORD_STALL_TIMEOUT": "1",
    }
    specs = "tests.support.ops_projections:wedge_and_ledger"
    daemon = start(db, specs, state_dir, env).wait_started()
    try:
        wait_until(lambda: len(notify_socket.fields("WATCHDOG")) >= 5, timeout=10)
        append(db, "Wedge", {"wedge": True})
        wedged_at = time.monotonic()
        wait_until(lambda: daemon.has_logged("watchdog.withheld"), timeout=10)
        withheld = next(e for e in daemon.log_events() if e["event"] == "watchdog.withheld")
        assert withheld["stalled"] == ["runner:wedge"]
        # Pings stop: none arrive in a window of 1.5 s (7 intervals).
        pings = len(notify_socket.fields("WATCHDOG"))
        window_end = time.monotonic() + 1.5
        wait_until(lambda: time.monotonic() > window_end, timeout=5)
        assert len(notify_socket.fields("WATCHDOG")) == pings, "pinged while a loop was wedged"
        last_ping = notify_socket.fields("WATCHDOG")[-1][0]
        assert last_ping < wedged_at + 1 + 0.5, "pings went on well past the stall timeout"
        # The daemon still answers and says why it is failing; the other projection carries on.
        health = ask(state_dir, "health")
        assert health["status"] == "failing"
        assert any(
            r["code"] == "loop_stalled" and r["loop"] == "runner:wedge" for r in health["reasons"]
        )
        credit(db)
        wait_until(lambda: db.scalar("SELECT count(*) FROM applied_log") == 1, timeout=10)
    finally:
        daemon.kill()  # SIGKILL: what systemd does once the watchdog expires


def test_unit_file_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is missing: install Debian's `systemd` package"
    unit = (ROOT / "systemd" / "projectord.service").read_text()
    for needed in (
        "Type=notify",
        "WatchdogSec=",
        "Restart=on-failure",
        "RuntimeDirectory=",
        "StateDirectory=",
        "User=projectord",
        "Group=projectord",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "ReadWritePaths=",
        "EnvironmentFile=",
        "KillMode=mixed",
        "ExecReload=",
        "SystemCallFilter=~@privileged @resources",
        "RemoveIPC=yes",
    ):
        assert needed in unit, needed
    # verify checks that ExecStart exists: point it at this checkout's console script.
    script = shutil.which("projectord") or str(Path(ROOT, ".venv", "bin", "projectord"))
    copy = tmp_path / "projectord.service"
    copy.write_text(unit.replace("/opt/projectord/bin/projectord", script))
    result = subprocess.run(
        [analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "projectord.service" not in result.stderr, result.stderr
