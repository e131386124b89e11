"""What the kernel says is mounted, and the calls that undo a mount.

The mount table is ``/proc/self/mountinfo`` (``read_mounts``, ``find_mount``).
A rafs mount in fuse mode has file system type ``fuse.rafs``; in kernel mode it
is an ``erofs`` mount whose source is a bootstrap in a chunk cache
(``.../bootstraps/sha256/<hex>``), over a blob filesystem ``fuse.rafs-blobs``.
Each entry carries the mount's identity: its mount id and the ``MAJOR:MINOR``
of its filesystem (for FUSE, the minor also names the connection in fusectl).

Undoing: ``unmount`` (``umount2``, or ``fusermount3`` for a user's FUSE
mount), ``abort_connection`` (fusectl's ``abort``: every request of a FUSE
connection fails at once, even when its daemon is stopped or stuck; mounts
fusectl if needed), and ``MountTableWatch`` (wakes up when the mount table
changes: ``poll()`` reports POLLPRI|POLLERR on ``/proc/self/mountinfo``).
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import select
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .errors import MountError

__all__ = [
    "BLOB_FSTYPE",
    "FSTYPE",
    "MountEntry",
    "MountTableWatch",
    "abort_connection",
    "canonical",
    "find_mount",
    "libc",
    "read_mounts",
    "umount2",
    "unmount",
]

FSTYPE = "fuse.rafs"
BLOB_FSTYPE = "fuse.rafs-blobs"
FUSECTL = Path("/sys/fs/fuse/connections")
_BOOTSTRAP_SOURCE = re.compile(r"/bootstraps/[a-z0-9]+/[0-9a-f]{64}$")

MNT_DETACH = 0x2
UMOUNT_NOFOLLOW = 0x8

libc = ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True, slots=True)
class MountEntry:
    mountpoint: str
    fstype: str
    source: str
    major_minor: str  # "MAJOR:MINOR" of the mounted filesystem (st_dev)
    mount_id: int = 0
    super_options: str = ""

    @property
    def is_kernel(self) -> bool:
        """A kernel-mode rafs mount: EROFS over a cached bootstrap."""
        return self.fstype == "erofs" and _BOOTSTRAP_SOURCE.search(self.source) is not None

    @property
    def is_fuse(self) -> bool:
        return self.fstype == "fuse" or self.fstype.startswith("fuse.")

    @property
    def is_rafs(self) -> bool:
        return self.fstype == FSTYPE or self.is_kernel

    @property
    def identity(self) -> dict[str, object]:
        """What a state file records to recognise this very mount later. Mount ids and
        device numbers are reused as soon as a mount goes, so the type, place and
        source count too: a FUSE mount of rafs has a source no other mount has (its
        daemon instance's directory)."""
        return {"id": self.mount_id, "dev": self.major_minor, "fstype": self.fstype,
                "mountpoint": self.mountpoint, "source": self.source}

    @property
    def owner_uid(self) -> int:
        """Whose mount this is: a FUSE mount's ``user_id`` (the user whose daemon serves
        it); 0 for anything else (only root mounts EROFS, or mounts at all without
        fusermount3)."""
        if self.is_fuse:
            for option in self.super_options.split(","):
                key, _, value = option.partition("=")
                if key == "user_id" and value.isdigit():
                    return int(value)
        return 0

    def is_same(self, identity: object) -> bool:
        return isinstance(identity, dict) and bool(identity) and identity == self.identity


def canonical(path: str | os.PathLike[str]) -> str:
    """Absolute, symlink-free path, without looking at the path itself when it is a
    mount point: a FUSE mount whose daemon does not answer (stopped, stuck, not yet
    past INIT) would block any ``stat`` of it, and so any ``realpath``."""
    p = os.path.abspath(path)
    head, tail = os.path.split(p)
    if not tail:
        return p
    candidate = os.path.join(os.path.realpath(head), tail)
    if any(e.mountpoint == candidate for e in read_mounts()):
        return candidate
    return os.path.realpath(p)


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \\ooo octal
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def read_mounts() -> list[MountEntry]:
    """Every mount of this mount namespace, in mount order."""
    try:
        text = Path("/proc/self/mountinfo").read_text()
    except OSError as e:
        raise MountError(f"cannot read /proc/self/mountinfo: {e.strerror}") from None
    out = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        fields = left.split()
        rfields = right.split()
        if not sep or len(fields) < 5 or len(rfields) < 2 or not fields[0].isdigit():
            continue
        out.append(MountEntry(_unescape(fields[4]), rfields[0], _unescape(rfields[1]),
                              fields[2], int(fields[0]), rfields[2] if len(rfields) > 2 else ""))
    return out


def find_mount(path: str | os.PathLike[str], *, resolve: bool = True) -> MountEntry | None:
    """The topmost mount whose mount point is exactly ``path``, or None. ``resolve``:
    canonicalise ``path`` first, which looks at it: a FUSE daemon must not do that
    to its own mount point (it would wait for itself), so it passes a canonical path."""
    target = canonical(path) if resolve else os.fspath(path)
    found = None
    for entry in read_mounts():
        if entry.mountpoint == target:
            found = entry
    return found


# -- undoing mounts ---------------------------------------------------------------


def umount2(target: str | os.PathLike[str], *, lazy: bool = False) -> bool:
    """``umount2(target)``; False if nothing is mounted there. EBUSY raises MountError."""
    flags = UMOUNT_NOFOLLOW | (MNT_DETACH if lazy else 0)
    if libc.umount2(os.fsencode(target), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOENT):
        return False
    if err == errno.EBUSY:
        raise MountError(f"{target} is busy")
    raise MountError(f"umount {target}: {os.strerror(err)}")


def unmount(path: str | os.PathLike[str], *, lazy: bool = False) -> None:
    """Unmount the topmost mount on ``path`` (``lazy``: detach it even if busy).

    Root calls ``umount2``; a user's FUSE mount goes through ``fusermount3``.
    MountError with the reason ("busy" when it is busy)."""
    mp = canonical(path)
    if os.geteuid() == 0:
        umount2(mp, lazy=lazy)
        return
    msg = fusermount(["-u", *(["-z"] if lazy else []), "--", mp])
    if msg is not None and "not found in /etc/mtab" not in msg and "not mounted" not in msg:
        raise MountError(msg)


def fusermount(args: list[str], *, pass_fds: tuple[int, ...] = (),
               env: dict[str, str] | None = None) -> str | None:
    """Run ``fusermount3 ARGS``: None when it succeeded, else its last line of complaint.
    MountError when it is not installed or does not return within a minute."""
    try:
        res = subprocess.run(["fusermount3", *args], pass_fds=pass_fds, env=env,
                             capture_output=True, text=True, timeout=60, check=False)
    except FileNotFoundError:
        raise MountError("fusermount3 is not installed (Debian package fuse3)") from None
    except subprocess.TimeoutExpired:
        raise MountError(f"fusermount3 {' '.join(args)} timed out") from None
    if res.returncode == 0:
        return None
    lines = (res.stderr or res.stdout).strip().splitlines()
    return (lines[-1] if lines else f"exit status {res.returncode}").removeprefix("fusermount3: ")


def _mount_fusectl() -> None:
    if any(e.fstype == "fusectl" and e.mountpoint == str(FUSECTL) for e in read_mounts()):
        return
    if libc.mount(b"fusectl", os.fsencode(FUSECTL), b"fusectl", 0, None) != 0:
        err = ctypes.get_errno()
        if err != errno.EBUSY:
            raise MountError(f"cannot mount fusectl on {FUSECTL}: {os.strerror(err)}")


def abort_connection(major_minor: str) -> bool:
    """Abort the FUSE connection of the filesystem ``MAJOR:MINOR`` through fusectl:
    its pending and future requests fail at once. False if there is no such
    connection (any more); MountError if it cannot be done (not root)."""
    major, _, minor = major_minor.partition(":")
    if major != "0" or not minor.isdigit():
        return False  # FUSE filesystems have anonymous device numbers
    _mount_fusectl()
    abort = FUSECTL / minor / "abort"
    try:
        with open(abort, "w") as f:
            f.write("1")
    except FileNotFoundError:
        return False
    except OSError as e:
        raise MountError(f"cannot abort FUSE connection {minor}: {e.strerror}") from None
    return True


class MountTableWatch:
    """Tells when this mount namespace's mount table changes.

    An epoll instance watching ``/proc/self/mountinfo`` for POLLPRI: ``wait``
    blocks for a change (True) or the timeout (False); an event loop can wait
    for ``fileno()`` to become readable instead (trio's ``wait_readable``).
    Every change anywhere in the namespace wakes it: check what you care about."""

    def __init__(self) -> None:
        self._fd = os.open("/proc/self/mountinfo", os.O_RDONLY | os.O_CLOEXEC)
        self._ep = select.epoll()
        self._ep.register(self._fd, select.EPOLLPRI | select.EPOLLERR)

    def fileno(self) -> int:
        return self._ep.fileno()

    def wait(self, timeout: float) -> bool:
        return bool(self._ep.poll(timeout))

    def close(self) -> None:
        self._ep.close()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
