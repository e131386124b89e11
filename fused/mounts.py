"""What the kernel says is mounted, and the fusermount3 calls that undo a mount.

``find_mount`` reads ``/proc/self/mountinfo``. A rafs mount in fuse mode shows
file system type ``fuse.rafs`` (mount option ``subtype=rafs``); in kernel mode
it is an ``erofs`` mount whose source is a bootstrap in a chunk cache
(``.../bootstraps/sha256/<hex>``), and the blob filesystem under it is
``fuse.rafs-blobs``. Unmounting FUSE goes through ``fusermount3`` so it works
for root and for users alike.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .errors import MountError

__all__ = ["BLOB_FSTYPE", "FSTYPE", "MountEntry", "canonical", "find_mount", "fusermount_unmount"]

FSTYPE = "fuse.rafs"
BLOB_FSTYPE = "fuse.rafs-blobs"
_BOOTSTRAP_SOURCE = re.compile(r"/bootstraps/[a-z0-9]+/[0-9a-f]{64}$")


@dataclass(frozen=True, slots=True)
class MountEntry:
    mountpoint: str
    fstype: str
    source: str
    major_minor: str  # "MAJOR:MINOR" of the mounted filesystem (st_dev)

    @property
    def is_kernel(self) -> bool:
        """A kernel-mode rafs mount: EROFS over a cached bootstrap."""
        return self.fstype == "erofs" and _BOOTSTRAP_SOURCE.search(self.source) is not None

    @property
    def is_rafs(self) -> bool:
        return self.fstype == FSTYPE or self.is_kernel


def canonical(path: str | os.PathLike[str]) -> str:
    """Absolute, symlink-free path; works on a dead FUSE mount (ENOTCONN)."""
    return os.path.realpath(os.path.abspath(path))


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \\ooo octal
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 4 <= len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def find_mount(path: str | os.PathLike[str]) -> MountEntry | None:
    """The topmost mount whose mount point is exactly ``path``, or None."""
    target = canonical(path)
    found = None
    try:
        text = Path("/proc/self/mountinfo").read_text()
    except OSError as e:
        raise MountError(f"cannot read /proc/self/mountinfo: {e.strerror}") from None
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields = left.split()
        rfields = right.split()
        if len(fields) < 5 or len(rfields) < 2:
            continue
        if _unescape(fields[4]) == target:
            found = MountEntry(target, rfields[0], _unescape(rfields[1]), fields[2])
    return found


def fusermount_unmount(path: str | os.PathLike[str], *, lazy: bool = False) -> None:
    """Unmount with ``fusermount3 -u`` (``-z``: lazily); MountError with its message."""
    args = ["fusermount3", "-u", *(["-z"] if lazy else []), "--", canonical(path)]
    try:
        res = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)
    except FileNotFoundError:
        raise MountError("fusermount3 is not installed (Debian package fuse3)") from None
    except subprocess.TimeoutExpired:
        raise MountError(f"fusermount3 -u {path} timed out") from None
    if res.returncode != 0:
        lines = (res.stderr or res.stdout).strip().splitlines()
        msg = lines[-1] if lines else f"exit status {res.returncode}"
        raise MountError(msg.removeprefix("fusermount3: "))
