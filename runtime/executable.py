"""Find a container's command in its root file system before runc is asked to run it.

runc reports a missing or unusable executable with its own message and status
1, after it has set the container up. docker and podman say 127 ("command not
found") and 126 ("cannot execute") instead, so scripts can tell them from the
command's own failure; ``check_command`` makes the same decision up front,
the way runc's lookup (Go's ``exec.LookPath`` with the container's ``PATH``)
would: a name with a ``/`` is taken as it is (relative to the working
directory), else the first ``PATH`` entry holding a regular file with an
execute bit wins. Symlinks are resolved inside the root (``rootpath``).

- not found: ``CommandNotFoundError`` (127);
- found, but a directory, not executable at all, or not executable by the
  container's user (owner, group and other bits against uid, gid and
  supplementary groups; root needs one execute bit): ``CannotExecuteError``
  (126).
"""

from __future__ import annotations

import os
import stat

from .errors import CannotExecuteError, CommandNotFoundError
from .rootpath import resolve_in_root
from .users import ResolvedUser

__all__ = ["check_command"]


def _stat(root: bytes, path: str) -> os.stat_result | None:
    try:
        return os.stat(resolve_in_root(root, os.fsencode(path)))
    except OSError:
        return None


def _may_execute(st: os.stat_result, user: ResolvedUser) -> bool:
    if user.uid == 0:
        return bool(st.st_mode & 0o111)
    if st.st_uid == user.uid:
        return bool(st.st_mode & stat.S_IXUSR)
    if st.st_gid == user.gid or st.st_gid in user.additional_gids:
        return bool(st.st_mode & stat.S_IXGRP)
    return bool(st.st_mode & stat.S_IXOTH)


def _path_of(env: list[str]) -> str:
    for item in env:
        key, sep, value = item.partition("=")
        if sep and key == "PATH":
            return value
    return ""


def check_command(root: str | os.PathLike[str], args: list[str], env: list[str], cwd: str,
                  user: ResolvedUser) -> str:
    """The path (inside the container) runc will execute for ``args[0]``."""
    name = args[0]
    root_b = os.fsencode(root)
    if "/" in name:
        path = name if name.startswith("/") else os.path.join(cwd, name)
        st = _stat(root_b, path)
        if st is None:
            raise CommandNotFoundError(f"{name}: no such file or directory in the image")
    else:
        for directory in _path_of(env).split(":"):
            path = os.path.join(directory or cwd, name)
            st = _stat(root_b, path)
            if st is not None and stat.S_ISREG(st.st_mode) and st.st_mode & 0o111:
                break
        else:
            raise CommandNotFoundError(f"{name}: executable file not found in $PATH of the "
                                       "image")
    if stat.S_ISDIR(st.st_mode):
        raise CannotExecuteError(f"{name}: is a directory")
    if not stat.S_ISREG(st.st_mode) or not _may_execute(st, user):
        who = "root" if user.uid == 0 else f"uid {user.uid}"
        raise CannotExecuteError(f"{name}: permission denied (not executable by {who})")
    return path
