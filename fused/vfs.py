"""The filesystem model over a bootstrap, with no FUSE in sight.

``Vfs`` answers every question the kernel may ask of a read-only filesystem
(attributes, lookup, readdir, readlink, xattrs, statfs, read) in terms of
inode numbers, and raises ``FusedError`` subclasses (which carry their errno).
It can be driven from tests inside ``trio.run`` without a kernel; the FUSE
adapter (``fused.fuseops`` on ``fused.adapter``) only translates types.

Inode numbers are derived from EROFS nids so they are stable across mounts and
daemons: FUSE requires the root to be inode 1, so

- when the root is nid 0: ``ino = nid + 1``;
- otherwise (the rafs builder puts the root at nid 1): ``ino = nid``, with the
  root and nid 1 swapped when the root is elsewhere. This matches ``st_ino`` of
  a kernel EROFS mount of the same bootstrap. nid 0 is then not addressable
  (the builder never uses that slot) and is reported as a corrupt bootstrap.

Reads ask the fetcher to make the chunks they cover ready, then read them from
the cache, which verifies every byte it returns (``fused.cache`` rule 5; a
chunk that fails is fetched again); holes read as zeros; reads are clamped to
the file size.
"""

from __future__ import annotations

import functools
import stat
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from rafs.bootstrap import Bootstrap, Inode
from rafs.errors import FormatError
from rafs.model import BLOCK_SIZE

from .cache import ChunkCache
from .errors import (
    NoAttributeError,
    NoEntryError,
    NotASymlinkError,
    NotDirectoryError,
)
from .fetcher import Fetcher
from .readlog import ReadLog
from .stats import Stats
from .trace import AccessTrace

__all__ = ["ROOT_INO", "Attr", "StatFs", "Vfs"]

ROOT_INO = 1
NAME_MAX = 255


@dataclass(frozen=True, slots=True)
class Attr:
    """What ``stat`` shows for one inode."""

    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    size: int
    blocks: int  # 512-byte units
    blksize: int
    mtime_ns: int  # also used for atime and ctime


@dataclass(frozen=True, slots=True)
class StatFs:
    bsize: int
    frsize: int
    blocks: int
    bfree: int
    bavail: int
    files: int
    ffree: int
    favail: int
    namemax: int


class Vfs:
    """A read-only filesystem over ``bootstrap`` whose file data comes through ``fetcher``."""

    def __init__(self, bootstrap: Bootstrap, fetcher: Fetcher, stats: Stats | None = None,
                 trace: AccessTrace | None = None) -> None:
        self.bootstrap = bootstrap
        self.trace = trace if trace is not None else AccessTrace(chunk_size=bootstrap.chunk_size)
        self.fetcher = fetcher
        self.cache: ChunkCache = fetcher.cache
        self.stats = stats if stats is not None else fetcher.stats
        self.chunk_size = bootstrap.chunk_size
        self.root_nid = bootstrap.root_nid
        self._inode = functools.lru_cache(maxsize=1 << 16)(bootstrap.inode)
        self._file_chunks = functools.lru_cache(maxsize=1 << 12)(self._load_chunks)
        self._xattrs = functools.lru_cache(maxsize=1 << 12)(self._load_xattrs)
        self.readlog = ReadLog.from_env()  # RAFS_READ_LOG: a debug log of every read

    # -- inode numbers ------------------------------------------------------

    def ino(self, nid: int) -> int:
        root = self.root_nid
        if root == 0:
            return nid + 1
        if nid == root:
            return ROOT_INO
        if nid == ROOT_INO:
            return root
        if nid == 0:
            raise FormatError("an entry names nid 0, which is not an inode here")
        return nid

    def nid(self, ino: int) -> int:
        root = self.root_nid
        if root == 0:
            return ino - 1
        if ino == ROOT_INO:
            return root
        if ino == root:
            return ROOT_INO
        return ino

    def inode(self, ino: int) -> Inode:
        if ino < 1:
            raise NoEntryError(f"no inode {ino}")
        return self._inode(self.nid(ino))

    # -- metadata -----------------------------------------------------------

    def attr_of(self, node: Inode) -> Attr:
        return Attr(
            ino=self.ino(node.nid),
            mode=node.mode,
            nlink=node.nlink,
            uid=node.uid,
            gid=node.gid,
            rdev=node.rdev,
            size=node.size,
            blocks=(node.size + 511) >> 9,
            blksize=BLOCK_SIZE,
            mtime_ns=node.mtime * 1_000_000_000 + node.mtime_nsec,
        )

    def getattr(self, ino: int) -> Attr:
        return self.attr_of(self.inode(ino))

    def opendir(self, ino: int) -> Inode:
        node = self.inode(ino)
        if not stat.S_ISDIR(node.mode):
            raise NotDirectoryError(f"inode {ino} is not a directory")
        return node

    def lookup(self, parent: int, name: bytes) -> Attr | None:
        """Attributes of ``name`` in directory ``parent``, or None if absent."""
        node = self.opendir(parent)
        if name == b".":
            return self.attr_of(node)
        if len(name) > NAME_MAX:
            return None
        nid = self.bootstrap.lookup(node, name)
        if nid is None:
            if name == b"..":  # a bootstrap without dot entries: the root is its own parent
                return self.attr_of(self._inode(self.root_nid)) if parent == ROOT_INO else None
            return None
        return self.attr_of(self._inode(nid))

    def readdir(self, ino: int, start: int = 0) -> Iterator[tuple[bytes, Attr, int]]:
        """(name, attributes, next cookie) of the entries after cookie ``start``."""
        node = self.opendir(ino)
        for name, nid, cookie in self.bootstrap.readdir(node, start):
            yield name, self.attr_of(self._inode(nid)), cookie

    def readlink(self, ino: int) -> bytes:
        node = self.inode(ino)
        if not stat.S_ISLNK(node.mode):
            raise NotASymlinkError(f"inode {ino} is not a symlink")
        self.trace.touch(node.nid)
        return self.bootstrap.readlink(node)

    def _load_xattrs(self, nid: int) -> dict[bytes, bytes]:
        return self.bootstrap.xattrs(self._inode(nid))

    def listxattr(self, ino: int) -> list[bytes]:
        return list(self._xattrs(self.inode(ino).nid))

    def getxattr(self, ino: int, name: bytes) -> bytes:
        try:
            return self._xattrs(self.inode(ino).nid)[name]
        except KeyError:
            raise NoAttributeError(f"inode {ino} has no xattr {name!r}") from None

    def statfs(self) -> StatFs:
        """Like a kernel EROFS mount: metadata blocks plus every blob's data blocks."""
        b = self.bootstrap
        blocks = b.blocks + sum(blob.uncompressed_size // BLOCK_SIZE for blob in b.blobs)
        return StatFs(
            bsize=BLOCK_SIZE, frsize=BLOCK_SIZE, blocks=blocks, bfree=0, bavail=0,
            files=b.inode_count, ffree=0, favail=0, namemax=NAME_MAX,
        )

    # -- data ---------------------------------------------------------------

    def _load_chunks(self, nid: int) -> list[int | None]:
        return self.bootstrap.file_chunks(self._inode(nid))

    def chunks_of_nids(self, nids: Iterable[int]) -> Iterator[int]:
        """Chunk indices of these files, and of every file below these directories, in order."""
        seen: set[int] = set()
        queue = list(nids)
        while queue:
            nid = queue.pop(0)
            if nid in seen:
                continue
            seen.add(nid)
            node = self._inode(nid)
            if stat.S_ISREG(node.mode):
                yield from (i for i in self._file_chunks(nid) if i is not None)
            elif stat.S_ISDIR(node.mode):
                queue.extend(child for _, child, _ in self.bootstrap.readdir(node))

    def open(self, ino: int) -> Inode:
        """Check that ``ino`` exists and trace the access; reads need no per-open state."""
        node = self.inode(ino)
        self.trace.touch(node.nid)
        return node

    async def read(self, ino: int, offset: int, size: int) -> bytes | bytearray:
        """Up to ``size`` bytes at ``offset``; short only at end of file."""
        started = time.perf_counter()
        try:
            return await self._read(ino, offset, size)
        finally:
            self.stats.read_latency(time.perf_counter() - started)

    async def _read(self, ino: int, offset: int, size: int) -> bytes | bytearray:
        stats = self.stats
        stats.read_requests += 1
        node = self.inode(ino)
        if not stat.S_ISREG(node.mode):
            raise NoEntryError(f"inode {ino} is not a regular file")
        if self.readlog is not None:
            self.readlog.file_read(node.nid, offset, size)
        end = min(offset + size, node.size)
        if offset >= end:
            return b""
        self.trace.read(node.nid, offset, end)
        cs = self.chunk_size
        first, last = offset // cs, (end - 1) // cs
        table = self._file_chunks(node.nid)
        if first == last:  # the common case: one chunk, one pread, no copies
            index = table[first]
            if index is None:
                data: bytes | bytearray = bytes(end - offset)
            else:  # verified reads (fused.cache rule 5); None: not ready, or it went bad
                got = self.cache.read(index, offset - first * cs, end - offset)
                if got is None:  # within answer_bound, whatever it takes
                    got = await self.fetcher.read(index, offset - first * cs, end - offset)
                else:
                    stats.cache_hits += 1
                    self.fetcher.hit(index)  # a speculated chunk read: fused.fetcher
                stats.coverage.read(index, offset - first * cs, end - offset)
                data = got
            stats.read_bytes += len(data)
            return data
        indices = [i for i in table[first : last + 1] if i is not None]
        deadline = self.fetcher.deadline()  # one for the whole request (fused.fetcher)
        await self.fetcher.ensure(indices, deadline)
        buf = bytearray(end - offset)
        view = memoryview(buf)
        pos = offset
        while pos < end:
            k = pos // cs
            stop = min((k + 1) * cs, end)
            index = table[k]
            if index is not None:  # holes stay zero
                part = view[pos - offset : stop - offset]
                if not self.cache.readinto(index, pos - k * cs, part):
                    await self.fetcher.readinto(index, pos - k * cs, part, deadline)
                stats.coverage.read(index, pos - k * cs, stop - pos)
            pos = stop
        stats.read_bytes += len(buf)
        return buf
