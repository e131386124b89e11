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
``fuse`` / ``kernel`` into the mode to use. ``mount_erofs`` calls
``mount(2)`` through ctypes: util-linux ``mount`` would put a loop device
under a regular file, which is not what file-backed EROFS wants.

``KernelMounts`` holds the two mounts of one kernel-mode daemon, the blob
filesystem and EROFS over it, and undoes them in the only safe order: EROFS
first, *while the blob filesystem still answers* (the EROFS driver waits for
its reads in flight while it unmounts), the blob filesystem after it.
"""

from __future__ import annotations

import ctypes
import errno
import gzip
import logging
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import KernelModeError, MountError
from .mounts import find_mount, libc, read_mounts, umount2
from .options import MODES

__all__ = [
    "DIRECT_IO_OPTION",
    "MIN_KERNEL",
    "MODES",
    "KernelMounts",
    "KernelSupport",
    "check_kernel_mode",
    "mount_erofs",
    "resolve_mode",
]

log = logging.getLogger(__name__)

MIN_KERNEL = (6, 12)
CONFIG_OPTION = "CONFIG_EROFS_FS_BACKED_BY_FILE"

DIRECT_IO_OPTION = "directio"  # EROFS: read the backing files with direct I/O
DIRECT_IO_ENV = "RAFS_EROFS_DIRECT_IO"  # "1": with it; a knob for studies (bench.warmread)

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4


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
                devices: Sequence[str | os.PathLike[str]], *, direct_io: bool = False) -> None:
    """``mount -t erofs -o ro,device=...`` of a bootstrap file (file-backed EROFS).

    ``direct_io`` adds ``directio``: the driver reads its backing files (our blob
    files) with IOCB_DIRECT, so a FUSE read of a blob file is an asynchronous
    request and readahead keeps the next one in flight while the reader copies
    the last (without it each 1 MiB request is synchronous). Off by default:
    measured side by side (``bench.warmread``, README "Kernel mode") neither is
    faster, both are dominated by the daemon's first writes into fresh page
    cache pages. A kernel whose EROFS does not know the option (EINVAL) is
    mounted without it."""
    for d in devices:
        if "," in os.fspath(d):
            raise MountError(f"device path {d} contains ',', which mount options cannot carry")
    opts = ",".join(f"device={os.fspath(d)}" for d in devices)
    flags = MS_RDONLY | MS_NOSUID | MS_NODEV
    err = 0
    for extra in (f",{DIRECT_IO_OPTION}" if direct_io else "", ""):
        if libc.mount(os.fsencode(bootstrap), os.fsencode(target), b"erofs", flags,
                      (opts + extra).encode()) == 0:
            if direct_io and not extra:
                log.info("this kernel's EROFS has no %s option: blob files read buffered",
                         DIRECT_IO_OPTION)
            return
        err = ctypes.get_errno()
        if not extra or err != errno.EINVAL:
            break  # only an unknown option is worth a second try without it
    raise MountError(f"mount -t erofs {bootstrap} on {target}: {os.strerror(err)}")


def _erofs_bdis() -> set[str]:
    try:
        return {name for name in os.listdir("/sys/class/bdi") if name.startswith("erofs-")}
    except OSError:
        return set()


class KernelMounts:
    """The two mounts of kernel mode: the blob filesystem, and EROFS over it."""

    def __init__(self, bootstrap: Path, mountpoint: str, blob_dir: Path,
                 device_names: Sequence[str]) -> None:
        self.bootstrap = bootstrap
        self.mountpoint = mountpoint
        self.blob_dir = blob_dir
        self.devices = [str(blob_dir / name) for name in device_names]
        self.erofs: dict[str, object] | None = None  # identity of our EROFS mount
        self.bdi: str | None = None

    def prepare(self) -> None:
        """An empty private directory for the blob filesystem."""
        try:
            self.blob_dir.mkdir(mode=0o700, exist_ok=True)
        except OSError as e:
            raise MountError(f"cannot create {self.blob_dir}: {e.strerror}") from None

    def mount_erofs(self) -> None:
        before = _erofs_bdis()
        mount_erofs(self.bootstrap, self.mountpoint, self.devices,
                    direct_io=os.environ.get(DIRECT_IO_ENV) == "1")
        entry = find_mount(self.mountpoint)
        self.erofs = entry.identity if entry is not None else {}
        # A file-backed EROFS mount has a bdi of its own named by a counter, not by
        # st_dev; the one that appeared is ours unless another mount raced us.
        new = _erofs_bdis() - before
        self.bdi = new.pop() if len(new) == 1 else None
        log.info("kernel EROFS mount of %s on %s with %d blob devices", self.bootstrap,
                 self.mountpoint, len(self.devices))

    def erofs_present(self) -> bool:
        """Whether our EROFS mount is still in the mount table (by identity, not path,
        so a mount someone else put on the same path is not taken for it)."""
        return self.erofs is not None and any(e.is_same(self.erofs) for e in read_mounts())

    def unmount_erofs(self, *, lazy: bool) -> None:
        """MountError (busy) leaves it mounted. Someone may have unmounted it already
        (and mounted something else there): only our own mount is touched. Call it
        while the blob filesystem still answers: the driver waits for its reads."""
        if self.erofs is None:
            return
        entry = find_mount(self.mountpoint)
        if entry is not None and entry.is_same(self.erofs):
            umount2(self.mountpoint, lazy=lazy)
        self.erofs = None

    def unmount_blobs(self) -> None:
        """Unmount the blob filesystem; the EROFS driver may hold it for a moment
        (its device files are released after its unmount returns)."""
        for _attempt in range(50):
            if not self.blobs_busy() or find_mount(self.blob_dir, resolve=False) is None:
                return
            time.sleep(0.02)
        log.warning("blob mount %s stays busy; detaching it", self.blob_dir)
        umount2(self.blob_dir, lazy=True)

    def blobs_busy(self) -> bool:
        """Try to unmount the blob filesystem: True while something still uses it, and
        also when it is no longer there to try (someone detached it: then only the end
        of the FUSE session tells that the kernel let go of it)."""
        try:
            return not umount2(self.blob_dir)  # root only, like kernel mode itself
        except MountError:
            return True
