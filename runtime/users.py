"""``USER[:GROUP]`` -> uid, gid and supplementary gids, from the image's own files.

As containerd does: a name is looked up in the image's ``/etc/passwd`` (user)
or ``/etc/group`` (group); a number is used as it is. Without a group the
primary gid comes from the passwd entry (0 for a uid that has none). The
supplementary gids are the groups of ``/etc/group`` that list the user by name.
HOME comes from the passwd entry (``/`` if none).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UnknownUserError
from .rootpath import resolve_in_root

__all__ = ["ResolvedUser", "resolve_user"]


@dataclass
class ResolvedUser:
    uid: int
    gid: int
    additional_gids: list[int] = field(default_factory=list)
    home: str = "/"
    name: str | None = None


def _read_db(root: Path, name: str) -> list[list[str]]:
    path = resolve_in_root(os.fsencode(root), os.fsencode(f"/etc/{name}"))
    try:
        with open(path, "rb") as f:
            text = f.read(16 << 20).decode("utf-8", "replace")
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return []
    rows = []
    for line in text.splitlines():
        if line and not line.startswith("#"):
            rows.append(line.split(":"))
    return rows


def _number(text: str) -> int | None:
    if text.isdigit():
        value = int(text)
        if value < 2**32 - 1:
            return value
    return None


def resolve_user(root: Path, spec: str) -> ResolvedUser:
    """Resolve ``spec`` (``USER[:GROUP]``, names or numbers; "" is root) in ``root``."""
    user, _, group = (spec or "0").partition(":")
    passwd = [r for r in _read_db(root, "passwd") if len(r) >= 7]
    entry = None
    uid = _number(user)
    if uid is None:
        entry = next((r for r in passwd if r[0] == user), None)
        if entry is None:
            raise UnknownUserError(f"user {user!r} is not in the image's /etc/passwd")
        uid = _number(entry[2])
        if uid is None:
            raise UnknownUserError(f"user {user!r} has a bad uid in the image's /etc/passwd")
    else:
        entry = next((r for r in passwd if _number(r[2]) == uid), None)
    groups = [r for r in _read_db(root, "group") if len(r) >= 3]
    if group:
        gid = _number(group)
        if gid is None:
            found = next((r for r in groups if r[0] == group), None)
            if found is None or _number(found[2]) is None:
                raise UnknownUserError(f"group {group!r} is not in the image's /etc/group")
            gid = _number(found[2])
            assert gid is not None
    else:
        gid = (_number(entry[3]) if entry is not None else None) or 0
    name = entry[0] if entry is not None else None
    extra: list[int] = []
    if name is not None and not group:
        for r in groups:
            members = r[3].split(",") if len(r) >= 4 else []
            g = _number(r[2])
            if name in members and g is not None and g != gid and g not in extra:
                extra.append(g)
    home = entry[5] if entry is not None and entry[5] else "/"
    return ResolvedUser(uid, gid, extra, home, name)
