"""Resolve a path inside a root directory as if the root were ``/``.

Symlinks met on the way are followed within the root: an absolute target
restarts at the root, ``..`` never climbs above it. Used to read the image's
own ``/etc/passwd`` and ``/etc/group`` (a file that may be ``etc -> /`` away
from the host's). Unpacking layers does not resolve paths on disk: the layer
model gives it real paths (``converter.layermodel``).
"""

from __future__ import annotations

import os
import stat

__all__ = ["MAX_SYMLINKS", "resolve_in_root"]

MAX_SYMLINKS = 40


def _split(path: bytes) -> list[bytes]:
    return [p for p in path.split(b"/") if p not in (b"", b".")]


def resolve_in_root(root: bytes, path: bytes, *, follow_last: bool = True) -> bytes:
    """The host path of ``path`` (relative to ``root``) with its symlinks resolved inside
    ``root``. Components that do not exist are kept as they are. With ``follow_last``
    false a symlink in the last component is not followed (to replace or link it)."""
    todo = _split(path)
    todo.reverse()
    done: list[bytes] = []
    hops = 0
    while todo:
        part = todo.pop()
        if part == b"..":
            if done:
                done.pop()
            continue
        candidate = os.path.join(root, *done, part)
        if not todo and not follow_last:
            done.append(part)
            break
        try:
            st = os.lstat(candidate)
        except (FileNotFoundError, NotADirectoryError):
            done.append(part)
            continue
        if not stat.S_ISLNK(st.st_mode):
            done.append(part)
            continue
        hops += 1
        if hops > MAX_SYMLINKS:
            raise OSError(40, "too many levels of symbolic links", os.fsdecode(path))
        target = os.readlink(candidate)
        if target.startswith(b"/"):
            done = []
        rest = _split(target)
        rest.reverse()
        todo.extend(rest)
    return os.path.join(root, *done) if done else root
