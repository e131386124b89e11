"""The fetcher: makes chunks readable from the cache, fetching the missing ones.

``Fetcher.ensure(indices)`` is called by every read with the chunk-table
indices it covers. For each chunk:

- ready in the cache: nothing to do (a hit);
- being fetched by someone else: wait for that fetch (in-flight dedup: one
  ``_Pending`` with a ``trio.Event`` per chunk, shared by every waiter);
- missing: the chunk joins a fetch. Missing chunks of one blob that lie back
  to back in the compressed blob are merged into one backend read (up to
  ``max_merge`` bytes).

``prefetch(indices)`` fetches chunks ahead of readers (the bootstrap's
prefetch list), one backend read at a time so readers always come first.

Fetches run in the fetcher's own nursery (``async with fetcher.running()``),
never in a reader's task, so a reader that goes away does not abort a fetch
others wait for. Backend reads are bounded by a ``trio.CapacityLimiter``;
transient backend errors are retried with exponential backoff and jitter.
Each chunk is decompressed and sha256-verified in a worker thread
(``rafs.codec.decode_chunk``); a mismatch is fetched once more on its own,
and if it fails again the readers get ``ChunkError`` (EIO), the failure is
logged and counted, and nothing is written to the cache. Wrong bytes never
reach the cache or a reader.
"""

from __future__ import annotations

import functools
import logging
import random
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio

from rafs.codec import decode_chunk
from rafs.errors import BackendError, DigestError, RafsError, TransientError
from rafs.model import Blob, Chunk

from .backend import Backend
from .cache import ChunkCache
from .errors import ChunkError
from .stats import Stats

__all__ = ["Fetcher"]

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Pending:
    """One chunk being fetched; waiters wait on ``done`` then look at ``error``."""

    done: trio.Event = field(default_factory=trio.Event)
    error: str | None = None


class Fetcher:
    """Fetches, verifies and caches chunks on behalf of readers."""

    def __init__(
        self,
        cache: ChunkCache,
        backend: Backend,
        stats: Stats | None = None,
        *,
        max_requests: int = 8,
        max_merge: int = 16 << 20,
        retries: int = 3,
        backoff: float = 0.2,
        timeout: float = 60.0,
    ) -> None:
        self.cache = cache
        self.blobs: list[Blob] = cache.blobs
        self.backend = backend
        self.stats = stats if stats is not None else cache.stats
        self.max_merge = max_merge
        self.retries = retries
        self.backoff = backoff
        self.timeout = timeout
        self._limiter = trio.CapacityLimiter(max_requests)
        self._inflight: dict[int, _Pending] = {}
        self._nursery: trio.Nursery | None = None

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Fetcher]:
        """Open the nursery that owns every fetch; cancel them all on exit."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                yield self
            finally:
                self._nursery = None
                nursery.cancel_scope.cancel()

    # -- the read path ------------------------------------------------------

    async def ensure(self, indices: Sequence[int]) -> None:
        """Return once every chunk in ``indices`` can be read from the cache.

        Raises ``ChunkError`` if one of them could not be fetched and verified.
        """
        cache, stats = self.cache, self.stats
        waits: list[_Pending] = []
        missing: list[int] = []
        for index in indices:
            if cache.is_ready(index):
                stats.cache_hits += 1
                continue
            pending = self._inflight.get(index)
            if pending is None:
                if await cache.probe(index):
                    stats.cache_hits += 1
                    continue
                pending = self._inflight.get(index)  # someone may have started meanwhile
                if pending is None:
                    pending = self._inflight[index] = _Pending()
                    missing.append(index)
            stats.cache_misses += 1
            waits.append(pending)
        if missing:
            self._start(missing)
        for pending in waits:
            await pending.done.wait()
            if pending.error is not None:
                raise ChunkError(pending.error)

    # -- background prefetch -------------------------------------------------

    async def prefetch(self, indices: Iterable[int], batch: int = 64) -> int:
        """Fetch the missing chunks of ``indices`` in order, at low priority.

        Runs in the caller's task (start it in a nursery) and issues one backend
        read at a time, so on-demand reads, which may use every slot of the
        limiter, always overtake it. Chunks it is fetching are in-flight like any
        other: a reader that needs one waits for it instead of fetching it again.
        Failures are logged and skipped. Returns the number of chunks fetched.
        """
        fetched = 0
        seen: set[int] = set()
        todo: list[int] = []
        for n, index in enumerate(indices):
            if n % 256 == 255:
                await trio.lowlevel.checkpoint()  # cached stretches never await otherwise
            if index in seen:
                continue
            seen.add(index)
            if (self.cache.is_ready(index) or index in self._inflight
                    or await self.cache.probe(index)):
                continue
            todo.append(index)
            if len(todo) >= batch:
                fetched += await self._prefetch_batch(todo)
                todo = []
        if todo:
            fetched += await self._prefetch_batch(todo)
        return fetched

    async def _prefetch_batch(self, indices: list[int]) -> int:
        ok = 0
        for planned in self._plan(indices):
            # Claim a run only when it starts, so readers never queue behind prefetch;
            # readers may have fetched some of it meanwhile.
            run = [(i, c) for i, c in planned
                   if i not in self._inflight and not self.cache.is_ready(i)]
            if not run:
                continue
            pending = {i: self._inflight.setdefault(i, _Pending()) for i, _ in run}
            for piece in self._plan([i for i, _ in run]):  # re-split where gaps appeared
                await self._fetch_run(piece)
            for i, p in pending.items():
                if p.error is None:
                    ok += 1
                else:
                    log.warning("prefetch of chunk %d failed: %s", i, p.error)
        self.stats.prefetch_chunks += ok
        return ok

    def _start(self, missing: list[int]) -> None:
        if self._nursery is None:
            err = "the fetcher is not running"
            for index in missing:
                self._finish(index, err)
            raise ChunkError(err)
        for run in self._plan(missing):
            self._nursery.start_soon(self._fetch_run, run)

    def _plan(self, missing: list[int]) -> list[list[tuple[int, Chunk]]]:
        """Group chunks into backend reads: same blob, back to back, ≤ max_merge."""
        chunks = sorted(
            ((i, self.cache.chunk(i)) for i in missing),
            key=lambda ic: (ic[1].blob_index, ic[1].compressed_offset),
        )
        runs: list[list[tuple[int, Chunk]]] = []
        for index, c in chunks:
            if runs:
                last = runs[-1][-1][1]
                start = runs[-1][0][1].compressed_offset
                if (
                    c.blob_index == last.blob_index
                    and c.compressed_offset == last.compressed_offset + last.compressed_size
                    and c.compressed_offset + c.compressed_size - start <= self.max_merge
                ):
                    runs[-1].append((index, c))
                    continue
            runs.append([(index, c)])
        return runs

    def _finish(self, index: int, error: str | None) -> None:
        pending = self._inflight.pop(index, None)
        if pending is not None:
            pending.error = error
            pending.done.set()

    # -- fetching -----------------------------------------------------------

    async def _fetch_run(self, run: list[tuple[int, Chunk]]) -> None:
        blob = self.blobs[run[0][1].blob_index]
        try:
            start = run[0][1].compressed_offset
            end = run[-1][1].compressed_offset + run[-1][1].compressed_size
            try:
                payload = await self._read(blob, start, end - start, len(run))
            except RafsError as e:
                for index, _ in run:
                    self._finish(index, f"chunk {index}: {e}")
                return
            async with trio.open_nursery() as nursery:
                for index, c in run:
                    a = c.compressed_offset - start
                    nursery.start_soon(
                        self._verify_and_store, blob, index, c, payload[a : a + c.compressed_size]
                    )
        finally:
            for index, _ in run:  # cancelled or crashed: never leave a waiter hanging
                self._finish(index, f"chunk {index}: fetch abandoned")

    async def _verify_and_store(self, blob: Blob, index: int, c: Chunk, payload: bytes) -> None:
        for attempt in (1, 2):
            try:
                # One worker thread decodes, verifies and writes: zstd, sha256 and
                # pwrite all release the GIL. DigestError means nothing was written.
                await self.cache.store(index, functools.partial(decode_chunk, c, payload))
                break
            except DigestError as e:
                self.stats.digest_failures += 1
                if attempt == 2:
                    log.error(
                        "chunk %d of blob %s failed verification twice, giving up: %s",
                        index, blob.digest, e,
                    )
                    self._finish(index, f"chunk {index} of blob {blob.digest}: {e}")
                    return
                log.warning("chunk %d of blob %s: %s; fetching it again", index, blob.digest, e)
            except RafsError as e:
                log.error("chunk %d of blob %s: %s", index, blob.digest, e)
                self._finish(index, f"chunk {index}: {e}")
                return
            try:
                payload = await self._read(blob, c.compressed_offset, c.compressed_size, 1)
            except RafsError as e:
                self._finish(index, f"chunk {index}: {e}")
                return
        self._finish(index, None)

    async def _read(self, blob: Blob, offset: int, length: int, nchunks: int) -> bytes:
        """One backend read, retried with backoff and jitter while transient."""
        attempt = 0
        while True:
            attempt += 1
            try:
                async with self._limiter:
                    self.stats.backend_requests += 1
                    with trio.fail_after(self.timeout):
                        data = await self.backend.read(blob.digest, offset, length)
                if len(data) != length:
                    raise TransientError(
                        f"backend returned {len(data)} bytes for a read of {length}"
                    )
            except (TransientError, trio.TooSlowError) as e:
                self.stats.backend_errors += 1
                if attempt > self.retries:
                    raise BackendError(
                        f"blob {blob.digest} at {offset}+{length}: giving up after "
                        f"{attempt} attempts: {e or 'timed out'}"
                    ) from None
                delay = self.backoff * 2 ** (attempt - 1) * random.uniform(0.5, 1.5)
                level = logging.INFO if attempt == 1 else logging.WARNING
                log.log(
                    level, "blob %s at %d+%d: %s; retrying in %.2fs",
                    blob.digest, offset, length, e or "timed out", delay,
                )
                await trio.sleep(delay)
                continue
            except BackendError:
                self.stats.backend_errors += 1
                raise
            self.stats.backend_bytes += length
            self.stats.backend_chunks += nchunks
            return data
