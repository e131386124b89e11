"""The pyfuse3 adapter of fuse mode: kernel requests in, ``Vfs`` calls out. Nothing else.

Every handler and the error boundary live in ``fused.adapter.BaseOperations``;
this subclass adds what only fuse mode serves (symlinks) and asks the kernel
to keep the page cache across opens (the image never changes while mounted).
"""

from __future__ import annotations

import pyfuse3

from .adapter import CACHE_TIMEOUT, BaseOperations, errno_boundary, read_only
from .options import MOUNT_OPTIONS
from .stats import Stats
from .vfs import Vfs

__all__ = ["CACHE_TIMEOUT", "MOUNT_OPTIONS", "Operations", "errno_boundary", "read_only"]


class Operations(BaseOperations):
    """pyfuse3 request handlers over a ``Vfs``."""

    keep_cache = True

    def __init__(self, vfs: Vfs, stats: Stats | None = None) -> None:
        super().__init__(vfs, stats)
        self.vfs = vfs

    @errno_boundary
    async def readlink(self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext) -> bytes:
        return self.vfs.readlink(inode)
