"""The blob filesystem of kernel mode: one flat read-only file per blob, no FUSE in sight.

In kernel mode the kernel mounts the bootstrap as EROFS and reads file data
from the image's *extra devices*, one per blob: device ``k + 1`` is the file
``blob k`` of this filesystem, and holds that blob's whole uncompressed
address space (every chunk at its 4 KiB-aligned uncompressed offset, zeros
between and after chunks). ``BlobFs`` answers the few questions the kernel
asks of it (a root directory with one file per blob, named by the blob's
index, ``0``, ``1``, ...) and serves reads through the same fetcher, cache and
sha256 checks as ``fused.vfs``: a read asks the fetcher for every chunk it
covers, then copies each chunk's part from the cache (verified, ``fused.cache``
rule 5), leaving zeros wherever no chunk of this bootstrap lies, so a byte the
bootstrap does not vouch for is never served.

Inode numbers: 1 is the root, ``2 + k`` is blob ``k``. The pyfuse3 adapter is
``fused.blobops``.
"""

from __future__ import annotations

import bisect
import stat
import time
from collections.abc import Iterator

from rafs.bootstrap import Bootstrap
from rafs.model import BLOCK_SIZE

from .errors import NoAttributeError, NoEntryError, NotDirectoryError
from .fetcher import Fetcher
from .stats import Stats
from .trace import ChunkTrace
from .vfs import NAME_MAX, ROOT_INO, Attr, StatFs

__all__ = ["BlobFs", "blob_file_name"]

FIRST_BLOB_INO = 2


def blob_file_name(index: int) -> str:
    """The name of blob ``index``'s file (device ``index + 1`` of the EROFS image)."""
    return str(index)


class BlobFs:
    """A read-only directory of blob address spaces whose data comes through ``fetcher``."""

    def __init__(self, bootstrap: Bootstrap, fetcher: Fetcher, stats: Stats | None = None,
                 trace: ChunkTrace | None = None) -> None:
        self.bootstrap = bootstrap
        self.blobs = bootstrap.blobs
        self.fetcher = fetcher
        self.cache = fetcher.cache
        self.stats = stats if stats is not None else fetcher.stats
        self.trace = trace if trace is not None else ChunkTrace()
        self.mtime_ns = bootstrap.sb.build_time * 1_000_000_000 + bootstrap.sb.build_time_nsec
        self._extents: dict[int, tuple[list[int], list[int]]] = {}

    # -- names and attributes -------------------------------------------------

    def _blob_index(self, ino: int) -> int:
        index = ino - FIRST_BLOB_INO
        if not 0 <= index < len(self.blobs):
            raise NoEntryError(f"no inode {ino}")
        return index

    def getattr(self, ino: int) -> Attr:
        if ino == ROOT_INO:
            return Attr(ino=ROOT_INO, mode=stat.S_IFDIR | 0o555, nlink=2, uid=0, gid=0, rdev=0,
                        size=0, blocks=0, blksize=BLOCK_SIZE, mtime_ns=self.mtime_ns)
        size = self.blobs[self._blob_index(ino)].uncompressed_size
        return Attr(ino=ino, mode=stat.S_IFREG | 0o444, nlink=1, uid=0, gid=0, rdev=0,
                    size=size, blocks=(size + 511) >> 9, blksize=BLOCK_SIZE,
                    mtime_ns=self.mtime_ns)

    def _require_root(self, ino: int) -> None:
        if ino != ROOT_INO:
            self._blob_index(ino)
            raise NotDirectoryError(f"inode {ino} is not a directory")

    def opendir(self, ino: int) -> None:
        self._require_root(ino)

    def lookup(self, parent: int, name: bytes) -> Attr | None:
        self._require_root(parent)
        if name in (b".", b".."):
            return self.getattr(ROOT_INO)
        if len(name) > NAME_MAX or not name.isdigit() or (name != b"0" and name[:1] == b"0"):
            return None
        index = int(name)
        return self.getattr(FIRST_BLOB_INO + index) if index < len(self.blobs) else None

    def readdir(self, ino: int, start: int = 0) -> Iterator[tuple[bytes, Attr, int]]:
        """(name, attributes, next cookie); the cookie of blob ``k`` is ``k + 1``."""
        self._require_root(ino)
        for index in range(start, len(self.blobs)):
            yield (blob_file_name(index).encode(), self.getattr(FIRST_BLOB_INO + index),
                   index + 1)

    def listxattr(self, ino: int) -> list[bytes]:
        self.getattr(ino)
        return []

    def getxattr(self, ino: int, name: bytes) -> bytes:
        self.getattr(ino)
        raise NoAttributeError(f"inode {ino} has no xattr {name!r}")

    def statfs(self) -> StatFs:
        blocks = sum(b.uncompressed_size // BLOCK_SIZE for b in self.blobs)
        return StatFs(bsize=BLOCK_SIZE, frsize=BLOCK_SIZE, blocks=blocks, bfree=0, bavail=0,
                      files=len(self.blobs) + 1, ffree=0, favail=0, namemax=NAME_MAX)

    def open(self, ino: int) -> None:
        self._blob_index(ino)

    # -- data -----------------------------------------------------------------

    def _chunks(self, blob: int) -> tuple[list[int], list[int]]:
        ext = self._extents.get(blob)
        if ext is None:
            ext = self._extents[blob] = self.bootstrap.blob_extents(blob)
        return ext

    def chunks_in(self, blob: int, offset: int, end: int) -> range:
        """Positions (in the blob's chunk list) of the chunks overlapping [offset, end)."""
        offsets, sizes = self._chunks(blob)
        lo = bisect.bisect_right(offsets, offset) - 1
        if lo < 0 or offsets[lo] + sizes[lo] <= offset:
            lo += 1
        hi = bisect.bisect_left(offsets, end)
        return range(lo, hi)

    async def read(self, ino: int, offset: int, size: int) -> bytes | bytearray:
        """Up to ``size`` bytes of a blob's address space at ``offset``."""
        started = time.perf_counter()
        try:
            return await self._read(ino, offset, size)
        finally:
            self.stats.read_latency(time.perf_counter() - started)

    async def _read(self, ino: int, offset: int, size: int) -> bytes | bytearray:
        stats = self.stats
        stats.read_requests += 1
        blob = self._blob_index(ino)
        end = min(offset + size, self.blobs[blob].uncompressed_size)
        if offset >= end:
            return b""
        positions = self.chunks_in(blob, offset, end)
        first = self.blobs[blob].chunk_start
        indices = [first + k for k in positions]
        trace = self.trace
        for index in indices:
            trace.touch(index)
        deadline = self.fetcher.deadline()  # one for the whole request (fused.fetcher)
        await self.fetcher.ensure(indices, deadline)
        offsets, sizes = self._chunks(blob)
        cache = self.cache
        if len(positions) == 1:  # the common case: one chunk covers it all, one pread
            k = positions[0]
            if offsets[k] <= offset and end <= offsets[k] + sizes[k]:
                index = first + k  # verified reads (fused.cache rule 5)
                data = cache.read(index, offset - offsets[k], end - offset)
                if data is None:
                    data = await self.fetcher.read(index, offset - offsets[k], end - offset,
                                                   deadline)
                stats.read_bytes += len(data)
                return data
        # What no chunk covers stays zero: gaps, block padding, other images' chunks.
        # In the trio thread, as fuse mode does: on this 2-core class of host a
        # worker thread per 1 MiB read made reads slower (measured), not faster.
        buf = bytearray(end - offset)
        view = memoryview(buf)
        for k in positions:
            a, b = max(offset, offsets[k]), min(end, offsets[k] + sizes[k])
            if a >= b:
                continue
            part = view[a - offset:b - offset]
            if not cache.readinto(first + k, a - offsets[k], part):
                await self.fetcher.readinto(first + k, a - offsets[k], part, deadline)
        stats.read_bytes += len(buf)
        return buf
