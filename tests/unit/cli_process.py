"""Running the command line as a subprocess, as an operator or a script would, and a stand-in
for the daemon's end of the control socket."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).parents[2]


def projectord(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None, **kwargs: object
) -> subprocess.CompletedProcess[str]:
    """`python -m projectord ARGS` with no PROJECTORD_* or systemd variables of this shell."""
    clean = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("PROJECTORD_") and key != "RUNTIME_DIRECTORY"
    }
    return subprocess.run(
        [sys.executable, "-m", "projectord", *args],
        env={**clean, "PYTHONPATH": str(ROOT), **(env or {})},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        **kwargs,  # type: ignore[call-overload]
    )


@contextmanager
def fake_daemon(path: Path, result: object) -> Iterator[list[dict[str, object]]]:
    """A socket at `path` answering every request line with `{"ok": true, "result": result}`;
    yields the requests it received."""
    requests: list[dict[str, object]] = []
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen()

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn, conn.makefile("rwb") as stream:
                for line in stream:
                    requests.append(json.loads(line))
                    stream.write(json.dumps({"ok": True, "result": result}).encode() + b"\n")
                    stream.flush()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield requests
    finally:
        server.close()
