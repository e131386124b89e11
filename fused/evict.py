"""Keeping the chunk cache under its cap: measuring it, evicting the least recently used
chunks, and removing the files of images nobody uses.

The cap (``fused.cacheconf``): ``cache.max`` (bytes, or a share of the file
system) and ``cache.min_free`` (the file system keeps at least this much free);
the smaller wins. When the cache directory's size on disk passes the cap, an
eviction pass brings it to ``TARGET`` (90 %) of the cap:

1. index rows in least-recently-used order: per blob, clear the bits, punch the
   blocks, bump the generation (one locked section, ``BlobCache.evict``), then
   delete the rows by stamp (``CacheIndex.forget``); the rules are those of
   ``fused.cache`` (3, 6);
2. bootstraps of images not in use (no daemon holds their flock, rule 7),
   oldest last use first: those older than the last chunk evicted, and all of
   them if chunks alone were not enough;
3. blob files not in use with no chunk left are removed.

A pass holds ``evict.lock`` so two evictors do not both evict the same 10 %;
correctness never depends on it (``rafs cache`` tests run evictors without it).
A kill -9 anywhere leaves bits cleared before their blocks are punched and
rows deleted after: at worst a row without data (evicted again, for nothing)
or data without bits (punched when its row comes up, or by ``rafs cache
verify``).

``Evictor`` is the daemon's side: an estimate of the cache size kept from its
own stores and the index's byte count (shared by every daemon, so one daemon
sees the others' stores at each commit), a watch task that measures the
directory every ``WATCH_SECONDS`` or when kicked, and ``admit``, which a store
awaits before it writes: it counts the store first and makes room while the
cache would pass its cap (committing pending stores so that they can be
evicted), so the cache passes its cap by at most one chunk per daemon, unless
everything in it is in use.
"""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from rafs.bootstrap import stamp_path_of

from .blobcache import BlobCache, blob_base, blob_digests, block_end
from .cacheconf import CacheConfig
from .cacheindex import CacheIndex, ChunkRow
from .errors import CacheError
from .stats import Stats

if TYPE_CHECKING:
    from .cache import ChunkCache

__all__ = [
    "TARGET",
    "Budget",
    "EvictReport",
    "Evictor",
    "bootstrap_files",
    "budget",
    "evict_to",
    "eviction_lock",
    "in_use",
    "make_space",
    "measure",
    "remove_blob_files",
    "remove_bootstrap",
    "remove_empty_blobs",
]

log = logging.getLogger(__name__)

TARGET = 0.9  # an eviction pass brings the cache to this share of its cap
WATCH_SECONDS = 5.0
LOCK_NAME = "evict.lock"
_PAGE = 512


def measure(root: Path) -> int:
    """Bytes the cache holds on disk: allocated blocks of every file under ``blobs/`` and
    ``bootstraps/``, what the cap applies to. (The index, about 100 bytes per chunk plus
    its write-ahead log, is not counted: eviction cannot shrink it at will.)"""
    total = 0
    for top in ("blobs", "bootstraps"):
        for dirpath, _dirs, files in os.walk(root / top):
            for name in files:
                try:
                    total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
                except FileNotFoundError:
                    continue
    return total


@dataclass(frozen=True, slots=True)
class Budget:
    """The cap in force for a cache, and what its file system looks like."""

    usage: int
    cap: int | None  # None: no cap
    fs_size: int
    fs_free: int

    @property
    def target(self) -> int | None:
        return None if self.cap is None else int(self.cap * TARGET)

    @property
    def over(self) -> bool:
        return self.cap is not None and self.usage > self.cap


def budget(root: Path, config: CacheConfig, usage: int | None = None) -> Budget:
    usage = measure(root) if usage is None else usage
    st = os.statvfs(root)
    fs_size, fs_free = st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize
    cap = config.max.resolve(fs_size) if config.max is not None else None
    if config.min_free is not None:
        room = usage + fs_free - config.min_free.resolve(fs_size)
        cap = room if cap is None else min(cap, room)
    return Budget(usage, None if cap is None else max(0, cap), fs_size, fs_free)


@contextmanager
def eviction_lock(root: Path) -> Iterator[None]:
    """One eviction pass at a time per cache (an optimisation; see the module docstring)."""
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(root / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def in_use(path: Path) -> bool:
    """Whether some process holds its in-use flock on this file (rule 7)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


# -- removing files (rule 7) ----------------------------------------------------------


def remove_blob_files(root: Path, digest: str, index: CacheIndex | None) -> bool:
    """Remove a blob's data and map files (and their rows) unless the blob is in use."""
    base = blob_base(root, digest)
    data, bitmap = base.with_name(base.name + ".data"), base.with_name(base.name + ".map")
    try:
        fd = os.open(data, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        bitmap.unlink(missing_ok=True)
        return True
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        rows = index.rows_of_blob(digest) if index is not None else []
        bitmap.unlink(missing_ok=True)
        data.unlink(missing_ok=True)
        if rows and index is not None:
            index.forget(rows)
    finally:
        os.close(fd)  # releases the lock; an opener that waited sees the file is gone
    log.info("removed the cache files of blob %s", digest)
    return True


def bootstrap_files(root: Path) -> list[tuple[str, Path, int]]:
    """(digest, path, last use in ms) of every cached bootstrap, least recently used first."""
    out = []
    top = root / "bootstraps"
    for alg in sorted(os.listdir(top)) if top.is_dir() else []:
        for name in sorted(os.listdir(top / alg)):
            if name.startswith("."):
                continue
            path = top / alg / name
            try:
                mtime = path.stat().st_mtime_ns // 1_000_000
            except FileNotFoundError:
                continue
            out.append((f"{alg}:{name}", path, mtime))
    out.sort(key=lambda t: t[2])
    return out


def remove_bootstrap(root: Path, digest: str, path: Path, index: CacheIndex | None) -> int:
    """Remove a cached bootstrap unless it is in use; bytes freed (0: kept)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return 0
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return 0
        size = os.fstat(fd).st_blocks * 512
        path.unlink(missing_ok=True)
        stamp_path_of(path).unlink(missing_ok=True)  # its validation stamp (rafs.bootstrap)
        if index is not None:
            index.forget_image(digest)
    finally:
        os.close(fd)
    log.info("removed cached bootstrap %s", digest)
    return size


def remove_empty_blobs(root: Path, index: CacheIndex | None) -> int:
    """Remove the files of every blob not in use that holds no chunk; how many."""
    indexed = index.blob_stats() if index is not None else {}
    removed = 0
    for digest in list(blob_digests(root)):
        if digest in indexed:
            continue
        f = BlobCache.existing(root, digest)
        if f is not None:
            try:
                if f.any_set():
                    continue  # present chunks the index does not know: `verify` adopts them
            finally:
                f.close()
        if remove_blob_files(root, digest, index):
            removed += 1
    return removed


# -- eviction -------------------------------------------------------------------------


@dataclass(slots=True)
class EvictReport:
    before: int = 0
    after: int = 0
    chunks: int = 0
    chunk_bytes: int = 0
    bootstraps: int = 0
    blobs: int = 0
    errors: list[str] = field(default_factory=list)


def evict_rows(root: Path, index: CacheIndex, rows: list[ChunkRow],
               files: dict[str, BlobCache | None], report: EvictReport) -> int:
    """Evict these rows (rules 3 and 6); bytes freed."""
    by_blob: dict[str, list[ChunkRow]] = {}
    for r in rows:
        by_blob.setdefault(r.blob, []).append(r)
    freed = 0
    for blob, rs in by_blob.items():
        if blob not in files:
            files[blob] = BlobCache.existing(root, blob)
        f = files[blob]
        if f is not None:
            try:
                extents = [(r.off, r.size) for r in rs if r.off + r.size <= f.span]
                freed += f.evict(extents)
            except (OSError, CacheError) as e:
                report.errors.append(f"evicting from blob {blob}: {e}")
                log.error("evicting from blob %s: %s", blob, e)
                continue
        index.forget(rs)  # rows of files that are gone go too
        report.chunks += len(rs)
    report.chunk_bytes += freed
    return freed


def evict_to(root: Path, index: CacheIndex, target: int, usage: int | None = None,
             *, bootstraps: bool = True) -> EvictReport:
    """Evict until the cache directory holds at most ``target`` bytes, or nothing more can go.

    The caller holds ``eviction_lock`` if it wants passes serialised (correct either way).
    """
    usage = measure(root) if usage is None else usage
    report = EvictReport(before=usage)
    need = usage - target
    freed = 0
    files: dict[str, BlobCache | None] = {}
    horizon: int | None = None
    after: tuple[int, str, int] | None = None
    try:
        while freed < need:
            rows = index.oldest(_PAGE, after)
            if not rows:
                break
            after = (rows[-1].atime, rows[-1].blob, rows[-1].off)
            # In LRU order, a step at a time: as many rows as should free what is still
            # needed (at most 64 per locked section), then look at what was really freed.
            k = 0
            while k < len(rows) and freed < need:
                n, planned = 0, 0
                while k + n < len(rows) and n < 64 and planned < need - freed:
                    planned += block_end(0, rows[k + n].size)
                    n += 1
                step = rows[k:k + n]
                freed += evict_rows(root, index, step, files, report)
                horizon = step[-1].atime
                k += n
    finally:
        for f in files.values():
            if f is not None:
                f.close()
    if bootstraps:
        for digest, path, mtime in bootstrap_files(root):  # oldest first; in use: kept
            if freed >= need and (horizon is None or mtime >= horizon):
                break
            n = remove_bootstrap(root, digest, path, index)
            if n:
                report.bootstraps += 1
                freed += n
    report.blobs += remove_empty_blobs(root, index)
    index.trim_evicted()
    report.after = measure(root)
    return report


def make_space(root: Path, nbytes: int) -> EvictReport | None:
    """The disk is full: evict at least ``nbytes`` (and a tenth of the cache) now."""
    try:
        index = CacheIndex(root)
    except CacheError as e:
        log.warning("%s", e)
        return None
    try:
        with eviction_lock(root):
            usage = measure(root)
            return evict_to(root, index, max(0, min(usage - nbytes, int(usage * TARGET))),
                            usage)
    except (OSError, CacheError) as e:
        log.warning("making room in the cache: %s", e)
        return None
    finally:
        index.close()


class Evictor:
    """A daemon's guard of the cap: an estimate, a watch task, room on demand."""

    def __init__(self, root: str | os.PathLike[str], index: CacheIndex, config: CacheConfig,
                 stats: Stats | None = None) -> None:
        self.root = Path(root)
        self.index = index
        self.config = config
        self.stats = stats if stats is not None else Stats()
        self._cap: int | None = None
        self._measured = 0  # usage at the last measurement
        self._indexed_at = 0  # the index's byte count then
        self._estimate = 0  # usage at the last measurement plus what was written since
        self._admitted = 0  # stores admitted and not yet written (not on disk yet)
        self._written = 0  # bytes this daemon has written, ever (stores racing a measure)
        self._kicked = trio.Event()
        self._no_space = False
        self._pass: trio.Event | None = None
        # A pass could not get under the cap (what is left: chunks written but not yet
        # committed, or nothing evictable): stores go on until new rows are committed
        # (then there is something to evict) or the next watch.
        self._stuck: int | None = None  # the index's byte count after that pass
        self.passes = 0

    # -- the store path (trio thread, no I/O) -------------------------------------

    def over_cap(self) -> bool:
        return self._cap is not None and self._stuck is None and self._estimate > self._cap

    async def admit(self, cache: ChunkCache, nbytes: int) -> None:
        """Count a store of ``nbytes`` before it is written, once the cache has room.

        The store is counted before its write, so stores in flight at the same time
        see each other and the cap is passed by at most the chunk being admitted.
        While the store would pass the cap, a pass evicts; when a pass cannot get
        under (what is left is written but not committed, so not evictable yet), the
        pending stores are committed and one more pass runs. If that cannot get under
        either (everything left is in use), the store goes on: a read never waits on
        a cap it cannot meet.
        """
        for attempt in range(3):
            if self._cap is None or self._estimate + self._admitted + nbytes <= self._cap:
                break
            if attempt or self._stuck is not None:
                await cache.commit()  # committed chunks are evictable
                self._stuck = None
            await self.make_room(cache, self._admitted + nbytes)
        self._admitted += nbytes

    def release(self, nbytes: int) -> None:
        """A store admitted by ``admit`` wrote nothing."""
        self._admitted = max(0, self._admitted - nbytes)

    def note_stored(self, nbytes: int) -> None:
        """A store admitted by ``admit`` was written."""
        self.release(nbytes)
        self._estimate += nbytes
        self._written += nbytes
        if self.over_cap():
            self._kicked.set()

    def note_indexed(self, indexed: int) -> None:
        """The index's byte count after a commit: the other daemons' stores show here."""
        self._estimate = max(self._estimate, self._measured + indexed - self._indexed_at)
        if self._stuck is not None and indexed > self._stuck:
            self._stuck = None  # committed chunks since: evictable
        if self.over_cap():
            self._kicked.set()

    def kick(self) -> None:
        """A store found the disk full: evict at once."""
        self._no_space = True
        self._kicked.set()

    async def make_room(self, cache: ChunkCache, room: int = 0) -> None:
        """Return once an eviction pass (this one, or one already running) has ended."""
        if self._pass is not None:
            await self._pass.wait()
            return
        await self._evict(cache, room)

    # -- the watch task ----------------------------------------------------------------

    async def watch(self, cache: ChunkCache) -> None:
        await self._measure()
        while True:
            with trio.move_on_after(WATCH_SECONDS):
                await self._kicked.wait()
            self._kicked = trio.Event()
            if self._pass is not None:
                continue
            self._stuck = None
            await self._measure()
            if self.over_cap() or self._no_space:
                await self._evict(cache)

    async def _measure(self) -> None:
        def run() -> tuple[Budget, int]:
            indexed = self.index.bytes()
            return budget(self.root, self.config), indexed

        written = self._written
        try:
            b, indexed = await trio.to_thread.run_sync(run)
        except (OSError, CacheError) as e:
            log.warning("measuring the cache: %s", e)
            return
        self._set(b, indexed, written)

    def _set(self, b: Budget, indexed: int, written: int) -> None:
        """A measurement taken from when this daemon had written ``written`` bytes: what it
        wrote since may be missing from it, so it is added (at worst counted twice)."""
        self._cap, self._measured, self._indexed_at = b.cap, b.usage, indexed
        self._estimate = b.usage + self._written - written
        self.stats.cache_bytes = b.usage
        self.stats.cache_cap = b.cap or 0

    async def _evict(self, cache: ChunkCache, room: int = 0) -> None:
        self._pass = done = trio.Event()
        try:
            await cache.flush()  # this daemon's recency first, so it is not evicted blind
            no_space, self._no_space = self._no_space, False
            written = self._written
            try:
                report, b, indexed = await trio.to_thread.run_sync(self._evict_sync, no_space, room)
            except (OSError, CacheError) as e:
                log.error("evicting from the cache: %s", e)
                return
            self._set(b, indexed, written)
            if b.over:
                self._stuck = indexed
                level = logging.WARNING if indexed == 0 else logging.DEBUG
                log.log(level, "cache %s stays at %d bytes, over its cap of %d: the rest is "
                        "in use or not yet committed", self.root, b.usage, b.cap)
            if report is not None:
                self.passes += 1
                self.stats.cache_evictions += report.chunks
                self.stats.cache_evicted_bytes += max(0, report.before - report.after)
                self.index_counters(report)
        finally:
            self._pass = None
            done.set()

    def index_counters(self, report: EvictReport) -> None:
        try:
            self.index.add_counters({"evicted_chunks": report.chunks,
                                     "evicted_bytes": max(0, report.before - report.after),
                                     "evictions": 1})
        except CacheError as e:
            log.warning("%s", e)

    def _evict_sync(self, no_space: bool, room: int = 0
                    ) -> tuple[EvictReport | None, Budget, int]:
        """One pass: down to the target when the cache, plus ``room`` bytes about to be
        written, passes its cap (or the disk is full)."""
        with eviction_lock(self.root):
            b = budget(self.root, self.config)  # another evictor may have done the work
            target = b.target
            if target is not None and b.cap is not None:
                target = max(0, min(target, b.cap - room))  # room for what is about to land
            if no_space:  # the disk is full whatever the cap says: give back a tenth
                target = min(target if target is not None else b.usage, int(b.usage * TARGET))
            report = None
            wanted = b.cap is not None and b.usage + room > b.cap
            if target is not None and (wanted or no_space):
                log.info("cache %s holds %d bytes (cap %s): evicting down to %d", self.root,
                         b.usage, b.cap, target)
                report = evict_to(self.root, self.index, target, b.usage)
                log.info("evicted %d chunks, %d bootstraps, %d blob files: %d -> %d bytes",
                         report.chunks, report.bootstraps, report.blobs, report.before,
                         report.after)
                b = budget(self.root, self.config, report.after)
            return report, b, self.index.bytes()


def open_evictor(root: str | os.PathLike[str], index: CacheIndex | None, config: CacheConfig,
                 stats: Stats) -> Evictor | None:
    """The daemon's evictor (None without an index: nothing to evict by)."""
    if index is None:
        return None
    return Evictor(root, index, config, stats)

