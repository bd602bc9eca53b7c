"""Unix socket paths longer than `sun_path` allows (107 bytes).

A deep `state_dir` easily makes `<state_dir>/control.sock` too long to bind or connect to. On
Linux the directory can be reached through a short alias instead: open it and use
`/proc/self/fd/N/<name>`, which the kernel resolves to the real directory. Both the daemon and the
command line go through `reachable`, so any path that fits the file system works.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

MAX_SOCKET_PATH = 107  # sun_path holds 108 bytes including the terminating NUL


@contextmanager
def reachable(path: Path) -> Iterator[str]:
    """A path to bind or connect to that refers to `path`, valid inside the `with` block."""
    if len(os.fsencode(path)) <= MAX_SOCKET_PATH:
        yield str(path)
        return
    directory = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        alias = f"/proc/self/fd/{directory}/{path.name}"
        if len(os.fsencode(alias)) > MAX_SOCKET_PATH:
            raise OSError(f"the socket name {path.name!r} is too long")
        yield alias
    finally:
        os.close(directory)
