"""The unpacked plain images under ``<root>/rootfs``: ``rafs image ls`` and ``rafs image prune``.

``rafs run`` of a plain (non-RAFS) image unpacks it whole into
``<root>/rootfs/<digest>/rootfs`` (``unpack.ensure_rootfs``) and keeps it for
the next run of the same image; nothing else removes it. Here:

- ``list_unpacked``: every unpack (complete or not) with its disk use and the
  containers (``rafs ps``) whose image it is;
- ``prune``: remove the unpacks no container uses (``all_unused=False``: no
  container record names the image, whatever its state) or no *running*
  container uses (``all_unused=True``, ``rafs image prune --all``: also those
  of stopped containers, which never run again). It holds the containers
  lock (``store.locked``) throughout, so a ``rafs run`` either is a user
  already or creates its record after the removal (and unpacks again). An
  unpack in progress holds its ``.lock``; it is skipped, never removed under
  a running unpack. A left-over temp dir of an interrupted unpack goes with
  its image.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from . import store
from .manage import list_rows
from .paths import rootfs_cache_dir

__all__ = ["Unpacked", "list_unpacked", "prune"]


@dataclass
class Unpacked:
    digest: str  # sha256:...
    path: Path  # <root>/rootfs/<hex>
    bytes: int  # disk use
    complete: bool  # the rootfs is there (not only an interrupted unpack)
    containers: list[str] = field(default_factory=list)  # names of containers using it
    running: list[str] = field(default_factory=list)  # those of them not yet exited


def _disk_use(path: Path) -> int:
    total = 0
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(path):
        for name in (*dirnames, *filenames):
            with contextlib.suppress(OSError):
                st = os.lstat(os.path.join(dirpath, name))
                if (st.st_dev, st.st_ino) not in seen:
                    seen.add((st.st_dev, st.st_ino))
                    total += st.st_blocks * 512
    return total


def _users() -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """{digest: container names} of every container of a plain image, and of those
    still running (or being set up)."""
    every: dict[str, list[str]] = {}
    live: dict[str, list[str]] = {}
    for row in list_rows():
        if row.lazy:
            continue  # a RAFS image: mounted, never unpacked
        every.setdefault(row.digest, []).append(row.name)
        if not row.status.startswith(("exited", "dead")):
            live.setdefault(row.digest, []).append(row.name)
    return every, live


def list_unpacked() -> list[Unpacked]:
    base = rootfs_cache_dir()
    try:
        entries = sorted(p for p in base.iterdir() if p.is_dir())
    except FileNotFoundError:
        return []
    every, live = _users()
    out = []
    for path in entries:
        digest = "sha256:" + path.name
        out.append(Unpacked(digest, path, _disk_use(path), (path / "rootfs").is_dir(),
                            every.get(digest, []), live.get(digest, [])))
    return out


@contextlib.contextmanager
def _try_lock(path: Path) -> Iterator[bool]:
    """Hold the unpack lock of one image if nobody else does (True), else yield False."""
    try:
        fd = os.open(path / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except FileNotFoundError:
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def prune(all_unused: bool = False) -> list[Unpacked]:
    """Remove unused unpacks (see the module docstring); the ones removed."""
    removed: list[Unpacked] = []
    if not rootfs_cache_dir().is_dir():
        return removed
    with store.locked():  # no container record is created meanwhile
        for u in list_unpacked():
            if u.running or (u.containers and not all_unused):
                continue
            with _try_lock(u.path) as locked:
                if not locked:
                    continue  # being unpacked right now
                shutil.rmtree(u.path, ignore_errors=True)
            removed.append(u)
    return removed
