"""The fetcher: makes chunks readable from the cache, fetching the missing ones.

``Fetcher.ensure(indices)`` is called by every read with the chunk-table
indices it covers. For each chunk:

- ready in the cache: nothing to do (a hit);
- being fetched by someone else: wait for that fetch (in-flight dedup: one
  ``_Pending`` with a ``trio.Event`` per chunk, shared by every waiter);
- missing: the chunk joins a fetch. Missing chunks of one blob that lie back
  to back in the compressed blob are merged into one backend read, and the
  read is *amplified*: it goes on with the chunks that follow in the blob
  (neither cached nor in flight) until it holds ``amplify_bytes``. The
  converter lays files out in access order, so the neighbours are what a
  starting program reads next; one Range request then serves many files.

``prefetch(indices)`` fetches chunks ahead of readers (the bootstrap's
prefetch list), one backend read at a time (merged up to ``prefetch_merge``
bytes, across holes of up to ``PREFETCH_GAP`` bytes) so readers always come first.

Fetches run in the fetcher's own nursery (``async with fetcher.running()``),
never in a reader's task, so a reader that goes away does not abort a fetch
others wait for. Backend reads are bounded by a ``trio.CapacityLimiter``;
transient backend errors are retried under ``rafs.retry.RetryPolicy``
(exponential backoff with jitter; a ``retry_after`` the server sent is
honoured up to the policy's cap).
Each chunk is decompressed and sha256-verified in a worker thread
(``rafs.codec.decode_chunk``); a mismatch is fetched again on its own, once
per source of the backend (``Backend.distrust`` first: a registry's mirror that
sent it is passed over), and if it fails every time the readers get
``ChunkError`` (EIO), the failure is logged and counted, and nothing is
written to the cache. Wrong bytes never reach the cache or a reader.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio

from rafs.codec import decode_chunk
from rafs.errors import BackendError, DigestError, RafsError, TransientError
from rafs.model import Blob, Chunk
from rafs.retry import Backoff, RetryPolicy

from .backend import Backend
from .options import DEFAULT_AMPLIFY, DEFAULT_FETCH_TIMEOUT, DEFAULT_RETRIES
from .cache import ChunkCache
from .errors import ChunkError
from .stats import Stats

PREFETCH_GAP = 128 << 10  # prefetch reads span holes up to this size (chunks not listed)
# Readers wait while a fetch backs off: a server's Retry-After is honoured up to 10 s.
READER_RETRY = RetryPolicy(retry_after_cap=10.0)

__all__ = ["DEFAULT_AMPLIFY", "DEFAULT_FETCH_TIMEOUT", "DEFAULT_RETRIES", "Fetcher", "error_class"]

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
        amplify_bytes: int = DEFAULT_AMPLIFY,
        amplify: bool = True,
        prefetch_merge: int = 16 << 20,
        retries: int = DEFAULT_RETRIES,
        retry: RetryPolicy | None = None,
        timeout: float = DEFAULT_FETCH_TIMEOUT,
    ) -> None:
        self.cache = cache
        self.blobs: list[Blob] = cache.blobs
        self.backend = backend
        self.stats = stats if stats is not None else cache.stats
        self.amplify_bytes = amplify_bytes
        self.amplify = amplify  # False: fetch only what readers asked for
        self.prefetch_merge = prefetch_merge
        # ``retries`` says how many; ``retry`` the shape of the backoff between them
        self.retry = dataclasses.replace(retry or READER_RETRY, retries=retries)
        self.timeout = timeout
        self._next: dict[int, dict[int, int]] = {}  # blob -> chunk -> the chunk stored after it
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

    async def prefetch(self, indices: Iterable[int]) -> int:
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
        todo_bytes = 0
        batch_bytes = 4 * self.prefetch_merge  # planned together: merged across the list
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
            todo_bytes += self.cache.chunk(index).compressed_size
            if todo_bytes >= batch_bytes:
                fetched += await self._prefetch_batch(todo)
                todo, todo_bytes = [], 0
        if todo:
            fetched += await self._prefetch_batch(todo)
        return fetched

    async def _prefetch_batch(self, indices: list[int]) -> int:
        ok = 0
        for planned in self._plan(indices, self.prefetch_merge, PREFETCH_GAP):
            # Claim a run only when it starts, so readers never queue behind prefetch;
            # readers may have fetched some of it meanwhile.
            run = [i for i, _ in planned if i not in self._inflight and not self.cache.is_ready(i)]
            if not run:
                continue
            pending = {i: self._inflight.setdefault(i, _Pending()) for i in run}
            for piece in self._plan(run, self.prefetch_merge, PREFETCH_GAP):  # readers took some
                await self._fetch_run(piece, "prefetch")
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
        for run in self._plan(missing, self.amplify_bytes):
            self._nursery.start_soon(self._fetch_run, self._amplify(run), "ondemand")

    def _plan(self, missing: list[int], limit: int,
              max_gap: int = 0) -> list[list[tuple[int, Chunk]]]:
        """Group chunks into backend reads: same blob, at most ``max_gap`` bytes apart
        (fetched and dropped: cheaper than another round trip), ≤ ``limit`` bytes."""
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
                    and 0 <= c.compressed_offset - (last.compressed_offset
                                                    + last.compressed_size) <= max_gap
                    and c.compressed_offset + c.compressed_size - start <= limit
                ):
                    runs[-1].append((index, c))
                    continue
            runs.append([(index, c)])
        return runs

    def _successor(self, index: int) -> int | None:
        """The chunk stored right after chunk ``index`` in its blob, if any.

        Built per blob on first use from the blob's chunk range, sorted by
        compressed offset (the converter writes them in order, so this is cheap).
        """
        blob_index = self.cache.chunk(index).blob_index
        table = self._next.get(blob_index)
        if table is None:
            blob = self.blobs[blob_index]
            chunk = self.cache.chunk
            order = sorted(range(blob.chunk_start, blob.chunk_start + blob.chunk_count),
                           key=lambda i: chunk(i).compressed_offset)
            table = self._next[blob_index] = {}
            for a, b in itertools.pairwise(order):
                ca, cb = chunk(a), chunk(b)
                if cb.compressed_offset == ca.compressed_offset + ca.compressed_size:
                    table[a] = b
        return table.get(index)

    def _amplify(self, run: list[tuple[int, Chunk]]) -> list[tuple[int, Chunk]]:
        """Extend ``run`` with the chunks that follow it while it is below amplify_bytes.

        Each added chunk is claimed in ``_inflight`` like a requested one, so a
        reader that wants it meanwhile waits for this fetch.
        """
        start = run[0][1].compressed_offset
        last_index, last = run[-1]
        if not self.amplify:
            return run
        if last.compressed_offset + last.compressed_size - start >= self.amplify_bytes:
            return run
        while True:
            index = self._successor(last_index)
            if index is None or index in self._inflight or self.cache.is_ready(index):
                return run
            c = self.cache.chunk(index)
            if c.compressed_offset + c.compressed_size - start > self.amplify_bytes:
                return run
            self._inflight[index] = _Pending()
            run.append((index, c))
            last_index = index

    def _finish(self, index: int, error: str | None) -> None:
        pending = self._inflight.pop(index, None)
        if pending is not None:
            pending.error = error
            pending.done.set()

    # -- fetching -----------------------------------------------------------

    async def _fetch_run(self, run: list[tuple[int, Chunk]], kind: str) -> None:
        """Fetch ``run`` as one streamed range; each chunk is released as soon as it arrives.

        A transient failure part way keeps the chunks already received and asks
        again for the rest, with backoff; a permanent one (or running out of
        retries) fails the chunks not yet received.
        """
        blob = self.blobs[run[0][1].blob_index]
        claimed = [(i, self._inflight.get(i)) for i, _ in run]
        todo = list(run)
        backoff = self.retry.start(log)
        try:
            async with trio.open_nursery() as verifiers:
                while todo:
                    try:
                        await self._stream_run(blob, todo, kind, verifiers)
                    except (TransientError, trio.TooSlowError) as e:
                        self.stats.failed(error_class(e))
                        if not await self._backoff(backoff, e, f"blob {blob.digest}: "
                                                   f"{len(todo)} chunks from "
                                                   f"{todo[0][1].compressed_offset}"):
                            self._fail(todo, f"blob {blob.digest}: giving up after "
                                       f"{backoff.attempts} attempts: {e or 'timed out'}")
                            return
                    except RafsError as e:
                        self.stats.failed(error_class(e))
                        self._fail(todo, str(e))
                        return
        finally:  # cancelled or crashed: never leave a waiter hanging
            for index, pending in claimed:
                if pending is not None and not pending.done.is_set():
                    self._finish(index, f"chunk {index}: fetch abandoned")

    async def _stream_run(self, blob: Blob, todo: list[tuple[int, Chunk]], kind: str,
                          verifiers: trio.Nursery) -> None:
        """One backend request for ``todo``; the chunks received are removed from it."""
        start = todo[0][1].compressed_offset
        end = todo[-1][1].compressed_offset + todo[-1][1].compressed_size
        buf = bytearray()
        base = start  # blob offset of buf[0]
        received = 0
        k = 0
        async with self._limiter:
            pieces = self.backend.stream(blob.digest, start, end - start)
            try:
                while True:
                    with trio.fail_after(self.timeout):  # an idle timeout, not a deadline
                        try:
                            piece = await anext(pieces)
                        except StopAsyncIteration:
                            break
                    buf += piece
                    received += len(piece)
                    while k < len(todo):
                        index, c = todo[k]
                        a = c.compressed_offset - base
                        if len(buf) < a + c.compressed_size:
                            break
                        verifiers.start_soon(self._verify_and_store, blob, index, c,
                                             bytes(buf[a : a + c.compressed_size]), kind)
                        k += 1
                    if k and todo[k - 1][1].compressed_offset - base > 1 << 20:
                        done = todo[k - 1][1].compressed_offset - base  # keep what is unsent
                        del buf[:done]
                        base += done
            finally:
                del todo[:k]  # on any error the caller retries what is left
                if received:
                    self.stats.fetched(kind, received, k)
                await pieces.aclose()
        if received > end - start:
            raise BackendError(f"blob {blob.digest}: backend sent {received} bytes for a read "
                               f"of {end - start}")
        if todo:
            raise TransientError(f"blob {blob.digest}: response ended after {received} of "
                                 f"{end - start} bytes", error_class="truncated")

    def _fail(self, todo: list[tuple[int, Chunk]], message: str) -> None:
        log.error("%s", message)
        for index, _ in todo:
            self._finish(index, f"chunk {index}: {message}")

    async def _backoff(self, backoff: Backoff, e: BaseException, context: str) -> bool:
        """Sleep before the next attempt after ``e``; False when the retries are spent."""
        delay = backoff.next(e, context)
        if delay is None:
            return False
        self.stats.retries += 1
        await trio.sleep(delay)
        return True

    async def _verify_and_store(self, blob: Blob, index: int, c: Chunk, payload: bytes,
                                kind: str) -> None:
        """Decode, verify and cache one chunk; a digest mismatch is fetched again, once
        per source of the backend (a registry's mirrors and the registry), each time
        after telling the backend, so that the refetch comes from the next source."""
        attempts = 1 + self.backend.sources
        for attempt in range(1, attempts + 1):
            try:
                # One worker thread decodes, verifies and writes: zstd, sha256 and
                # pwrite all release the GIL. DigestError means nothing was written.
                await self.cache.store(index, functools.partial(decode_chunk, c, payload))
                break
            except DigestError as e:
                self.stats.digest_failures += 1
                self.stats.error_classes["digest"] += 1
                self.backend.distrust(blob.digest, c.compressed_offset, c.compressed_size)
                if attempt == attempts:
                    log.error(
                        "chunk %d of blob %s failed verification %d times, giving up: %s",
                        index, blob.digest, attempts, e,
                    )
                    self._finish(index, f"chunk {index} of blob {blob.digest}: {e}")
                    return
                log.warning("chunk %d of blob %s: %s; fetching it again", index, blob.digest, e)
            except RafsError as e:
                log.error("chunk %d of blob %s: %s", index, blob.digest, e)
                self._finish(index, f"chunk {index}: {e}")
                return
            try:
                payload = await self._read_one(blob, c, kind)
            except RafsError as e:
                self._finish(index, f"chunk {index}: {e}")
                return
        self._finish(index, None)

    async def _read_one(self, blob: Blob, c: Chunk, kind: str) -> bytes:
        """The compressed bytes of one chunk, fetched on their own with retries."""
        backoff = self.retry.start(log)
        while True:
            try:
                async with self._limiter:
                    with trio.fail_after(self.timeout):
                        data = await self.backend.read(blob.digest, c.compressed_offset,
                                                       c.compressed_size)
                if len(data) != c.compressed_size:
                    raise TransientError(f"backend returned {len(data)} bytes for a read of "
                                         f"{c.compressed_size}")
            except (TransientError, trio.TooSlowError) as e:
                self.stats.failed(error_class(e))
                where = f"blob {blob.digest} at {c.compressed_offset}"
                if not await self._backoff(backoff, e, where):
                    raise BackendError(f"{where}: giving up after {backoff.attempts} attempts: "
                                       f"{e or 'timed out'}") from None
                continue
            except BackendError as e:
                self.stats.failed(error_class(e))
                raise
            self.stats.fetched(kind, len(data), 1)
            return data


def error_class(exc: BaseException) -> str:
    """The class a failed backend request is counted under."""
    if isinstance(exc, trio.TooSlowError):
        return "timeout"
    cls = getattr(exc, "error_class", None)
    return cls if isinstance(cls, str) else "other"
