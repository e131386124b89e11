"""Mount a bootstrap with the real kernel EROFS driver (file-backed, extra devices).

util-linux ``mount`` turns a regular file into a loop device; file-backed EROFS
needs the path handed to mount(2) directly, so this calls it through ctypes.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

_libc = ctypes.CDLL(None, use_errno=True)
MS_RDONLY = 1


def mount_erofs(bootstrap: Path, target: Path, devices: list[Path]) -> None:
    opts = ",".join(f"device={d}" for d in devices)
    if _libc.mount(str(bootstrap).encode(), str(target).encode(), b"erofs", MS_RDONLY,
                   opts.encode()) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount -t erofs {bootstrap}: {os.strerror(err)}")


@contextlib.contextmanager
def erofs_mounted(bootstrap: Path, target: Path, devices: list[Path]) -> Iterator[Path]:
    target.mkdir(parents=True, exist_ok=True)
    mount_erofs(bootstrap, target, devices)
    try:
        yield target
    finally:
        subprocess.run(["umount", str(target)], check=False)
        if os.path.ismount(target):
            subprocess.run(["umount", "-l", str(target)], check=False)
