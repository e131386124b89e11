"""The chunk cache: verified, uncompressed chunk data on local disk, per blob, for the host.

Layout under the cache directory (one per host by default, see
``fused.cacheconf``; shared by every daemon, the snapshotter's daemons and
``rafs cache``; kept across restarts)::

    blobs/<alg>/<hex>.data       sparse file: the blob's uncompressed address
                                 space; a chunk lives at its uncompressed_offset
    blobs/<alg>/<hex>.map        bitmap: 32-byte header (magic, version 2, block
                                 shift, eviction generation) then one bit per
                                 4 KiB block of the address space, LSB first; a
                                 chunk is present when every block it covers has
                                 its bit set (``fused.blobcache``)
    bootstraps/<alg>/<hex>       verified raw bootstraps, named by the digest of
                                 their uncompressed bytes
    bootstraps/<alg>/.<hex>.validated  written by ``rafs.bootstrap``: that file
                                 passed the bootstrap validator (and fsck.erofs)
    index.db                     the host-wide index (``fused.cacheindex``): where
                                 each chunk (by sha256) lives, when it was last
                                 used, the bytes held; a hint, rebuilt if lost
    evict.lock                   serialises evictions (an optimisation only)

The bitmap is indexed by block of the blob's own address space, not by chunk
table index: chunk tables are per bootstrap and two images sharing a blob (a
chunk dictionary) may number its chunks differently, while uncompressed
offsets belong to the blob. A chunk of one image that another image's blob
already holds (same sha256, a different blob: images converted separately) is
read from there, not stored again (node-wide dedup, rule 8).

Rules (the cache is correct under any interleaving of any number of daemons,
evictors and ``rafs cache`` runs, and after a kill -9 of any of them):

1. Only verified bytes are written: the fetcher checks sha256 before ``store``,
   a dedup source is checked against the sha256 before it is used. Two writers
   of one chunk write identical bytes, so data writes take no lock.
2. Data is durable before its bits are set: ``store`` pwrites, the committer
   task fdatasyncs the data file (one fdatasync covers every write queued
   before it: group commit), upserts the chunk's index row, and only then sets
   the bits. After a crash, a set bit means durable data and an index row; a
   lost bit only costs a refetch.
3. Every read-modify-write of bitmap bytes, every eviction (clear bits, punch
   holes, bump the generation) and creating, extending or resetting a blob's
   files happens with an exclusive ``fcntl.flock`` on the ``.map`` file while
   holding the blob's ``threading.Lock``. flock belongs to the open file, so it
   excludes other processes and also a second cache over the same directory in
   this process; the thread lock excludes this process's worker threads.
4. Readers of bits take no lock: a byte is read whole, and a bit seen unset
   only costs a refetch.
5. Every read served from a data file is verified: when a daemon first finds a
   chunk (its bits, or a dedup source) it checks the whole chunk (xxh3 for its
   own blob, sha256 for another blob's copy) and keeps an xxh3 per 64 KiB block
   of it in memory; every later read hashes the blocks it returns and compares.
   So bytes changed under a running daemon (rot, another process's write, an
   eviction that punched the chunk after the reader looked at its bits) are
   never served: the chunk is dropped, its bits are looked at again under the
   lock (clear: it was evicted; set and still bad: ``cache_corrupt``, bits
   cleared), and it is fetched (or found) again. This is also what makes
   eviction safe for readers of any daemon without read pins (see below).
6. Evictors clear bits before they punch, and bump the map's eviction
   generation after punching (rule 3). A writer reads the generation before
   its pwrite; at commit, if it moved, the data is checked against its xxh3
   before the bits are set (an evictor may have punched it), else left unset.
   An evictor deletes an index row only with the stamp it read, so a row a
   writer renewed meanwhile stays: a set bit always has a row.
7. In use: a daemon holds a shared ``flock`` on each ``.data`` file it serves
   or reads from, and on its bootstrap file, for as long as it runs; the kernel
   drops them when it dies. Garbage collection removes a blob's files or a
   bootstrap only while holding an exclusive, non-blocking flock on them, and
   an opener re-checks after locking that the path is still its file.
8. A store that fails (ENOSPC, EIO) does not fail the read: the verified bytes
   are served from memory (``_mem``, bounded), ``cache_enospc`` counts it, and
   eviction is started. Chunks a reader lost to an eviction are kept in memory
   when they come back, so a reader always makes progress.

Why no read pins: a pin (an OFD byte-range lock per read, honoured by
evictors) would cost two fcntl calls per read and still not cover bit rot;
rule 5 is needed anyway, catches the eviction race (a reader that sees the bit,
then preads a punched hole, finds zeros that fail the check), and costs one
xxh3 pass over the bytes read (about 44 GB/s here), no system call.

Recency: reads note chunk indices in a set (no I/O); every ``FLUSH_SECONDS``
(and before this daemon evicts, and at exit) they become index ``atime``
updates in one transaction, so LRU order survives restarts.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import hashlib
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import trio
import xxhash

from rafs.codec import check_xxh3
from rafs.errors import FormatError
from rafs.model import Blob, Chunk

from .blobcache import HEADER_SIZE, BlobCache, block_end, digest_path
from .cacheindex import CacheIndex
from .errors import CacheError
from .stats import Stats

if TYPE_CHECKING:
    from .evict import Evictor

__all__ = ["HEADER_SIZE", "SUM_BLOCK", "BlobCache", "ChunkCache", "cached_bootstrap",
           "hold_bootstrap", "store_bootstrap"]

log = logging.getLogger(__name__)

SUM_BLOCK = 64 << 10  # verification granule of reads (rule 5)
MEM_BYTES = 32 << 20  # memory-served chunks at most (rule 8)
FLUSH_SECONDS = 5.0  # recency and counters to the index at this interval
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)

Sums = tuple[int, ...]


def block_sums(data: bytes | bytearray | memoryview) -> Sums:
    """xxh3 of every ``SUM_BLOCK`` of a chunk (the last block may be short)."""
    mv = memoryview(data)
    h = xxhash.xxh3_64_intdigest
    return tuple(h(mv[pos:pos + SUM_BLOCK]) for pos in range(0, len(mv), SUM_BLOCK))


def _blocks_ok(data: bytes | bytearray | memoryview, sums: Sums, first: int) -> bool:
    mv = memoryview(data)
    h = xxhash.xxh3_64_intdigest
    k = first
    for pos in range(0, len(mv), SUM_BLOCK):
        if h(mv[pos:pos + SUM_BLOCK]) != sums[k]:
            return False
        k += 1
    return True


@dataclass(slots=True)
class _Stored:
    """A chunk written, waiting for its commit."""

    index: int
    offset: int
    size: int
    xxh3: int
    sha256: bytes
    generation: int  # of the blob's map, read before the pwrite (rule 6)


@dataclass(slots=True)
class _Found:
    """What a probe found (computed in a worker thread, applied in the trio thread)."""

    sums: Sums | None = None
    source: BlobCache | None = None  # another blob's file holding the chunk (dedup)
    offset: int = 0
    data: bytes | None = None
    row: tuple[str, int, int, bytes] | None = None  # present but maybe not indexed
    corrupt: int = 0


class ChunkCache:
    """The cache as one bootstrap sees it: chunks by chunk-table index.

    ``run()`` is the committer and housekeeping task (rule 2, recency, the
    evictor's watch); the daemon starts it in its nursery and cancels it at
    shutdown, after which pending bits are committed and recency flushed.
    ``index`` (the host index) is opened here unless given or ``use_index`` is
    false; ``evictor`` (``fused.evict.Evictor``) enforces the cap, if any.
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike[str],
        blobs: Sequence[Blob],
        chunk: Callable[[int], Chunk],
        stats: Stats | None = None,
        *,
        index: CacheIndex | None = None,
        evictor: Evictor | None = None,
        use_index: bool = True,
        owns_index: bool = False,
        mem_bytes: int = MEM_BYTES,
    ) -> None:
        self.root = Path(cache_dir)
        self.blobs = list(blobs)
        self.chunk = functools.lru_cache(maxsize=1 << 16)(chunk)
        self.stats = stats if stats is not None else Stats()
        self._files: list[BlobCache | None] = [None] * len(self.blobs)
        self._by_digest = {b.digest: i for i, b in enumerate(self.blobs)}
        self._files_lock = threading.Lock()
        self._sources: dict[str, BlobCache] = {}  # other blobs we read from (dedup)
        count = max((b.chunk_start + b.chunk_count for b in self.blobs), default=0)
        self._sums: list[Sums | None] = [None] * count  # rule 5: readable from a file
        self._where: dict[int, tuple[BlobCache, int]] = {}  # dedup: chunk -> (file, offset)
        self._mem: OrderedDict[int, bytes] = OrderedDict()  # rule 8
        self._mem_bytes = 0
        self.mem_limit = mem_bytes
        self._keep: set[int] = set()  # lost to an eviction: keep in memory when back
        self._suspects: dict[int, tuple[BlobCache, int] | None] = {}  # failed a read check
        self._touched: set[int] = set()
        self._probing: dict[int, trio.Event] = {}
        self._local = bytearray()  # maybe_local hints
        self._adopt: list[tuple[str, int, int, bytes]] = []
        self._pending: dict[int, list[_Stored]] = {}
        self._pending_event = trio.Event()
        self._commit_lock = trio.Lock()
        self._flushed: dict[str, int] = {}
        self._owns_index = owns_index
        if index is None and use_index:
            try:
                index = CacheIndex(self.root)
                self._owns_index = True
            except CacheError as e:
                log.warning("%s; no node-wide dedup or eviction for this mount", e)
        self.index = index
        self.evictor = evictor

    # -- files --------------------------------------------------------------

    def blob_file(self, blob_index: int) -> BlobCache:
        f = self._files[blob_index]
        if f is None:
            with self._files_lock:
                f = self._files[blob_index]
                if f is None:
                    f = self._files[blob_index] = BlobCache(self.root, self.blobs[blob_index])
        return f

    def _source(self, digest: str) -> BlobCache | None:
        """Another blob's files, opened as a user (rule 7) for dedup reads."""
        own = self._by_digest.get(digest)
        if own is not None:
            return self.blob_file(own)
        with self._files_lock:
            f = self._sources.get(digest)
            if f is None:  # (a blob that is not there now may be later: not remembered)
                f = BlobCache.existing(self.root, digest, use=True)
                if f is not None:
                    self._sources[digest] = f
            return f

    # -- lookups ------------------------------------------------------------

    def is_ready(self, index: int) -> bool:
        """Fast path: this daemon can serve the chunk (from a checked file, or memory)."""
        sums = self._sums
        return (index < len(sums) and sums[index] is not None) or index in self._mem

    def maybe_local(self, index: int) -> bool:
        """Cheap hint, no I/O: the chunk's bits are set in its blob's bitmap, or the host
        index had its digest when this cache started (``load_hints``). Amplified fetches
        stop at such a chunk: a probe will find it without the network."""
        if index < len(self._local) and self._local[index]:
            return True
        c = self.chunk(index)
        f = self._files[c.blob_index]
        return f is not None and f.has(c.uncompressed_offset, c.uncompressed_size)

    async def load_hints(self) -> None:
        """Note which of this image's chunks the host already holds (one index scan, in a
        worker thread), for ``maybe_local``."""
        if self.index is None:
            return
        index, count = self.index, len(self._sums)

        def load() -> bytearray:
            hints = bytearray(count)
            present = index.digests()
            chunk = self.chunk.__wrapped__  # type: ignore[attr-defined]  # keep the LRU warm
            for i in range(count):
                try:
                    if chunk(i).sha256 in present:
                        hints[i] = 1
                except FormatError:
                    continue
            return hints

        try:
            self._local = await trio.to_thread.run_sync(load)
        except CacheError as e:
            log.warning("%s", e)

    def _set_sums(self, index: int, sums: Sums | None) -> None:
        if index >= len(self._sums):
            self._sums.extend([None] * (index + 1 - len(self._sums)))
        self._sums[index] = sums

    async def probe(self, index: int) -> bool:
        """Whether the chunk can be served without a fetch: its bits are set and it passes
        its xxh3 check, or another blob on this host holds it (checked by sha256)."""
        if self.is_ready(index):
            return True
        busy = self._probing.get(index)
        if busy is not None:  # another reader is probing it: one look is enough
            await busy.wait()
            return self.is_ready(index)
        c = self.chunk(index)
        self._probing[index] = done = trio.Event()
        try:
            found = await trio.to_thread.run_sync(self._probe, c)
        finally:
            del self._probing[index]
            done.set()
        if found.corrupt:
            self.stats.cache_corrupt += found.corrupt
        if found.sums is None:
            return False
        self._set_sums(index, found.sums)
        if found.source is not None:
            self._where[index] = (found.source, found.offset)
            self.stats.dedup_hits += 1
            self.stats.dedup_bytes += c.compressed_size
            self._touched.add(index)
        elif found.row is not None:
            self._adopt.append(found.row)
        if index in self._keep and found.data is not None:
            self._keep.discard(index)
            self._remember(index, found.data)
        return True

    def _probe(self, c: Chunk) -> _Found:
        found = _Found()
        try:
            f: BlobCache | None = self.blob_file(c.blob_index)
        except CacheError as e:
            log.warning("%s", e)
            f = None
        size = c.uncompressed_size
        if f is not None and f.has(c.uncompressed_offset, size):
            data = os.pread(f.data_fd, size, c.uncompressed_offset)
            if check_xxh3(c, data):
                found.sums, found.data = block_sums(data), data
                found.row = (f.digest, c.uncompressed_offset, size, c.sha256)
                return found
            if self._condemn(f, c.uncompressed_offset, c):
                found.corrupt += 1
                log.warning("cached chunk of blob %s at %d fails its xxh3 check; fetching it "
                            "again", f.digest, c.uncompressed_offset)
        if self.index is None:
            return found
        try:
            rows = self.index.find(c.sha256)
        except CacheError as e:
            log.warning("%s", e)
            return found
        for row in rows:
            if row.size != size or (f is not None and row.blob == f.digest
                                    and row.off == c.uncompressed_offset):
                continue
            src = self._source(row.blob)
            if src is None or not src.has(row.off, size):
                continue
            data = os.pread(src.data_fd, size, row.off)
            if len(data) == size and hashlib.sha256(data).digest() == c.sha256:
                found.sums, found.data = block_sums(data), data
                found.source, found.offset = src, row.off
                return found
            if self._condemn(src, row.off, c):
                found.corrupt += 1
                log.warning("cached chunk of blob %s at %d does not match its sha256; "
                            "dropping it", src.digest, row.off)
        return found

    def _condemn(self, f: BlobCache, offset: int, c: Chunk) -> bool:
        """Clear the bits of a chunk whose data failed its check, if it still does under
        the lock (rule 3); mark its row for eviction. True if it was corrupt."""
        size = c.uncompressed_size
        with f.locked():
            if not f.has(offset, size):
                return False  # evicted meanwhile
            data = os.pread(f.data_fd, size, offset)
            if check_xxh3(c, data):
                return False  # rewritten meanwhile (identical bytes)
            f.update_locked(offset, size, False)
        if self.index is not None:
            try:
                self.index.suspect(f.digest, offset)
            except CacheError as e:
                log.warning("%s", e)
        return True

    # -- reads (rule 5) ------------------------------------------------------

    def _location(self, index: int, c: Chunk) -> tuple[int, int]:
        where = self._where.get(index)
        if where is not None:
            return where[0].data_fd, where[1]
        f = self._files[c.blob_index] or self.blob_file(c.blob_index)
        return f.data_fd, c.uncompressed_offset

    def read(self, index: int, offset: int, size: int) -> bytes | None:
        """``size`` bytes at ``offset`` within a chunk, verified; None when the chunk is not
        ready or failed its check (it is then dropped: ``settle``, fetch, read again)."""
        c = self.chunk(index)
        if offset < 0 or offset + size > c.uncompressed_size:  # never a neighbour's bytes
            raise FormatError(f"read past the end of chunk {index}")
        if self._mem:
            mem = self._mem.get(index)
            if mem is not None:
                self._mem.move_to_end(index)
                return mem[offset:offset + size]
        sums = self._sums[index] if index < len(self._sums) else None
        if sums is None:
            return None
        fd, base = self._location(index, c)
        end = offset + size
        lo = offset - offset % SUM_BLOCK
        hi = min(end + (-end) % SUM_BLOCK, c.uncompressed_size)
        data = os.pread(fd, hi - lo, base + lo)
        if len(data) != hi - lo or not _blocks_ok(data, sums, lo // SUM_BLOCK):
            self._lose(index)
            return None
        self._touched.add(index)
        if lo == offset and hi == end:
            return data
        return data[offset - lo:end - lo]

    def readinto(self, index: int, offset: int, view: memoryview) -> bool:
        """Fill ``view`` from ``offset`` within a chunk, verified; False as ``read`` gives None."""
        c = self.chunk(index)
        end = offset + len(view)
        if offset < 0 or end > c.uncompressed_size:  # never a neighbour's bytes
            raise FormatError(f"read past the end of chunk {index}")
        if self._mem:
            mem = self._mem.get(index)
            if mem is not None:
                self._mem.move_to_end(index)
                view[:] = mem[offset:end]
                return True
        sums = self._sums[index] if index < len(self._sums) else None
        if sums is None:
            return False
        fd, base = self._location(index, c)
        lo = offset - offset % SUM_BLOCK
        hi = min(end + (-end) % SUM_BLOCK, c.uncompressed_size)
        if lo == offset and hi == end:
            ok = os.preadv(fd, [view], base + lo) == len(view) and _blocks_ok(
                view, sums, lo // SUM_BLOCK)
        else:
            data = os.pread(fd, hi - lo, base + lo)
            ok = len(data) == hi - lo and _blocks_ok(data, sums, lo // SUM_BLOCK)
            if ok:
                view[:] = memoryview(data)[offset - lo:end - lo]
        if not ok:
            self._lose(index)
            return False
        self._touched.add(index)
        return True

    def _lose(self, index: int) -> None:
        self._sums[index] = None
        self._suspects[index] = self._where.pop(index, None)

    async def settle(self, index: int) -> None:
        """After a failed read check: was the chunk evicted, or is it corrupt? (rule 5)"""
        if index not in self._suspects:
            return
        where = self._suspects.pop(index)
        c = self.chunk(index)
        verdict = await trio.to_thread.run_sync(self._settle, c, where)
        if verdict == "evicted":
            self.stats.cache_lost += 1
            self._keep.add(index)
            log.info("chunk %d was evicted while being read; fetching it again", index)
        elif verdict == "corrupt":
            self.stats.cache_corrupt += 1
            log.warning("cached chunk %d changed on disk under a running daemon; fetching it "
                        "again", index)

    def _settle(self, c: Chunk, where: tuple[BlobCache, int] | None) -> str:
        if where is None:
            f, offset = self.blob_file(c.blob_index), c.uncompressed_offset
        else:
            f, offset = where
        with f.locked():
            if not f.has(offset, c.uncompressed_size):
                return "evicted"
        return "corrupt" if self._condemn(f, offset, c) else "raced"

    def _remember(self, index: int, data: bytes) -> None:
        """Serve this chunk from memory for a while (rule 8), oldest dropped first."""
        if index in self._mem:
            return
        self._mem[index] = data
        self._mem_bytes += len(data)
        while self._mem_bytes > self.mem_limit and len(self._mem) > 1:
            _, old = self._mem.popitem(last=False)
            self._mem_bytes -= len(old)

    # -- writes -------------------------------------------------------------

    async def store(self, index: int, data: bytes | Callable[[], bytes]) -> None:
        """Write verified data of a chunk: readable at once, bits set after fdatasync.

        ``data`` may be a function producing the bytes (decode and verify); it runs
        in the same worker thread as the write, and whatever it raises propagates
        with nothing written. A write that fails is no error: the chunk is served
        from memory (rule 8).
        """
        c = self.chunk(index)
        ev = self.evictor
        if ev is not None:
            await ev.admit(self, c.uncompressed_size)
        try:
            f: BlobCache | None = self.blob_file(c.blob_index)
        except CacheError as e:
            log.warning("%s", e)
            f = None
        try:
            raw, sums, gen, err = await trio.to_thread.run_sync(self._write, f, c, data)
        except BaseException:  # bad data (digest) or cancelled: nothing was stored
            if ev is not None:
                ev.release(c.uncompressed_size)
            raise
        if err is not None:
            if ev is not None:
                ev.release(c.uncompressed_size)
            self._remember(index, raw)
            if err in _NO_SPACE:
                self.stats.cache_enospc += 1
                log.warning("no space left for the cache of blob %s; serving chunk %d from "
                            "memory and evicting", self.blobs[c.blob_index].digest, index)
                if ev is not None:
                    ev.kick()
            else:
                self.stats.cache_write_errors += 1
            return
        self._set_sums(index, sums)
        if index in self._keep:
            self._keep.discard(index)
            self._remember(index, raw)
        self._pending.setdefault(c.blob_index, []).append(
            _Stored(index, c.uncompressed_offset, c.uncompressed_size, c.xxh3, c.sha256, gen))
        self._pending_event.set()
        if ev is not None:
            ev.note_stored(c.uncompressed_size)

    @staticmethod
    def _write(f: BlobCache | None, c: Chunk, data: bytes | Callable[[], bytes]
               ) -> tuple[bytes, Sums, int, int | None]:
        """(bytes, block sums, generation before the write, errno of a failed write)."""
        if callable(data):
            data = data()
        if len(data) != c.uncompressed_size:
            raise CacheError(f"chunk of {len(data)} bytes, expected {c.uncompressed_size}")
        sums = block_sums(data)
        if f is None:
            return data, sums, 0, errno.EIO
        gen = f.generation()
        try:
            n = os.pwrite(f.data_fd, data, c.uncompressed_offset)
            if n != len(data):
                raise OSError(errno.ENOSPC, "short write")
        except OSError as e:
            log.warning("writing the cache of blob %s: %s", f.digest, e.strerror)
            # Give back what the partial write took (rule 6 covers a racing writer).
            with contextlib.suppress(OSError):
                f.punch(c.uncompressed_offset,
                        block_end(c.uncompressed_offset, len(data)) - c.uncompressed_offset)
            return data, sums, gen, e.errno or errno.EIO
        return data, sums, gen, None

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
                    lost, refetched, indexed = await trio.to_thread.run_sync(
                        self._commit_batch, batch)
                for index in lost:  # punched by an evictor before its bits were set
                    self._sums[index] = None
                self.stats.cache_refetched += refetched
                if indexed is not None and self.evictor is not None:
                    self.evictor.note_indexed(indexed)

    def _commit_batch(self, batch: dict[int, list[_Stored]]
                      ) -> tuple[list[int], int, int | None]:
        lost: list[int] = []
        refetched = 0
        indexed: int | None = None
        for blob_index, entries in batch.items():
            f = self.blob_file(blob_index)
            try:
                f.sync_data()
            except OSError as e:
                log.error("fdatasync of the cache of blob %s failed: %s", f.digest, e.strerror)
                continue  # bits stay unset: the data is not known durable
            if self.index is not None:
                try:
                    indexed, n = self.index.commit_chunks(
                        [(f.digest, e.offset, e.size, e.sha256) for e in entries])
                    refetched += n
                except CacheError as e:
                    log.warning("%s; not marking %d chunks present", e, len(entries))
                    continue  # a set bit must have a row (rule 6)
            oks = f.commit([(e.offset, e.size, e.xxh3, e.generation) for e in entries])
            lost += [e.index for e, ok in zip(entries, oks, strict=True) if not ok]
        return lost, refetched, indexed

    # -- housekeeping ---------------------------------------------------------

    def _recency_rows(self) -> list[tuple[str, int]]:
        rows = []
        touched, self._touched = self._touched, set()
        for index in touched:
            where = self._where.get(index)
            if where is not None:
                rows.append((where[0].digest, where[1]))
            else:
                c = self.chunk(index)
                rows.append((self.blobs[c.blob_index].digest, c.uncompressed_offset))
        return rows

    def _counter_deltas(self) -> dict[str, int]:
        s = self.stats
        now = {"hits": s.cache_hits, "misses": s.cache_misses, "fetched_bytes": s.backend_bytes,
               "dedup_bytes": s.dedup_bytes, "dedup_hits": s.dedup_hits,
               "refetched": s.cache_refetched, "enospc": s.cache_enospc,
               "corrupt": s.cache_corrupt, "lost": s.cache_lost}
        deltas = {k: v - self._flushed.get(k, 0) for k, v in now.items()}
        self._flushed = now
        return deltas

    async def flush(self) -> None:
        """Recency, adopted chunks and counters to the index (one transaction each)."""
        if self.index is None:
            return
        rows = self._recency_rows()
        adopt, self._adopt = self._adopt, []
        deltas = self._counter_deltas()
        index = self.index

        def write() -> None:
            try:
                if adopt:
                    index.adopt(adopt)
                if rows:
                    index.touch(rows)
                index.add_counters(deltas)
            except CacheError as e:
                log.warning("%s", e)

        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(write)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The committer, recency and eviction tasks, until cancelled."""
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._committer)
                nursery.start_soon(self._flusher)
                nursery.start_soon(self.load_hints)
                if self.evictor is not None:
                    nursery.start_soon(self.evictor.watch, self)
                task_status.started()
        finally:
            with trio.CancelScope(shield=True):
                await self.commit()
                await self.flush()

    async def _committer(self) -> None:
        while True:
            await self._pending_event.wait()
            await self.commit()

    async def _flusher(self) -> None:
        while True:
            await trio.sleep(FLUSH_SECONDS)
            await self.flush()

    def close(self) -> None:
        """Close every file; call after ``run`` has ended (pending bits are lost otherwise)."""
        if self._pending:
            log.warning("closing the chunk cache with %d uncommitted blobs", len(self._pending))
        files, self._files = self._files, [None] * len(self.blobs)
        sources, self._sources = self._sources, {}
        self._where.clear()
        self._sums = [None] * len(self._sums)
        for f in [*files, *sources.values()]:
            if f is not None:
                f.close()
        if self._owns_index and self.index is not None:
            self.index.close()
            self.index = None


# -- bootstraps -------------------------------------------------------------


def bootstrap_path(cache_dir: str | os.PathLike[str], digest: str) -> Path:
    return digest_path(Path(cache_dir), "bootstraps", digest)


def cached_bootstrap(cache_dir: str | os.PathLike[str], digest: str) -> Path | None:
    """The stored raw bootstrap with sha256 ``digest`` if present and intact."""
    path = bootstrap_path(cache_dir, digest)
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
    """Store a verified raw bootstrap atomically (write, fsync, rename) and return its path.

    A full disk first makes room (least recently used chunks and unused images go,
    ``fused.evict.make_space``) and tries once more."""
    try:
        return _store_bootstrap(cache_dir, digest, data)
    except OSError as e:
        if e.errno not in _NO_SPACE:
            raise CacheError(f"storing bootstrap {digest}: {e.strerror}: "
                             f"{bootstrap_path(cache_dir, digest)}") from None
    from .evict import make_space  # the evictor is above this module

    make_space(Path(cache_dir), 2 * len(data))
    try:
        return _store_bootstrap(cache_dir, digest, data)
    except OSError as e:
        raise CacheError(f"storing bootstrap {digest}: {e.strerror}: "
                         f"{bootstrap_path(cache_dir, digest)}") from None


def _store_bootstrap(cache_dir: str | os.PathLike[str], digest: str, data: bytes) -> Path:
    path = bootstrap_path(cache_dir, digest)
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
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
    return path


def hold_bootstrap(path: str | os.PathLike[str]) -> int | None:
    """Mark a cached bootstrap in use for this process's lifetime (rule 7): a shared flock
    on it, its mtime set to now (last use). Returns the fd to keep open, or None if the
    file went away meanwhile (garbage collected): store it again."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise CacheError(f"opening cached bootstrap {path}: {e.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        if os.fstat(fd).st_ino != os.stat(path).st_ino:
            os.close(fd)
            return None
        now = time.time()
        os.utime(fd, (now, now))
    except FileNotFoundError:
        os.close(fd)
        return None
    except OSError as e:
        os.close(fd)
        raise CacheError(f"holding cached bootstrap {path}: {e.strerror}") from None
    return fd
