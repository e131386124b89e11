"""The pyfuse3 adapter of the blob filesystem (kernel mode): requests in, ``BlobFs`` out.

Errors and request counts go through ``fused.fuseops.errno_boundary``, the
same single errno mapping as fuse mode. The blob files never change while
mounted, so the kernel may cache entries and attributes for as long as it
likes. Blob files are opened with ``direct_io``: the EROFS page cache above
already holds what was read, a second copy in the blob files' page cache
would only cost memory, and FUSE readahead on a blob file would fetch
neighbouring files' chunks that nobody asked for. Direct reads also come in
whole (up to 1 MiB) requests. Every modifying request is answered with EROFS.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import pyfuse3

from .blobfs import BlobFs
from .errors import ReadOnlyError
from .options import BLOB_MOUNT_OPTIONS
from .fuseops import CACHE_TIMEOUT, read_only, errno_boundary
from . import takeover
from .stats import Stats
from .vfs import Attr

__all__ = ["BLOB_MOUNT_OPTIONS", "BlobOperations"]



class BlobOperations(pyfuse3.Operations):
    """pyfuse3 request handlers over a ``BlobFs``."""

    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, fs: BlobFs, stats: Stats | None = None) -> None:
        super().__init__()
        self.fs = fs
        self.stats = stats if stats is not None else fs.stats

    def init(self) -> None:  # supervised workers take over the device here
        takeover.at_init()

    @staticmethod
    def _entry(attr: Attr) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = attr.ino
        e.generation = 0
        e.entry_timeout = CACHE_TIMEOUT
        e.attr_timeout = CACHE_TIMEOUT
        e.st_mode = attr.mode
        e.st_nlink = attr.nlink
        e.st_uid = attr.uid
        e.st_gid = attr.gid
        e.st_size = attr.size
        e.st_blksize = attr.blksize
        e.st_blocks = attr.blocks
        e.st_atime_ns = attr.mtime_ns
        e.st_mtime_ns = attr.mtime_ns
        e.st_ctime_ns = attr.mtime_ns
        return e

    @errno_boundary
    async def lookup(
        self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        attr = self.fs.lookup(parent_inode, name)
        if attr is None:
            e = pyfuse3.EntryAttributes()
            e.st_ino = 0
            e.entry_timeout = CACHE_TIMEOUT
            return e
        return self._entry(attr)

    async def forget(self, inode_list: Sequence[tuple[pyfuse3.InodeT, int]]) -> None:
        self.stats.fuse_requests["forget"] += 1

    @errno_boundary
    async def getattr(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return self._entry(self.fs.getattr(inode))

    @errno_boundary
    async def opendir(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.FileHandleT:
        self.fs.opendir(inode)
        return inode

    @errno_boundary
    async def readdir(
        self, fh: pyfuse3.FileHandleT, start_id: int, token: pyfuse3.ReaddirToken
    ) -> None:
        for name, attr, cookie in self.fs.readdir(fh, start_id):
            if not pyfuse3.readdir_reply(token, name, self._entry(attr), cookie):
                break

    async def releasedir(self, fh: pyfuse3.FileHandleT) -> None:
        self.stats.fuse_requests["releasedir"] += 1

    @errno_boundary
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        s = self.fs.statfs()
        out = pyfuse3.StatvfsData()
        out.f_bsize = s.bsize
        out.f_frsize = s.frsize
        out.f_blocks = s.blocks
        out.f_files = s.files
        out.f_namemax = s.namemax
        return out

    @errno_boundary
    async def getxattr(
        self, inode: pyfuse3.InodeT, name: pyfuse3.XAttrNameT, ctx: pyfuse3.RequestContext
    ) -> bytes:
        return self.fs.getxattr(inode, name)

    @errno_boundary
    async def listxattr(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext
    ) -> Sequence[pyfuse3.XAttrNameT]:
        return self.fs.listxattr(inode)  # type: ignore[return-value]

    @errno_boundary
    async def open(
        self, inode: pyfuse3.InodeT, flags: pyfuse3.FlagT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.FileInfo:
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
            raise ReadOnlyError("the filesystem is read-only")
        self.fs.open(inode)
        return pyfuse3.FileInfo(fh=inode, direct_io=True)

    @errno_boundary
    async def read(self, fh: pyfuse3.FileHandleT, off: int, size: int) -> bytes:
        return await self.fs.read(fh, off, size)  # type: ignore[return-value]

    async def release(self, fh: pyfuse3.FileHandleT) -> None:
        self.stats.fuse_requests["release"] += 1

    async def flush(self, fh: pyfuse3.FileHandleT) -> None:
        self.stats.fuse_requests["flush"] += 1

    setattr = read_only  # type: ignore[assignment]
    mknod = read_only  # type: ignore[assignment]
    mkdir = read_only  # type: ignore[assignment]
    unlink = read_only  # type: ignore[assignment]
    rmdir = read_only  # type: ignore[assignment]
    symlink = read_only  # type: ignore[assignment]
    rename = read_only  # type: ignore[assignment]
    link = read_only  # type: ignore[assignment]
    write = read_only  # type: ignore[assignment]
    create = read_only  # type: ignore[assignment]
    setxattr = read_only  # type: ignore[assignment]
    removexattr = read_only  # type: ignore[assignment]
