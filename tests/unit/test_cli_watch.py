"""`status --watch` refreshes until Ctrl-C, however it was started."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from tests.unit.cli_process import ROOT, fake_daemon

SNAPSHOT = {
    "instance": "host:1",
    "stopping": False,
    "database": {"reachable": True, "error": None},
    "listener": {"connected": True},
    "projections": [
        {
            "name": "ledger",
            "state": "running",
            "owner": "host:1",
            "local": True,
            "lag": 0,
            "lag_seconds": 0.0,
            "caught_up": True,
            "applied_total": 7,
            "events_per_second": 1.5,
            "last_error": None,
            "rebuild": None,
        }
    ],
}


def test_the_watch_ends_on_sigint_even_when_started_with_sigint_ignored(tmp_path: Path) -> None:
    """A script's `cmd &` starts its children with SIGINT ignored, and Python then installs no
    KeyboardInterrupt: the watch must take SIGINT itself, or it runs on."""
    path = tmp_path / "control.sock"
    with fake_daemon(path, SNAPSHOT):
        args = ["status", "--watch", "--interval", "0.1", "--control-socket", str(path)]
        watch = subprocess.Popen(
            [sys.executable, "-m", "projectord", *args],
            stdout=subprocess.PIPE,
            text=True,
            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
        )
        try:
            assert watch.stdout is not None
            tables = 0
            for line in watch.stdout:
                tables += line.startswith("NAME")
                if tables == 2:
                    break
            row = watch.stdout.readline().split()
            assert row[:2] == ["ledger", "running"] and "7" in row, row
            watch.send_signal(signal.SIGINT)
            # Keep reading while it exits: a full pipe would block its last refresh and exit.
            watch.communicate(timeout=30)
        finally:
            if watch.poll() is None:
                watch.kill()
    assert watch.returncode == 0
