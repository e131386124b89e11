"""The pyfuse3 adapter both modes share: requests in, a filesystem model out, always an answer.

``BaseOperations`` holds every request handler and the error boundary;
``fused.fuseops.Operations`` (fuse mode, over ``fused.vfs.Vfs``) and
``fused.blobops.BlobOperations`` (kernel mode's blob files, over
``fused.blobfs.BlobFs``) are thin subclasses that only say how files are
opened and which mount options they use. Adapters translate types; they hold
no logic.

The error boundary (``errno_boundary``) wraps every handler pyfuse3 can call:
a request is counted, and any exception below it becomes a ``FUSEError``
whose errno comes from ``rafs.errors.to_errno`` (the only errno mapping of the
daemon). An exception that is neither a ``RafsError`` nor an ``OSError`` is a
bug or an input nothing checked: it is logged with its traceback, counted in
``Stats.internal_errors`` and answered with EIO. pyfuse3 itself answers only
``FUSEError``: anything else would leave the request unanswered (the reader
stuck in ``request_wait_answer``) and end the main loop. ``forget`` has no
reply, so its boundary logs and swallows. Together with the deadlines of
``fused.fetcher`` this is why every request gets an answer in bounded time.

``init`` is the one handler that is not a request: libfuse calls it while it
answers FUSE_INIT, before any request is read. A supervised worker takes over
its FUSE device there (``fused.takeover.at_init``, which exits the process if
that fails, so that the supervisor starts another worker: a worker that cannot
serve answers nothing, and the kernel keeps its requests for the next one).

Kernel caching: the image never changes while mounted, so entries, negative
lookups and attributes are cached for a day. The filesystem is read-only:
every modifying request is answered with EROFS (the ``ro`` mount option
already stops most of them in the kernel).
"""

from __future__ import annotations

import errno
import functools
import logging
import os
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from typing import Any, ClassVar, ParamSpec, Protocol, TypeVar

import pyfuse3

from rafs.errors import RafsError, to_errno

from . import takeover
from .errors import ReadOnlyError
from .stats import Stats
from .vfs import Attr, StatFs

__all__ = ["CACHE_TIMEOUT", "BaseOperations", "FsModel", "errno_boundary", "read_only"]

log = logging.getLogger(__name__)

CACHE_TIMEOUT = 86400.0

P = ParamSpec("P")
R = TypeVar("R")


class FsModel(Protocol):
    """What an adapter needs of a filesystem model (``Vfs`` or ``BlobFs``)."""

    stats: Stats

    def lookup(self, parent: int, name: bytes) -> Attr | None: ...
    def getattr(self, ino: int) -> Attr: ...
    def opendir(self, ino: int) -> object: ...
    def readdir(self, ino: int, start: int = 0) -> Iterator[tuple[bytes, Attr, int]]: ...
    def statfs(self) -> StatFs: ...
    def getxattr(self, ino: int, name: bytes) -> bytes: ...
    def listxattr(self, ino: int) -> list[bytes]: ...
    def open(self, ino: int) -> object: ...
    async def read(self, ino: int, offset: int, size: int) -> bytes | bytearray: ...


def _answer(stats: Stats, name: str, e: Exception) -> int:
    """Log and count ``e`` raised by handler ``name``; the errno to answer with."""
    code = to_errno(e)
    if not isinstance(e, RafsError | OSError):
        stats.internal_errors += 1
        log.exception("%s failed unexpectedly", name)
    elif code == errno.EIO:
        log.warning("%s: %s", name, e)
    if code == errno.EIO:
        stats.errors += 1
    return code


def errno_boundary(
    fn: Callable[P, Coroutine[Any, Any, R]],
) -> Callable[P, Coroutine[Any, Any, R]]:
    """Count the request and turn any exception into a FUSEError (see the module
    docstring). The first argument must be an adapter with a ``stats`` attribute."""
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
            raise pyfuse3.FUSEError(_answer(stats, name, e)) from None

    return wrapper


def _no_reply_boundary(
    fn: Callable[P, Coroutine[Any, Any, None]],
) -> Callable[P, Coroutine[Any, Any, None]]:
    """For requests the kernel expects no answer to (forget): count, log, never raise."""
    name = fn.__name__

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> None:
        stats: Stats = args[0].stats  # type: ignore[attr-defined]
        stats.fuse_requests[name] += 1
        try:
            await fn(*args, **kwargs)
        except Exception as e:
            _answer(stats, name, e)

    return wrapper


def read_only(*_: Any, **__: Any) -> Awaitable[Any]:
    async def refuse() -> Any:
        raise pyfuse3.FUSEError(ReadOnlyError.errno)

    return refuse()


class BaseOperations(pyfuse3.Operations):
    """pyfuse3 request handlers over an ``FsModel``; subclasses say how files open."""

    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    #: how ``open`` answers: keep the page cache across opens, or bypass it
    keep_cache: ClassVar[bool] = False
    direct_io: ClassVar[bool] = False

    def __init__(self, fs: FsModel, stats: Stats | None = None) -> None:
        super().__init__()
        self.fs = fs
        self.stats = stats if stats is not None else fs.stats

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
        e.st_rdev = attr.rdev
        e.st_size = attr.size
        e.st_blksize = attr.blksize
        e.st_blocks = attr.blocks
        e.st_atime_ns = attr.mtime_ns
        e.st_mtime_ns = attr.mtime_ns
        e.st_ctime_ns = attr.mtime_ns
        return e

    def init(self) -> None:
        """libfuse answers FUSE_INIT now: a supervised worker takes over its device."""
        takeover.at_init()

    # -- metadata -----------------------------------------------------------

    @errno_boundary
    async def lookup(
        self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        attr = self.fs.lookup(parent_inode, name)
        if attr is None:  # a cached negative entry
            e = pyfuse3.EntryAttributes()
            e.st_ino = 0
            e.entry_timeout = CACHE_TIMEOUT
            return e
        return self._entry(attr)

    @_no_reply_boundary
    async def forget(self, inode_list: Sequence[tuple[pyfuse3.InodeT, int]]) -> None:
        """Inodes live as long as the bootstrap: nothing to count."""

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

    @errno_boundary
    async def releasedir(self, fh: pyfuse3.FileHandleT) -> None:
        pass

    @errno_boundary
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        s = self.fs.statfs()
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
        return self.fs.getxattr(inode, name)

    @errno_boundary
    async def listxattr(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext
    ) -> Sequence[pyfuse3.XAttrNameT]:
        return self.fs.listxattr(inode)  # type: ignore[return-value]

    # -- data ---------------------------------------------------------------

    @errno_boundary
    async def open(
        self, inode: pyfuse3.InodeT, flags: pyfuse3.FlagT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.FileInfo:
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
            raise ReadOnlyError("the filesystem is read-only")
        self.fs.open(inode)
        return pyfuse3.FileInfo(fh=inode, keep_cache=self.keep_cache, direct_io=self.direct_io)

    @errno_boundary
    async def read(self, fh: pyfuse3.FileHandleT, off: int, size: int) -> bytes:
        return await self.fs.read(fh, off, size)  # type: ignore[return-value]

    @errno_boundary
    async def release(self, fh: pyfuse3.FileHandleT) -> None:
        pass

    @errno_boundary
    async def flush(self, fh: pyfuse3.FileHandleT) -> None:
        pass

    @errno_boundary
    async def fsync(self, fh: pyfuse3.FileHandleT, datasync: bool) -> None:
        pass

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
