"""The container's root file system: overlayfs with the image as its lower dir.

``mount_overlay`` and ``unmount`` call mount(2)/umount2(2) directly (through
libc), so failures carry the kernel's errno. An unmount that finds the mount
busy detaches it lazily.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
from pathlib import Path

from fused.mounts import find_mount, libc

from .errors import RunError

__all__ = ["is_overlay", "mount_overlay", "unmount"]

log = logging.getLogger(__name__)

MNT_DETACH = 2
_libc = libc  # never ctypes.util.find_library: it runs `ldconfig -p` at import


def mount_overlay(lower: Path, upper: Path, work: Path, target: Path) -> None:
    for d in (upper, work, target):
        d.mkdir(parents=True, exist_ok=True)
    options = f"lowerdir={lower},upperdir={upper},workdir={work}"
    if any(c in str(p) for p in (lower, upper, work) for c in ",:"):
        raise RunError(f"overlay paths cannot contain ',' or ':': {options}")
    rc = _libc.mount(b"overlay", os.fsencode(target), b"overlay", 0, options.encode())
    if rc != 0:
        e = ctypes.get_errno()
        raise RunError(f"cannot mount the overlay on {target}: {os.strerror(e)}")
    log.info("overlay on %s (lower %s)", target, lower)


def is_overlay(target: Path) -> bool:
    entry = find_mount(target)
    return entry is not None and entry.fstype == "overlay"


def unmount(target: Path) -> None:
    """Unmount ``target`` if it is mounted (lazily if busy)."""
    if find_mount(target) is None:
        return
    path = os.fsencode(target)
    if _libc.umount2(path, 0) == 0:
        return
    e = ctypes.get_errno()
    if e in (errno.EBUSY,):
        log.warning("%s is busy; detaching it", target)
        if _libc.umount2(path, MNT_DETACH) == 0:
            return
        e = ctypes.get_errno()
    if e in (errno.EINVAL, errno.ENOENT):  # not mounted (any more)
        return
    raise RunError(f"cannot unmount {target}: {os.strerror(e)}")
