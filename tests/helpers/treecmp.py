"""A complete record of a directory tree, and the differences between two trees.

Owns: ``walk_tree`` (every path's type, full mode, owner, size, mtime, nlink,
hardlink group, device numbers, symlink target, xattrs and content sha256) and
``compare_trees`` (human-readable differences; an empty list means identical).

Used to prove a rafs mount shows exactly what a reference unpack (umoci) shows.
Paths are ``bytes`` throughout, relative to the root, the root itself is ``b"."``.
Nothing here follows symlinks.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from collections import defaultdict
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

__all__ = ["FIELDS", "IGNORED_XATTRS", "Record", "compare_trees", "walk_tree"]

Record = dict[str, Any]

# Every field a record may hold, in the order differences are reported.
FIELDS = (
    "type",
    "mode",
    "uid",
    "gid",
    "size",
    "mtime",
    "nlink",
    "hardlinks",
    "rdev",
    "target",
    "xattrs",
    "sha256",
)
# Labels the host's LSM puts on files; not part of an image.
IGNORED_XATTRS = frozenset({"security.selinux"})

_NO_XATTRS = {errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENODATA}


def walk_tree(root: Path) -> dict[bytes, Record]:
    """Record every path below ``root`` (and ``b"."`` for the root itself)."""
    base = os.fsencode(root)
    records: dict[bytes, Record] = {}
    inodes: dict[tuple[int, int], list[bytes]] = defaultdict(list)
    for rel in _walk(base, b"."):
        full = base if rel == b"." else os.path.join(base, rel)
        st = os.lstat(full)
        rec = _record(full, st)
        records[rel] = rec
        if rec["type"] == "file" and st.st_nlink > 1:
            inodes[(st.st_dev, st.st_ino)].append(rel)
    for group in inodes.values():
        group.sort()
        for rel in group:
            records[rel]["hardlinks"] = list(group)
    return records


def compare_trees(
    a: Path,
    b: Path,
    ignore: Collection[bytes] = frozenset(),
    ignore_fields: Collection[str] = frozenset(),
) -> list[str]:
    """Differences between the trees at ``a`` and ``b``, one line each; [] if identical.

    ``ignore`` holds relative paths to leave out, with everything below them.
    ``ignore_fields`` names record fields (see ``FIELDS``) to leave out everywhere.
    """
    ra, rb = walk_tree(a), walk_tree(b)
    diffs: list[str] = []
    for rel in sorted(ra.keys() | rb.keys()):
        if _ignored(rel, ignore):
            continue
        if rel not in rb:
            diffs.append(f"{_show(rel)}: only in {a}")
            continue
        if rel not in ra:
            diffs.append(f"{_show(rel)}: only in {b}")
            continue
        for name in FIELDS:
            if name in ignore_fields:
                continue
            va, vb = ra[rel].get(name), rb[rel].get(name)
            if va != vb:
                diffs.append(f"{_show(rel)}: {name} {_fmt(name, va)} != {_fmt(name, vb)}")
    return diffs


# ---------------------------------------------------------------------------------------


def _walk(base: bytes, rel: bytes) -> Iterator[bytes]:
    yield rel
    path = base if rel == b"." else os.path.join(base, rel)
    with os.scandir(path) as it:
        children = sorted((e.name, e.is_dir(follow_symlinks=False)) for e in it)
    for name, is_dir in children:
        child = name if rel == b"." else os.path.join(rel, name)
        if is_dir:
            yield from _walk(base, child)
        else:
            yield child


def _record(path: bytes, st: os.stat_result) -> Record:
    kind = _type_name(st.st_mode)
    rec: Record = {
        "type": kind,
        "mode": st.st_mode,
        "uid": st.st_uid,
        "gid": st.st_gid,
        "mtime": st.st_mtime_ns // 1_000_000_000,
        "nlink": st.st_nlink,
        "xattrs": _xattrs(path),
    }
    if kind in ("file", "symlink"):
        rec["size"] = st.st_size
    if kind == "symlink":
        rec["target"] = os.readlink(path)
    if kind in ("chardev", "blockdev"):
        rec["rdev"] = (os.major(st.st_rdev), os.minor(st.st_rdev))
    if kind == "file":
        rec["sha256"] = _sha256(path)
    return rec


def _type_name(mode: int) -> str:
    for test, name in (
        (stat.S_ISREG, "file"),
        (stat.S_ISDIR, "dir"),
        (stat.S_ISLNK, "symlink"),
        (stat.S_ISCHR, "chardev"),
        (stat.S_ISBLK, "blockdev"),
        (stat.S_ISFIFO, "fifo"),
        (stat.S_ISSOCK, "socket"),
    ):
        if test(mode):
            return name
    return f"unknown({stat.S_IFMT(mode):#o})"


def _xattrs(path: bytes) -> dict[str, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as e:
        if e.errno in _NO_XATTRS:
            return {}
        raise
    out = {}
    for name in sorted(names):
        if name in IGNORED_XATTRS:
            continue
        try:
            out[name] = os.getxattr(path, name, follow_symlinks=False)
        except OSError as e:
            if e.errno not in _NO_XATTRS:
                raise
    return out


def _sha256(path: bytes) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _ignored(rel: bytes, ignore: Collection[bytes]) -> bool:
    if not ignore:
        return False
    parts = rel.split(b"/")
    return any(b"/".join(parts[: i + 1]) in ignore for i in range(len(parts)))


def _show(rel: bytes) -> str:
    return rel.decode("utf-8", "backslashreplace")


def _fmt(name: str, value: Any) -> str:
    if value is None:
        return "(absent)"
    if name == "mode":
        return f"{value:#o}"
    if name == "hardlinks":
        return "[" + ", ".join(_show(p) for p in value) + "]"
    if name == "target":
        return repr(value)
    return str(value)
