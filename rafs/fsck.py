"""``fsck.erofs`` (erofs-utils) as a second parser of a bootstrap's EROFS area.

``rafs.validate`` checks every rule the readers rely on by itself;
``fsck_erofs`` adds the erofs project's own walk of the image (superblock,
every inode, xattrs, directories, chunk maps with the driver's reading of
device ids and block addresses) where running it is cheaper than duplicating
that interpretation. It runs in ``rafs check`` and, in kernel mode, once per
bootstrap before the kernel first mounts it. The blob devices are given as
``/dev/zero``: fsck.erofs needs one per blob but the data is not what it is
asked to check (chunk digests are ours), and zeros cost no I/O.

Not pure: it runs a program. A missing ``fsck.erofs`` is logged and reported
as not run; a refusal or a run past ``FSCK_TIMEOUT`` is a ``FormatError``.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess

from .errors import FormatError

__all__ = ["FSCK_TIMEOUT", "fsck_erofs"]

log = logging.getLogger(__name__)

FSCK_TIMEOUT = 120.0


def fsck_erofs(path: str | os.PathLike[str], devices: int) -> bool:
    """Run ``fsck.erofs`` on the bootstrap at ``path``; False if it is not installed."""
    exe = shutil.which("fsck.erofs")
    if exe is None:
        log.warning("fsck.erofs not found (install erofs-utils): the EROFS cross-check "
                    "of %s is skipped; the rafs validator alone vouches for it", path)
        return False
    cmd = [exe, *(["--device=/dev/zero"] * devices), os.fspath(path)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, errors="replace",
                             timeout=FSCK_TIMEOUT, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise FormatError(f"fsck.erofs did not finish within {FSCK_TIMEOUT:.0f}s") from None
    except OSError as e:
        raise FormatError(f"cannot run fsck.erofs: {e.strerror}") from None
    if res.returncode != 0:
        lines = [ln.strip() for ln in (res.stderr + res.stdout).splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("<E>")] or lines or ["no output"]
        raise FormatError(f"fsck.erofs refuses it (exit {res.returncode}): {errors[0]}")
    return True
