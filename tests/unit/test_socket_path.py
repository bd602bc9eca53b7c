"""Control socket paths longer than sun_path (107 bytes) are reached through /proc/self/fd."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from projectord.control.socket_path import MAX_SOCKET_PATH, reachable


def test_a_short_path_is_used_as_is(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    with reachable(path) as address:
        assert address == str(path)


def deep_directory(tmp_path: Path) -> Path:
    deep = tmp_path.joinpath(*["d" * 40] * 4)
    deep.mkdir(parents=True)
    return deep


def test_a_long_path_is_reached_through_a_short_alias_that_works(tmp_path: Path) -> None:
    path = deep_directory(tmp_path) / "control.sock"
    assert len(os.fsencode(path)) > MAX_SOCKET_PATH
    with reachable(path) as address:
        assert address.startswith("/proc/self/fd/") and address.endswith("/control.sock")
        assert len(os.fsencode(address)) <= MAX_SOCKET_PATH
        with socket.socket(socket.AF_UNIX) as server:
            server.bind(address)  # binds the real path: the alias resolves to the directory
    assert path.exists()


def test_the_alias_directory_is_closed_after_use(tmp_path: Path) -> None:
    path = deep_directory(tmp_path) / "control.sock"
    before = len(os.listdir("/proc/self/fd"))
    with reachable(path):
        assert len(os.listdir("/proc/self/fd")) == before + 1
    assert len(os.listdir("/proc/self/fd")) == before


def test_a_socket_name_too_long_even_for_the_alias_is_refused(tmp_path: Path) -> None:
    path = deep_directory(tmp_path) / ("s" * 100)
    with pytest.raises(OSError, match="too long"), reachable(path):
        pass
