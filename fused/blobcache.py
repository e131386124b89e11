"""The two cache files of one blob: the sparse data file and its bitmap, with their locks.

The layout and the locking rules they follow are written down in
``fused.cache`` (rules 1-8); this module implements the per-blob half:

- ``BlobCache`` opens (or creates) ``<hex>.data`` and ``<hex>.map``, maps the
  bitmap, and for a *user* (a daemon serving an image that has this blob, or
  reading a chunk of it for dedup) holds a shared ``flock`` on the data file
  for as long as it is open: the in-use mark garbage collection respects
  (rule 7). The kernel drops it when the process dies, so it cannot go stale.
- bitmap read-modify-writes, commits and evictions take the exclusive
  ``flock`` on the map file plus the blob's thread lock (rule 3);
- the map header carries an *eviction generation* that every eviction bumps
  after punching; a writer reads it before its pwrite and, at commit, re-checks
  its data against its xxh3 when it moved (rule 6).

Map header (32 bytes, little endian): magic ``RAFSCMAP``, version (2), block
shift (12), eviction generation (u64), reserved (u64); then one bit per 4 KiB
block, LSB first. A version 1 map (16-byte header, no generation) is migrated
in place under the lock.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import mmap
import os
import re
import struct
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import xxhash

from rafs.model import BLOCK_BITS, BLOCK_SIZE, Blob

from .errors import CacheError

__all__ = [
    "HEADER_SIZE",
    "BlobCache",
    "blob_base",
    "blob_digests",
    "digest_path",
    "punch_hole",
]

log = logging.getLogger(__name__)

MAP_MAGIC = b"RAFSCMAP"
MAP_VERSION = 2
_MAP_HEADER = struct.Struct("<8sIIQQ")  # magic, version, block shift, eviction gen, reserved
HEADER_SIZE = _MAP_HEADER.size
_GEN = slice(16, 24)
_V1_HEADER = struct.Struct("<8sII")
_NONZERO = re.compile(rb"[^\x00]+")
_DIGEST_RE = re.compile(r"^([a-z0-9]+(?:[+._-][a-z0-9]+)*):([a-zA-Z0-9=_-]+)$")

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Deallocate [offset, offset+length) of a file, keeping its size (reads give zeros)."""
    if length <= 0:
        return
    if _libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length):
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def digest_path(root: Path, kind: str, digest: str) -> Path:
    m = _DIGEST_RE.match(digest)
    if m is None:
        raise CacheError(f"invalid digest {digest!r}")
    return root / kind / m.group(1) / m.group(2)


def blob_base(root: Path, digest: str) -> Path:
    """``blobs/<alg>/<hex>``: add ``.data`` or ``.map``."""
    return digest_path(root, "blobs", digest)


def blob_digests(root: Path) -> Iterator[str]:
    """Digests of every blob with a data file in the cache."""
    top = root / "blobs"
    try:
        algs = sorted(os.listdir(top))
    except FileNotFoundError:
        return
    for alg in algs:
        try:
            names = sorted(os.listdir(top / alg))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for name in names:
            if name.endswith(".data") and not name.startswith("."):
                yield f"{alg}:{name.removesuffix('.data')}"


def _map_size(uncompressed_size: int) -> int:
    blocks = (uncompressed_size + BLOCK_SIZE - 1) >> BLOCK_BITS
    return HEADER_SIZE + max(1, (blocks + 7) >> 3)


def block_end(offset: int, size: int) -> int:
    """End of the last 4 KiB block of [offset, offset+size): what a chunk occupies."""
    return (offset + size + BLOCK_SIZE - 1) & ~(BLOCK_SIZE - 1)


class BlobCache:
    """The two cache files of one blob, open for the owner's lifetime.

    ``blob`` given: the files are created, validated and extended to the blob's
    size. ``BlobCache.existing`` opens files that are there, as they are (for
    dedup sources, evictors and tools). ``use`` takes the in-use lock.
    """

    def __init__(self, root: Path, blob: Blob | None, *, digest: str | None = None,
                 use: bool = True, create: bool = True) -> None:
        self.digest = blob.digest if blob is not None else str(digest)
        base = blob_base(Path(root), self.digest)
        self.data_path = base.with_name(base.name + ".data")
        self.map_path = base.with_name(base.name + ".map")
        self._lock = threading.Lock()
        self._mm: mmap.mmap | None = None
        self.data_fd = self.map_fd = -1
        try:
            self._open(create, use)
        except OSError as e:
            self._close_fds()
            if not create and e.errno == errno.ENOENT:
                raise FileNotFoundError(e.errno, e.strerror, str(self.data_path)) from None
            raise CacheError(f"cache for blob {self.digest}: {e.strerror}: {base}") from None
        try:
            with self._locked():
                if blob is not None:
                    self._prepare(blob.uncompressed_size)
                elif not self._header_ok():
                    raise CacheError(f"cache bitmap of blob {self.digest} has a bad header")
                size = os.fstat(self.map_fd).st_size
            self._mm = mmap.mmap(self.map_fd, size, mmap.MAP_SHARED,
                                 mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as e:
            self._close_fds()
            raise CacheError(f"cache for blob {self.digest}: {e.strerror}: {base}") from None
        except BaseException:
            self._close_fds()
            raise
        self._bits = (size - HEADER_SIZE) * 8

    @classmethod
    def existing(cls, root: Path, digest: str, *, use: bool = False) -> BlobCache | None:
        """The blob's files as they are, or None if they are missing or unusable."""
        try:
            return cls(root, None, digest=digest, use=use, create=False)
        except FileNotFoundError:
            return None
        except CacheError as e:
            log.debug("%s", e)
            return None

    def _open(self, create: bool, use: bool) -> None:
        flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0)
        if create:
            self.data_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        for _attempt in range(20):
            self.data_fd = os.open(self.data_path, flags, 0o600)
            self.map_fd = os.open(self.map_path, flags, 0o600)
            if not use:
                return
            fcntl.flock(self.data_fd, fcntl.LOCK_SH)  # rule 7: in use while open
            # The garbage collector may have removed the files between open and lock
            # (it unlinks them under LOCK_EX): then open them again.
            try:
                if (os.fstat(self.data_fd).st_ino == os.stat(self.data_path).st_ino
                        and os.fstat(self.map_fd).st_ino == os.stat(self.map_path).st_ino):
                    return
            except FileNotFoundError:
                if not create:
                    raise
            self._close_fds()
        raise OSError(errno.EAGAIN, "the cache files keep being removed")

    def _close_fds(self) -> None:
        for fd in (self.data_fd, self.map_fd):
            if fd >= 0:
                os.close(fd)
        self.data_fd = self.map_fd = -1

    def _locked(self) -> _Locked:
        return _Locked(self._lock, self.map_fd)

    def _header_ok(self) -> bool:
        head = os.pread(self.map_fd, HEADER_SIZE, 0)
        if len(head) != HEADER_SIZE:
            return False
        magic, version, shift, _gen, _ = _MAP_HEADER.unpack(head)
        return (magic, version, shift) == (MAP_MAGIC, MAP_VERSION, BLOCK_BITS)

    def _prepare(self, uncompressed_size: int) -> None:
        """Create, validate, migrate or extend both files; called under the lock."""
        want = _map_size(uncompressed_size)
        head = os.pread(self.map_fd, HEADER_SIZE, 0)
        if len(head) >= _V1_HEADER.size and not self._header_ok():
            magic, version, shift = _V1_HEADER.unpack(head[:_V1_HEADER.size])
            if (magic, version, shift) == (MAP_MAGIC, 1, BLOCK_BITS):
                bits = os.pread(self.map_fd, 1 << 30, _V1_HEADER.size)
                os.pwrite(self.map_fd, _MAP_HEADER.pack(MAP_MAGIC, MAP_VERSION, BLOCK_BITS, 0, 0)
                          + bits, 0)
                log.info("cache bitmap of %s migrated to version %d", self.digest, MAP_VERSION)
            else:
                log.warning("cache bitmap of %s has a bad header; resetting it", self.digest)
                head = b""
        if len(head) < _V1_HEADER.size:
            # A new (or reset) bitmap: whatever the data file holds is unaccounted for.
            os.ftruncate(self.map_fd, 0)
            os.pwrite(self.map_fd, _MAP_HEADER.pack(MAP_MAGIC, MAP_VERSION, BLOCK_BITS, 0, 0), 0)
            if os.fstat(self.data_fd).st_blocks:
                os.ftruncate(self.data_fd, 0)
        if os.fstat(self.map_fd).st_size < want:
            os.ftruncate(self.map_fd, want)
        if os.fstat(self.data_fd).st_size < uncompressed_size:
            os.ftruncate(self.data_fd, uncompressed_size)

    # -- bits --------------------------------------------------------------------

    def _span(self, offset: int, size: int) -> tuple[int, int]:
        first = offset >> BLOCK_BITS
        last = (offset + max(size, 1) + BLOCK_SIZE - 1) >> BLOCK_BITS
        if last > self._bits:
            raise CacheError(f"chunk at {offset} lies outside blob {self.digest}")
        return first, last - first

    def has(self, offset: int, size: int) -> bool:
        """Whether every block of [offset, offset+size) is marked present (rule 4)."""
        first, n = self._span(offset, size)
        lo = HEADER_SIZE + (first >> 3)
        hi = HEADER_SIZE + ((first + n - 1) >> 3) + 1
        assert self._mm is not None
        value = int.from_bytes(self._mm[lo:hi], "little") >> (first & 7)
        full = (1 << n) - 1
        return value & full == full

    def any_set(self) -> bool:
        assert self._mm is not None
        return self._mm[HEADER_SIZE:].strip(b"\0") != b""

    def set_ranges(self) -> list[tuple[int, int]]:
        """(offset, size) runs of blocks marked present, in blob offsets."""
        assert self._mm is not None
        raw = self._mm[HEADER_SIZE:]
        out: list[tuple[int, int]] = []
        for m in _NONZERO.finditer(raw):
            value = int.from_bytes(m.group(), "little")
            block = m.start() * 8
            while value:
                low = (value & -value).bit_length() - 1  # trailing zeros
                value >>= low
                block += low
                run = (~value & (value + 1)).bit_length() - 1  # trailing ones
                if out and out[-1][0] + out[-1][1] == block << BLOCK_BITS:
                    out[-1] = (out[-1][0], out[-1][1] + (run << BLOCK_BITS))
                else:
                    out.append((block << BLOCK_BITS, run << BLOCK_BITS))
                value >>= run
                block += run
        return out

    def _update(self, offset: int, size: int, present: bool) -> None:
        first, n = self._span(offset, size)
        lo = HEADER_SIZE + (first >> 3)
        hi = HEADER_SIZE + ((first + n - 1) >> 3) + 1
        mask = ((1 << n) - 1) << (first & 7)
        assert self._mm is not None
        value = int.from_bytes(self._mm[lo:hi], "little")
        value = value | mask if present else value & ~mask
        self._mm[lo:hi] = value.to_bytes(hi - lo, "little")

    @property
    def span(self) -> int:
        """Bytes of address space the bitmap covers."""
        return self._bits << BLOCK_BITS

    def update_locked(self, offset: int, size: int, present: bool) -> None:
        """Set or clear the bits of one extent; the caller holds ``locked()``."""
        self._update(offset, size, present)

    def mark(self, extents: Sequence[tuple[int, int]], present: bool = True) -> None:
        """Set (or clear) the bits of (offset, size) extents, under the lock (rule 3)."""
        with self._locked():
            for offset, size in extents:
                self._update(offset, size, present)

    def generation(self) -> int:
        """The eviction generation, read without the lock (rule 6: read before a pwrite)."""
        assert self._mm is not None
        return int.from_bytes(self._mm[_GEN], "little")

    # -- commits and evictions (rules 2, 3, 6) ----------------------------------------

    def commit(self, extents: Sequence[tuple[int, int, int, int]]) -> list[bool]:
        """Set the bits of (offset, size, xxh3, generation at write) extents whose data
        is durable; an extent written before an eviction that may have punched it is
        checked against its xxh3 first, and left unset if it fails."""
        out = []
        with self._locked():
            gen = self.generation()
            for offset, size, xxh3, written_at in extents:
                if written_at != gen and not self._data_ok(offset, size, xxh3):
                    out.append(False)
                    continue
                self._update(offset, size, True)
                out.append(True)
        return out

    def _data_ok(self, offset: int, size: int, xxh3: int) -> bool:
        data = os.pread(self.data_fd, size, offset)
        return len(data) == size and xxhash.xxh3_64_intdigest(data) == xxh3

    def evict(self, extents: Sequence[tuple[int, int]]) -> int:
        """Clear the bits of (offset, size) extents, punch their blocks out of the data
        file, then bump the generation, all under the lock. Returns bytes freed."""
        with self._locked():
            before = os.fstat(self.data_fd).st_blocks
            for offset, size in extents:
                self._update(offset, size, False)
            try:
                for offset, size in extents:
                    punch_hole(self.data_fd, offset, block_end(offset, size) - offset)
            finally:
                self._bump()
            after = os.fstat(self.data_fd).st_blocks
        return max(0, before - after) * 512

    def punch(self, offset: int, length: int) -> None:
        """Deallocate blocks no bit covers (a failed write's, an orphan's), under the lock."""
        with self._locked():
            try:
                punch_hole(self.data_fd, offset, length)
            finally:
                self._bump()

    def _bump(self) -> None:
        assert self._mm is not None
        self._mm[_GEN] = ((self.generation() + 1) & ((1 << 64) - 1)).to_bytes(8, "little")

    def locked(self) -> _Locked:
        """The rule-3 lock, for callers that check and change several things at once."""
        return self._locked()

    def allocated(self) -> int:
        """Bytes the data file occupies on disk."""
        return os.fstat(self.data_fd).st_blocks * 512

    def sync_data(self) -> None:
        os.fdatasync(self.data_fd)

    def close(self) -> None:
        if self._mm is not None:
            try:
                self._mm.flush()
            finally:
                self._mm.close()
                self._mm = None
        self._close_fds()


class _Locked:
    """Thread lock plus an exclusive flock on the bitmap file (rule 3)."""

    __slots__ = ("_fd", "_lock")

    def __init__(self, lock: threading.Lock, fd: int) -> None:
        self._lock, self._fd = lock, fd

    def __enter__(self) -> None:
        self._lock.acquire()
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        except BaseException:
            self._lock.release()
            raise

    def __exit__(self, *exc: object) -> None:
        try:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            self._lock.release()
