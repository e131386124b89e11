"""The chunk cache: verified, uncompressed chunk data on local disk, per blob.

Layout under the cache directory (shared by every daemon on the host, kept
across restarts)::

    blobs/<alg>/<hex>.data       sparse file: the blob's uncompressed address
                                 space; a chunk lives at its uncompressed_offset
    blobs/<alg>/<hex>.map        bitmap: 16-byte header (magic, version, block
                                 shift) then one bit per 4 KiB block of the
                                 address space, LSB first; a chunk is present
                                 when every block it covers has its bit set
    bootstraps/<alg>/<hex>       verified raw bootstraps, named by the digest of
                                 their uncompressed bytes
    bootstraps/<alg>/<hex>.validated  written by ``rafs.bootstrap``: this file
                                 passed the bootstrap validator (and fsck.erofs)

The bitmap is indexed by block of the blob's own address space, not by chunk
table index: chunk tables are per bootstrap and two images sharing a blob (a
chunk dictionary) may number its chunks differently, while uncompressed
offsets belong to the blob.

Rules (the cache is correct under any interleaving of any number of daemons):

1. Only verified bytes are written: the fetcher checks sha256 before ``store``.
   Two writers of one chunk write identical bytes, so data writes take no lock.
2. Data is durable before its bits are set: ``store`` pwrites, the committer
   task fdatasyncs the data file (one fdatasync covers every write queued
   before it: group commit), and only then sets the bits. After a crash, a set
   bit always means durable data; a lost bit only costs a refetch.
3. Every read-modify-write of bitmap bytes, and creating, extending or
   resetting a blob's files, happens with an exclusive ``fcntl.flock`` on the
   ``.map`` file while holding the blob's ``threading.Lock``. flock belongs to
   the open file, so it excludes other daemons and also a second cache over
   the same directory in this process; the thread lock excludes this
   daemon's worker threads, which share the open file.
4. Readers of bits take no lock: a byte is read whole, and a bit seen unset
   only costs a refetch.
5. A daemon checks a chunk's xxh3 the first time it finds it in the bitmap; on
   a mismatch it clears the bits (rule 3) and the chunk is fetched again.
   Chunks this daemon wrote or checked are remembered in ``_good`` (touched
   only from the trio thread) and later hits cost one pread and nothing more.
6. Nothing evicts or punches holes yet; an evictor must follow rule 3 and may
   only clear bits of chunks no daemon is reading (see DESIGN.md).
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import logging
import mmap
import os
import re
import struct
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import trio

from rafs.codec import check_xxh3
from rafs.errors import FormatError
from rafs.model import BLOCK_BITS, BLOCK_SIZE, Blob, Chunk

from .errors import CacheError
from .stats import Stats

__all__ = ["BlobCache", "ChunkCache", "cached_bootstrap", "store_bootstrap"]

log = logging.getLogger(__name__)

MAP_MAGIC = b"RAFSCMAP"
MAP_VERSION = 1
_MAP_HEADER = struct.Struct("<8sII")  # magic, version, block shift
HEADER_SIZE = _MAP_HEADER.size
_DIGEST_RE = re.compile(r"^([a-z0-9]+(?:[+._-][a-z0-9]+)*):([a-zA-Z0-9=_-]+)$")


def _digest_path(root: Path, kind: str, digest: str) -> Path:
    m = _DIGEST_RE.match(digest)
    if m is None:
        raise CacheError(f"invalid digest {digest!r}")
    return root / kind / m.group(1) / m.group(2)


def _map_size(uncompressed_size: int) -> int:
    blocks = (uncompressed_size + BLOCK_SIZE - 1) >> BLOCK_BITS
    return HEADER_SIZE + max(1, (blocks + 7) >> 3)


class BlobCache:
    """The two cache files of one blob, open for this daemon's lifetime."""

    def __init__(self, root: Path, blob: Blob) -> None:
        self.digest = blob.digest
        base = _digest_path(root, "blobs", blob.digest)
        try:
            base.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            self.data_fd = os.open(
                base.with_name(base.name + ".data"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600
            )
            self.map_fd = os.open(
                base.with_name(base.name + ".map"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600
            )
        except OSError as e:
            raise CacheError(f"cache for blob {blob.digest}: {e.strerror}: {base}") from None
        self._lock = threading.Lock()
        self._mm: mmap.mmap | None = None
        with self._locked():
            self._prepare(blob.uncompressed_size)
            size = os.fstat(self.map_fd).st_size
        self._mm = mmap.mmap(self.map_fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._bits = (size - HEADER_SIZE) * 8

    def _locked(self) -> _Locked:
        return _Locked(self._lock, self.map_fd)

    def _prepare(self, uncompressed_size: int) -> None:
        """Create, validate or extend both files; called under the lock."""
        want = _map_size(uncompressed_size)
        head = os.pread(self.map_fd, HEADER_SIZE, 0)
        if len(head) == HEADER_SIZE:
            magic, version, shift = _MAP_HEADER.unpack(head)
            if (magic, version, shift) != (MAP_MAGIC, MAP_VERSION, BLOCK_BITS):
                log.warning("cache bitmap of %s has a bad header; resetting it", self.digest)
                os.ftruncate(self.map_fd, 0)
                head = b""
        if len(head) != HEADER_SIZE:
            os.ftruncate(self.map_fd, 0)
            os.pwrite(self.map_fd, _MAP_HEADER.pack(MAP_MAGIC, MAP_VERSION, BLOCK_BITS), 0)
        if os.fstat(self.map_fd).st_size < want:
            os.ftruncate(self.map_fd, want)
        if os.fstat(self.data_fd).st_size < uncompressed_size:
            os.ftruncate(self.data_fd, uncompressed_size)

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

    def _update(self, offset: int, size: int, present: bool) -> None:
        first, n = self._span(offset, size)
        lo = HEADER_SIZE + (first >> 3)
        hi = HEADER_SIZE + ((first + n - 1) >> 3) + 1
        mask = ((1 << n) - 1) << (first & 7)
        assert self._mm is not None
        value = int.from_bytes(self._mm[lo:hi], "little")
        value = value | mask if present else value & ~mask
        self._mm[lo:hi] = value.to_bytes(hi - lo, "little")

    def mark(self, extents: Sequence[tuple[int, int]], present: bool = True) -> None:
        """Set (or clear) the bits of (offset, size) extents, under the lock (rule 3)."""
        with self._locked():
            for offset, size in extents:
                self._update(offset, size, present)

    def sync_data(self) -> None:
        os.fdatasync(self.data_fd)

    def close(self) -> None:
        if self._mm is not None:
            try:
                self._mm.flush()
            finally:
                self._mm.close()
                self._mm = None
        os.close(self.map_fd)
        os.close(self.data_fd)


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


class ChunkCache:
    """The cache as one bootstrap sees it: chunks by chunk-table index.

    ``run()`` is the committer task (rule 2); the daemon starts it in its
    nursery and cancels it at shutdown, after which pending bits are committed.
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike[str],
        blobs: Sequence[Blob],
        chunk: Callable[[int], Chunk],
        stats: Stats | None = None,
    ) -> None:
        self.root = Path(cache_dir)
        self.blobs = list(blobs)
        self.chunk = functools.lru_cache(maxsize=1 << 16)(chunk)
        self.stats = stats if stats is not None else Stats()
        self._files: list[BlobCache | None] = [None] * len(self.blobs)
        count = max((b.chunk_start + b.chunk_count for b in self.blobs), default=0)
        self._good = bytearray(count)  # rule 5: 1 = safe to read from the data file
        self._pending: dict[int, list[tuple[int, int]]] = {}
        self._pending_event = trio.Event()
        self._commit_lock = trio.Lock()

    # -- files --------------------------------------------------------------

    def blob_file(self, blob_index: int) -> BlobCache:
        f = self._files[blob_index]
        if f is None:
            f = self._files[blob_index] = BlobCache(self.root, self.blobs[blob_index])
        return f

    def _set_good(self, index: int, value: int) -> None:
        if index >= len(self._good):
            self._good.extend(bytes(index + 1 - len(self._good)))
        self._good[index] = value

    # -- lookups ------------------------------------------------------------

    def is_ready(self, index: int) -> bool:
        """Fast path: this daemon knows the chunk is in the data file."""
        return index < len(self._good) and self._good[index] == 1

    async def probe(self, index: int) -> bool:
        """Whether the chunk can be read from the cache; the first time, check xxh3."""
        if self.is_ready(index):
            return True
        c = self.chunk(index)
        f = self.blob_file(c.blob_index)
        if not f.has(c.uncompressed_offset, c.uncompressed_size):
            return False
        ok = await trio.to_thread.run_sync(self._check, f, c)
        if ok:
            self._set_good(index, 1)
            return True
        self.stats.cache_corrupt += 1
        log.warning(
            "cached chunk %d of blob %s at %d fails its xxh3 check; fetching it again",
            index, f.digest, c.uncompressed_offset,
        )
        await trio.to_thread.run_sync(
            f.mark, [(c.uncompressed_offset, c.uncompressed_size)], False
        )
        return False

    @staticmethod
    def _check(f: BlobCache, c: Chunk) -> bool:
        data = os.pread(f.data_fd, c.uncompressed_size, c.uncompressed_offset)
        return check_xxh3(c, data)

    # -- reads --------------------------------------------------------------

    def pread(self, index: int, offset: int, size: int) -> bytes:
        """``size`` bytes at ``offset`` within a ready chunk."""
        c = self.chunk(index)
        if offset + size > c.uncompressed_size:  # never serve a neighbour's bytes
            raise FormatError(f"read past the end of chunk {index}")
        f = self._files[c.blob_index] or self.blob_file(c.blob_index)
        data = os.pread(f.data_fd, size, c.uncompressed_offset + offset)
        if len(data) != size:
            raise CacheError(f"cache file of blob {f.digest} is shorter than expected")
        return data

    def preadinto(self, index: int, offset: int, view: memoryview) -> None:
        """Fill ``view`` from ``offset`` within a ready chunk."""
        c = self.chunk(index)
        if offset + len(view) > c.uncompressed_size:  # never serve a neighbour's bytes
            raise FormatError(f"read past the end of chunk {index}")
        f = self._files[c.blob_index] or self.blob_file(c.blob_index)
        n = os.preadv(f.data_fd, [view], c.uncompressed_offset + offset)
        if n != len(view):
            raise CacheError(f"cache file of blob {f.digest} is shorter than expected")

    def pread_blob(self, blob_index: int, offset: int, size: int) -> bytes:
        """``size`` bytes of the blob's address space at ``offset``, all inside one
        ready chunk (kernel mode)."""
        f = self._files[blob_index] or self.blob_file(blob_index)
        data = os.pread(f.data_fd, size, offset)
        if len(data) != size:
            raise CacheError(f"cache file of blob {f.digest} is shorter than expected")
        return data

    def preadinto_blob(self, blob_index: int, offset: int, view: memoryview) -> None:
        """Fill ``view`` from the blob's address space at ``offset`` (kernel mode).

        The caller has made every chunk in the range ready and zeroes what no
        chunk covers; a data file shorter than the range reads as zeros.
        """
        f = self._files[blob_index] or self.blob_file(blob_index)
        n = os.preadv(f.data_fd, [view], offset)
        if n < len(view):
            view[n:] = bytes(len(view) - n)

    # -- writes -------------------------------------------------------------

    async def store(self, index: int, data: bytes | Callable[[], bytes]) -> None:
        """Write verified data of a chunk: readable at once, bits set after fdatasync.

        ``data`` may be a function producing the bytes (decode and verify); it runs
        in the same worker thread as the write, and whatever it raises propagates
        with nothing written.
        """
        c = self.chunk(index)
        f = self.blob_file(c.blob_index)
        await trio.to_thread.run_sync(self._write, f, c, data)
        self._set_good(index, 1)
        self._pending.setdefault(c.blob_index, []).append(
            (c.uncompressed_offset, c.uncompressed_size)
        )
        self._pending_event.set()

    @staticmethod
    def _write(f: BlobCache, c: Chunk, data: bytes | Callable[[], bytes]) -> None:
        if callable(data):
            data = data()
        if len(data) != c.uncompressed_size:
            raise CacheError(f"chunk of {len(data)} bytes, expected {c.uncompressed_size}")
        try:
            n = os.pwrite(f.data_fd, data, c.uncompressed_offset)
        except OSError as e:
            raise CacheError(f"writing the cache of blob {f.digest}: {e.strerror}") from None
        if n != len(data):
            raise CacheError(f"short write to the cache of blob {f.digest}")

    async def commit(self) -> None:
        """Make every chunk stored so far durable and set its bits (rule 2).

        A barrier: when it returns, every ``store`` that returned before the call
        is committed (or its fdatasync failed and was logged).
        """
        async with self._commit_lock:  # waits for a batch another task has in flight
            while self._pending:
                batch, self._pending = self._pending, {}
                self._pending_event = trio.Event()
                # A batch taken must be committed: a cancellation here (even before
                # the thread starts) would otherwise drop its bits.
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(self._commit_batch, batch)

    def _commit_batch(self, batch: dict[int, list[tuple[int, int]]]) -> None:
        for blob_index, extents in batch.items():
            f = self.blob_file(blob_index)
            try:
                f.sync_data()
            except OSError as e:
                log.error("fdatasync of the cache of blob %s failed: %s", f.digest, e.strerror)
                continue  # bits stay unset: the data is not known durable
            f.mark(extents)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The committer task: group-commits stored chunks until cancelled."""
        task_status.started()
        try:
            while True:
                await self._pending_event.wait()
                await self.commit()
        finally:
            with trio.CancelScope(shield=True):
                await self.commit()

    def close(self) -> None:
        """Close every file; call after ``run`` has ended (pending bits are lost otherwise)."""
        if self._pending:
            log.warning("closing the chunk cache with %d uncommitted blobs", len(self._pending))
        files, self._files = self._files, [None] * len(self.blobs)
        for f in files:
            if f is not None:
                f.close()


# -- bootstraps -------------------------------------------------------------


def cached_bootstrap(cache_dir: str | os.PathLike[str], digest: str) -> Path | None:
    """The stored raw bootstrap with sha256 ``digest`` if present and intact."""
    path = _digest_path(Path(cache_dir), "bootstraps", digest)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise CacheError(f"reading cached bootstrap {path}: {e.strerror}") from None
    alg, _, hexdigest = digest.partition(":")
    if alg != "sha256" or hashlib.sha256(data).hexdigest() != hexdigest:
        log.warning("cached bootstrap %s is corrupt; fetching it again", path)
        return None
    return path


def store_bootstrap(cache_dir: str | os.PathLike[str], digest: str, data: bytes) -> Path:
    """Store a verified raw bootstrap atomically (write, fsync, rename) and return its path."""
    path = _digest_path(Path(cache_dir), "bootstraps", digest)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise CacheError(f"storing bootstrap {digest}: {e.strerror}: {path}") from None
    return path
