"""The pyfuse3 adapter: kernel requests in, ``Vfs`` calls out. Nothing else.

Every handler is wrapped by ``errno_boundary``, the one place where an
exception becomes a ``FUSEError`` (errno from ``rafs.errors.to_errno``);
unexpected exceptions are logged with their traceback and answered with EIO,
so no request can take the daemon down.

Kernel caching: the image never changes while mounted, so entries, negative
lookups and attributes are cached for a day, and ``open`` asks the kernel to
keep the page cache across opens. The filesystem is read-only: every
modifying request is answered with EROFS (the ``ro`` mount option already
stops most of them in the kernel).
"""

from __future__ import annotations

import errno
import functools
import logging
import os
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, ParamSpec, TypeVar

import pyfuse3

from rafs.errors import RafsError, to_errno

from .errors import ReadOnlyError
from .options import MOUNT_OPTIONS
from . import takeover
from .stats import Stats
from .vfs import Attr, Vfs

__all__ = ["CACHE_TIMEOUT", "MOUNT_OPTIONS", "Operations", "errno_boundary", "read_only"]

log = logging.getLogger(__name__)

CACHE_TIMEOUT = 86400.0

P = ParamSpec("P")
R = TypeVar("R")


def errno_boundary(
    fn: Callable[P, Coroutine[Any, Any, R]],
) -> Callable[P, Coroutine[Any, Any, R]]:
    """Count the request and translate any exception into FUSEError: the only errno
    mapping of the adapters (this one and ``fused.blobops``). The first argument
    must be an adapter with a ``stats`` attribute."""
    name = fn.__name__

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        stats: Stats = args[0].stats  # type: ignore[attr-defined]
        stats.fuse_requests[name] += 1
        try:
            return await fn(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except Exception as e:  # trio.Cancelled is a BaseException and passes through
            code = to_errno(e)
            if not isinstance(e, RafsError | OSError):
                log.exception("%s failed unexpectedly", fn.__name__)
            elif code == errno.EIO:
                log.warning("%s: %s", fn.__name__, e)
            if code == errno.EIO:
                stats.errors += 1
            raise pyfuse3.FUSEError(code) from None

    return wrapper


def read_only(*_: Any, **__: Any) -> Awaitable[Any]:
    async def refuse() -> Any:
        raise pyfuse3.FUSEError(ReadOnlyError.errno)

    return refuse()


class Operations(pyfuse3.Operations):
    """pyfuse3 request handlers over a ``Vfs``."""

    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, vfs: Vfs, stats: Stats | None = None) -> None:
        super().__init__()
        self.vfs = vfs
        self.stats = stats if stats is not None else vfs.stats

    def init(self) -> None:  # supervised workers take over the device here
        takeover.at_init()

    def _entry(self, attr: Attr) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = attr.ino
        e.generation = 0
        e.entry_timeout = CACHE_TIMEOUT
        e.attr_timeout = CACHE_TIMEOUT
        e.st_mode = attr.mode
        e.st_nlink = attr.nlink
        e.st_uid = attr.uid
        e.st_gid = attr.gid
        e.st_rdev = attr.rdev
        e.st_size = attr.size
        e.st_blksize = attr.blksize
        e.st_blocks = attr.blocks
        e.st_atime_ns = attr.mtime_ns
        e.st_mtime_ns = attr.mtime_ns
        e.st_ctime_ns = attr.mtime_ns
        return e

    # -- metadata -----------------------------------------------------------

    @errno_boundary
    async def lookup(
        self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        attr = self.vfs.lookup(parent_inode, name)
        if attr is None:  # a cached negative entry
            e = pyfuse3.EntryAttributes()
            e.st_ino = 0
            e.entry_timeout = CACHE_TIMEOUT
            return e
        return self._entry(attr)

    async def forget(self, inode_list: Sequence[tuple[pyfuse3.InodeT, int]]) -> None:
        """Inodes live as long as the bootstrap: nothing to count."""
        self.stats.fuse_requests["forget"] += 1

    @errno_boundary
    async def getattr(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return self._entry(self.vfs.getattr(inode))

    @errno_boundary
    async def readlink(self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext) -> bytes:
        return self.vfs.readlink(inode)

    @errno_boundary
    async def opendir(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.FileHandleT:
        self.vfs.opendir(inode)
        return inode

    @errno_boundary
    async def readdir(
        self, fh: pyfuse3.FileHandleT, start_id: int, token: pyfuse3.ReaddirToken
    ) -> None:
        for name, attr, cookie in self.vfs.readdir(fh, start_id):
            if not pyfuse3.readdir_reply(token, name, self._entry(attr), cookie):
                break

    async def releasedir(self, fh: pyfuse3.FileHandleT) -> None:
        self.stats.fuse_requests["releasedir"] += 1

    @errno_boundary
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        s = self.vfs.statfs()
        out = pyfuse3.StatvfsData()
        out.f_bsize = s.bsize
        out.f_frsize = s.frsize
        out.f_blocks = s.blocks
        out.f_bfree = s.bfree
        out.f_bavail = s.bavail
        out.f_files = s.files
        out.f_ffree = s.ffree
        out.f_favail = s.favail
        out.f_namemax = s.namemax
        return out

    @errno_boundary
    async def getxattr(
        self, inode: pyfuse3.InodeT, name: pyfuse3.XAttrNameT, ctx: pyfuse3.RequestContext
    ) -> bytes:
        return self.vfs.getxattr(inode, name)

    @errno_boundary
    async def listxattr(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext
    ) -> Sequence[pyfuse3.XAttrNameT]:
        return self.vfs.listxattr(inode)

    # -- data ---------------------------------------------------------------

    @errno_boundary
    async def open(
        self, inode: pyfuse3.InodeT, flags: pyfuse3.FlagT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.FileInfo:
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
            raise ReadOnlyError("the filesystem is read-only")
        self.vfs.open(inode)
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    @errno_boundary
    async def read(self, fh: pyfuse3.FileHandleT, off: int, size: int) -> bytes:
        return await self.vfs.read(fh, off, size)  # type: ignore[return-value]

    async def release(self, fh: pyfuse3.FileHandleT) -> None:
        self.stats.fuse_requests["release"] += 1

    async def flush(self, fh: pyfuse3.FileHandleT) -> None:
        self.stats.fuse_requests["flush"] += 1

    async def fsync(self, fh: pyfuse3.FileHandleT, datasync: bool) -> None:
        self.stats.fuse_requests["fsync"] += 1

    # -- everything that would change the filesystem ------------------------

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

