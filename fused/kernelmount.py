"""The kernel's half of kernel mode: can this host mount file-backed EROFS, and the mounts.

Kernel mode hands the bootstrap to the kernel's EROFS driver (``mount(2)`` of
the bootstrap *file* with ``device=`` options naming the blob files of the
blob FUSE filesystem), which needs

- Linux >= 6.12 (file-backed mounts, ``CONFIG_EROFS_FS_BACKED_BY_FILE``; extra
  devices that are regular files came with it);
- that option built in, read from ``/proc/config.gz`` or
  ``/boot/config-RELEASE`` (a module build shows ``erofs`` in
  ``/proc/filesystems`` only once loaded, so a missing config file with
  ``erofs`` registered is given the benefit of the doubt: the mount itself
  then reports what is wrong);
- root (``mount(2)`` of a filesystem needs CAP_SYS_ADMIN in the initial
  user namespace).

``check_kernel_mode`` answers with a ``KernelSupport`` (ok and a reason for the
log line or the error); every input can be passed in, so tests can fake an old
kernel without touching the real one. ``resolve_mode`` turns ``auto`` /
``fuse`` / ``kernel`` into the mode to use. ``mount_erofs`` and ``umount``
call the syscalls through ctypes: util-linux ``mount`` would put a loop
device under a regular file, which is not what file-backed EROFS wants.
"""

from __future__ import annotations

import ctypes
import errno
import gzip
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import MountError

__all__ = [
    "MIN_KERNEL",
    "MODES",
    "KernelSupport",
    "check_kernel_mode",
    "mount_erofs",
    "resolve_mode",
    "umount",
]

MODES = ("auto", "fuse", "kernel")
MIN_KERNEL = (6, 12)
CONFIG_OPTION = "CONFIG_EROFS_FS_BACKED_BY_FILE"

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MNT_DETACH = 0x2
UMOUNT_NOFOLLOW = 0x8

_libc = ctypes.CDLL(None, use_errno=True)


class KernelModeError(MountError):
    """Kernel mode was asked for and this host cannot do it."""


@dataclass(frozen=True, slots=True)
class KernelSupport:
    ok: bool
    reason: str


def _kernel_version(release: str) -> tuple[int, int] | None:
    m = re.match(r"(\d+)\.(\d+)", release)
    return (int(m.group(1)), int(m.group(2))) if m else None


def _read_config(release: str) -> str | None:
    """The kernel build configuration, or None when the host does not publish it."""
    try:
        with gzip.open("/proc/config.gz", "rt") as f:
            return f.read()
    except OSError:
        pass
    try:
        return Path(f"/boot/config-{release}").read_text()
    except OSError:
        return None


def _erofs_registered() -> bool:
    try:
        return any(line.split()[-1:] == ["erofs"]
                   for line in Path("/proc/filesystems").read_text().splitlines())
    except OSError:
        return False


def check_kernel_mode(
    release: str | None = None,
    euid: int | None = None,
    config: str | None = None,
    erofs_registered: bool | None = None,
) -> KernelSupport:
    """Whether kernel mode works here; every argument defaults to the running system."""
    release = os.uname().release if release is None else release
    euid = os.geteuid() if euid is None else euid
    version = _kernel_version(release)
    if version is None:
        return KernelSupport(False, f"cannot read the kernel version from {release!r}")
    if version < MIN_KERNEL:
        return KernelSupport(
            False, f"kernel {release} is older than {MIN_KERNEL[0]}.{MIN_KERNEL[1]}, "
            "the first with file-backed EROFS mounts")
    if euid != 0:
        return KernelSupport(False, "mounting EROFS needs root")
    if config is None:
        config = _read_config(release)
    if config is not None:
        if re.search(rf"^{CONFIG_OPTION}=y\s*$", config, re.MULTILINE) is None:
            return KernelSupport(False, f"kernel {release} is built without {CONFIG_OPTION}")
        return KernelSupport(True, f"kernel {release} has {CONFIG_OPTION} and we are root")
    if erofs_registered is None:
        erofs_registered = _erofs_registered()
    if not erofs_registered:
        return KernelSupport(False, f"kernel {release} has no erofs filesystem "
                             "(and publishes no config to say why)")
    return KernelSupport(True, f"kernel {release} has erofs (no config published to check "
                         f"{CONFIG_OPTION}) and we are root")


def resolve_mode(requested: str, support: KernelSupport | None = None) -> tuple[str, str]:
    """(mode to use, why) for ``--mode requested``; KernelModeError if kernel mode cannot be."""
    if requested not in MODES:
        raise MountError(f"unknown mode {requested!r} (choose from {', '.join(MODES)})")
    if requested == "fuse":
        return "fuse", "fuse mode was asked for"
    if support is None:
        support = check_kernel_mode()
    if requested == "kernel":
        if not support.ok:
            raise KernelModeError(f"kernel mode is not available: {support.reason}")
        return "kernel", f"kernel mode was asked for; {support.reason}"
    if support.ok:
        return "kernel", support.reason
    return "fuse", f"kernel mode is not available: {support.reason}"


def mount_erofs(bootstrap: str | os.PathLike[str], target: str | os.PathLike[str],
                devices: Sequence[str | os.PathLike[str]]) -> None:
    """``mount -t erofs -o ro,device=...`` of a bootstrap file (file-backed EROFS)."""
    for d in devices:
        if "," in os.fspath(d):
            raise MountError(f"device path {d} contains ',', which mount options cannot carry")
    opts = ",".join(f"device={os.fspath(d)}" for d in devices)
    flags = MS_RDONLY | MS_NOSUID | MS_NODEV
    if _libc.mount(os.fsencode(bootstrap), os.fsencode(target), b"erofs", flags,
                   opts.encode()) != 0:
        err = ctypes.get_errno()
        raise MountError(f"mount -t erofs {bootstrap} on {target}: {os.strerror(err)}")


def umount(target: str | os.PathLike[str], *, lazy: bool = False) -> bool:
    """``umount2(target)``; False if nothing is mounted there. EBUSY raises MountError."""
    flags = UMOUNT_NOFOLLOW | (MNT_DETACH if lazy else 0)
    if _libc.umount2(os.fsencode(target), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOENT):
        return False
    if err == errno.EBUSY:
        raise MountError(f"{target} is busy")
    raise MountError(f"umount {target}: {os.strerror(err)}")
