"""Why this user may not use the control socket, and who may: one line instead of a
`PermissionError`.

The daemon creates its socket with mode 0660 in a directory of its own, so the way in is
membership of the owning group; the message names that group and the command that grants it.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
from pathlib import Path


def permission_denied(path: Path) -> str:
    """One line for a user refused on `path`: the first directory on the way this user may not
    enter, or else the socket itself, with who may and how to become one of them."""
    for directory in reversed(path.parents):
        if not os.access(directory, os.X_OK):
            return (
                f"permission denied on {path}: this user may not enter {directory}; "
                f"{_who_may(directory, stat.S_IXGRP, 'enter it')}"
            )
    return f"permission denied on {path}: {_who_may(path, stat.S_IWGRP, 'connect')}"


def _who_may(path: Path, group_bit: int, action: str) -> str:
    try:
        info = path.stat()
    except OSError:
        return "ask the daemon's administrator for access"
    owner, group = _user_name(info.st_uid), _group_name(info.st_gid)
    if not info.st_mode & group_bit:
        return f"only user {owner} may {action} (mode {stat.S_IMODE(info.st_mode):04o})"
    return (
        f"only user {owner} and members of group {group} may {action}: "
        f"`sudo usermod -aG {group} {_user_name(os.getuid())}`, then log in again"
    )


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)
