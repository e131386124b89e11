"""The fetcher: makes chunks readable from the cache, fetching the missing ones.

``Fetcher.ensure(indices)`` is called by every read with the chunk-table
indices it covers. For each chunk:

- ready in the cache: nothing to do (a hit);
- being fetched by someone else: wait for that fetch (in-flight dedup: one
  ``_Pending`` with a ``trio.Event`` per chunk, shared by every waiter);
- missing: the chunk joins a fetch. Missing chunks of one blob that lie back
  to back in the compressed blob are merged into one backend read. Which
  other chunks come along is the read-ahead policy's call when the fetcher
  has one (``files``, the daemon's case; ``fused.readahead``): within the file
  being read as it is read sequentially, small files of a directory being
  read, and the chunks that follow in the blob only for images laid out by
  observed access. Without a policy the read is *amplified* in blob order: it
  goes on with the chunks that follow in the blob (neither cached nor in
  flight) until it holds ``amplify_bytes``.

With a policy, the fetcher also *speculates* (``fused.readahead.Speculator``):
after each fetch for a reader, the chunks stored after it in the blob are
queued and fetched in separate background requests (kind ``speculative``), at
most ``SPECULATE_DEPTH`` at a time and each at most ``speculate_request`` bytes,
so a reader's miss never queues behind more than that on the link; a reader
never waits for one unless it needs one of its chunks. Unread speculative
bytes stay within ``speculate_budget``.

``prefetch(indices)`` fetches chunks ahead of readers (the image's start-up
set, in first-access order): merged into pieces of up to ``prefetch_merge``
bytes of one blob (across holes of up to ``PREFETCH_GAP`` bytes), issued in
the order of their first chunk, several at a time: as many as keep the link
busy (``LinkEstimate``: the bandwidth-delay product measured on the first
responses, over the piece size, plus one; at least ``MIN_PREFETCH_DEPTH``).
Readers come first: a piece does not start while an on-demand fetch is in
flight, and a reader that needs a chunk of a piece in flight waits for it.

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

Every request gets an answer, in bounded time. Two rules make it so:

- *Every claim has an owner.* A chunk claimed in ``_inflight`` (by ``ensure``,
  amplification or prefetch) is finished by whoever claimed it until a fetch
  task takes it over, and by that task's ``finally`` after: an exception
  anywhere (a bad record, a bug, a cancellation) still wakes every waiter with
  an error, never leaves one waiting on an event nobody will set.
- *Every wait has a deadline.* A fetch run (all attempts, backoff, queueing
  for a request slot, verification, the refetches of a chunk that failed its
  digest) is cancelled after ``fetch_deadline`` =
  ``RetryPolicy.longest_wait(timeout)`` = ``timeout × (retries + 1)`` plus the
  longest backoff sleeps (each at most ``max(cap, retry_after_cap)``): 190 s
  with the defaults (30 s × 5 + 10 s × 4), failing its chunks. A read
  (``ensure``, ``read``, ``readinto``; ``Vfs.read`` and ``BlobFs.read`` give all
  their calls for one request one ``deadline``) waits at most ``answer_bound``
  = ``fetch_deadline + ANSWER_GRACE`` (195 s) in all, then gets ``ChunkError``
  (EIO). A wait that ends this way is counted in ``internal_errors``: it can
  only happen when the first rule was broken or a worker thread is stuck, and
  it retires the stuck claim so the next reader fetches again.

What the bound does not cover: the local disk. Cache reads are ``pread`` in
the trio thread (``fused.cache``; cheaper than a worker thread per read) and
worker threads (decode, write, probe) cannot be cancelled; a cache disk that
never answers stalls the daemon, as it would any local filesystem.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import math
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio

from rafs.codec import Dictionary, decode_chunk
from rafs.errors import BackendError, DigestError, RafsError, TransientError
from rafs.model import Blob, Chunk
from rafs.retry import Backoff, RetryPolicy

from .backend import Backend
from .cache import ChunkCache
from .errors import ChunkError
from .options import (  # defined there, so that a supervisor knows them without trio
    ANSWER_GRACE,
    DEFAULT_AMPLIFY,
    DEFAULT_FETCH_TIMEOUT,
    DEFAULT_RETRIES,
    READER_RETRY_AFTER_CAP,
)
from .readahead import FileMap, ReadAhead, ReadAheadConfig, Speculator
from .stats import Stats

PREFETCH_GAP = 128 << 10  # prefetch reads span holes up to this size (chunks not listed)
PREFETCH_MERGE = 4 << 20  # bytes per prefetch request
MIN_PREFETCH_DEPTH = 2  # prefetch requests in flight before the link is measured, and at least
RATE_SAMPLE = 256 << 10  # responses this large measure the link's rate
SPECULATE_DEPTH = 2  # speculative requests in flight at most
ONDEMAND_MERGE = 8 << 20  # the largest on-demand read when a read-ahead policy plans it
READ_ATTEMPTS = 4  # a chunk lost from the cache this often in one read: EIO
# Readers wait while a fetch backs off: a server's Retry-After is honoured up to 10 s.
READER_RETRY = RetryPolicy(retry_after_cap=READER_RETRY_AFTER_CAP)

__all__ = [
    "ANSWER_GRACE",
    "DEFAULT_AMPLIFY",
    "DEFAULT_FETCH_TIMEOUT",
    "DEFAULT_RETRIES",
    "Fetcher",
    "LinkEstimate",
    "error_class",
]

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Pending:
    """One chunk being fetched; waiters wait on ``done`` then look at ``error``."""

    done: trio.Event = field(default_factory=trio.Event)
    error: str | None = None


class LinkEstimate:
    """The link as the backend's responses show it: round trip and rate.

    ``rtt`` is the shortest time to the first byte of a response, ``rate`` the
    highest rate over the body of a response of at least ``RATE_SAMPLE``
    bytes; their product is the bandwidth-delay product: the bytes that must
    be requested and not yet received to keep the link busy.
    """

    def __init__(self) -> None:
        self.rtt: float | None = None
        self.rate: float | None = None

    def response(self, first_byte: float, body_seconds: float, received: int) -> None:
        """One response: seconds to its first byte, then for the rest of ``received``."""
        if self.rtt is None or first_byte < self.rtt:
            self.rtt = first_byte
        if received >= RATE_SAMPLE and body_seconds > 0:
            rate = received / body_seconds
            if self.rate is None or rate > self.rate:
                self.rate = rate

    @property
    def bdp(self) -> float | None:
        return None if self.rtt is None or self.rate is None else self.rtt * self.rate

    def depth(self, piece_bytes: int, cap: int) -> int:
        """Requests of ``piece_bytes`` to keep in flight: one being received, and
        enough behind it to cover a round trip."""
        bdp = self.bdp
        if bdp is None:
            return min(MIN_PREFETCH_DEPTH, cap)
        return max(min(MIN_PREFETCH_DEPTH, cap), min(cap, 1 + math.ceil(bdp / piece_bytes)))


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
        prefetch_merge: int = PREFETCH_MERGE,
        prefetch_depth: int | None = None,
        retries: int = DEFAULT_RETRIES,
        retry: RetryPolicy | None = None,
        timeout: float = DEFAULT_FETCH_TIMEOUT,
        dictionaries: Callable[[int], Dictionary | None] | None = None,
        files: Callable[[], FileMap] | None = None,
        placed_by_access: bool = False,
        speculate_bytes: int | None = None,
    ) -> None:
        self.cache = cache
        self.dictionaries = dictionaries  # blob -> its zstd dictionary (Bootstrap.dictionary)
        self.blobs: list[Blob] = cache.blobs
        self.backend = backend
        self.stats = stats if stats is not None else cache.stats
        self.amplify_bytes = amplify_bytes
        self.amplify = amplify  # False: fetch only what readers asked for
        self.prefetch_merge = prefetch_merge
        self.prefetch_depth = prefetch_depth  # None: from the link estimate
        self.link = LinkEstimate()
        self._ondemand = 0  # on-demand fetch runs in flight: prefetch waits for none
        self._ondemand_idle = trio.Event()
        self._ondemand_idle.set()
        # ``retries`` says how many; ``retry`` the shape of the backoff between them
        self.retry = dataclasses.replace(retry or READER_RETRY, retries=retries)
        self.timeout = timeout
        self._next: dict[int, dict[int, int]] = {}  # blob -> chunk -> the chunk stored after it
        self._limiter = trio.CapacityLimiter(max_requests)
        self._inflight: dict[int, _Pending] = {}
        self._dicts: dict[int, Dictionary | None] = {}  # blob -> its zstd dictionary
        self._nursery: trio.Nursery | None = None
        # With ``files`` (the bootstrap's file map, built when the fetcher starts) a
        # fetch follows the reader (fused.readahead); without, tar-order amplification.
        self._files = files
        self._map_started = False  # the file map is built from the first miss on
        self.readahead: ReadAhead | None = None
        self.speculator: Speculator | None = None
        self._spec_wake = trio.Event()
        if files is not None:
            config = ReadAheadConfig(amplify_bytes=amplify_bytes,
                                     placed_by_access=placed_by_access)
            if speculate_bytes is not None:
                config = dataclasses.replace(config, speculate_budget=speculate_bytes)
            self.readahead = ReadAhead(cache.chunk, self._successor, config)
            if (amplify and amplify_bytes > 0 and config.speculate_budget > 0
                    and not placed_by_access):
                self.speculator = Speculator(cache.chunk, self._successor,
                                             config.speculate_budget, config.speculate_request)

    @property
    def fetch_deadline(self) -> float:
        """Seconds after which a fetch run is given up, whatever it is waiting for: every
        attempt taking ``timeout`` and every backoff sleeping as long as the policy allows."""
        return self.retry.longest_wait(self.timeout)

    @property
    def answer_bound(self) -> float:
        """The longest one read (one FUSE request) waits for its chunks before an answer."""
        return self.fetch_deadline + ANSWER_GRACE

    def deadline(self) -> float:
        """The trio clock time by which a read that starts now is answered."""
        return trio.current_time() + self.answer_bound

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Fetcher]:
        """Open the nursery that owns every fetch; cancel them all on exit."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if self.speculator is not None:
                for _ in range(SPECULATE_DEPTH):
                    nursery.start_soon(self._speculate)
            try:
                yield self
            finally:
                self._nursery = None
                nursery.cancel_scope.cancel()

    async def _build_file_map(self) -> None:
        """Build the read-ahead policy's file map in a worker thread, from the first miss
        on (not at mount: a mount is ready sooner); until it is there, misses fetch
        only themselves."""
        assert self._files is not None and self.readahead is not None
        try:
            files = await trio.to_thread.run_sync(self._files)
        except Exception as e:  # the map is optional: a bootstrap it cannot walk costs only it
            log.warning("no file map for read-ahead (fetching only what is read): %s", e)
            return
        self.readahead.files = files
        log.debug("read-ahead file map: %d files", len(files))

    # -- the read path ------------------------------------------------------

    async def ensure(self, indices: Sequence[int], deadline: float | None = None) -> None:
        """Return once every chunk in ``indices`` can be read from the cache.

        Raises ``ChunkError`` if one of them could not be fetched and verified,
        or got no answer by ``deadline`` (trio clock; default ``answer_bound``
        seconds from now).
        """
        cache, stats = self.cache, self.stats
        waits: list[tuple[int, _Pending]] = []
        missing: list[int] = []
        claimed: set[int] = set()  # ours to finish until a fetch task takes them over
        spec = self.speculator
        try:
            for index in indices:
                if spec is not None and spec.read(index):
                    self._spec_wake.set()  # budget given back
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
                        claimed.add(index)
                        missing.append(index)
                stats.cache_misses += 1
                waits.append((index, pending))
            if missing:
                self._start(missing, claimed)
        except BaseException as e:
            for index in claimed:
                self._finish(index, f"chunk {index}: {e or type(e).__name__}")
            raise
        if waits:
            await self._wait(waits, self.deadline() if deadline is None else deadline)

    def hit(self, index: int) -> None:
        """A read served from the cache without ``ensure`` (``Vfs.read``'s fast path)."""
        if self.speculator is not None and self.speculator.read(index):
            self._spec_wake.set()  # budget given back

    async def _wait(self, waits: list[tuple[int, _Pending]], deadline: float) -> None:
        with trio.move_on_at(deadline):
            for _index, pending in waits:
                await pending.done.wait()
                if pending.error is not None:
                    raise ChunkError(pending.error)
            return
        stuck = [(i, p) for i, p in waits if not p.done.is_set()]
        bound = self.answer_bound
        self.stats.internal_errors += 1
        log.error("chunks %s got no answer within %.0fs; retiring their fetches",
                  [i for i, _ in stuck][:8], bound)
        for index, pending in stuck:
            self._finish(index, f"chunk {index}: no answer within {bound:.0f}s", pending)
        raise ChunkError(f"chunk {stuck[0][0]}: no answer within {bound:.0f}s")

    async def read(self, index: int, offset: int, size: int,
                   deadline: float | None = None) -> bytes:
        """The verified bytes [offset, offset+size) of a chunk, fetched (again) as needed.

        A cached chunk that fails its read check (``fused.cache`` rule 5: evicted
        under the reader, or changed on disk) is settled and made ready again.
        Every attempt shares one ``deadline`` (as ``ensure``).
        """
        deadline = self.deadline() if deadline is None else deadline
        for _attempt in range(READ_ATTEMPTS):
            await self.cache.settle(index)
            await self.ensure((index,), deadline)
            data = self.cache.read(index, offset, size)
            if data is not None:
                return data
        raise ChunkError(f"chunk {index}: lost from the cache {READ_ATTEMPTS} times in a row")

    async def readinto(self, index: int, offset: int, view: memoryview,
                       deadline: float | None = None) -> None:
        """``read`` into a buffer."""
        deadline = self.deadline() if deadline is None else deadline
        for _attempt in range(READ_ATTEMPTS):
            await self.cache.settle(index)
            await self.ensure((index,), deadline)
            if self.cache.readinto(index, offset, view):
                return
        raise ChunkError(f"chunk {index}: lost from the cache {READ_ATTEMPTS} times in a row")

    # -- background prefetch -------------------------------------------------

    async def prefetch(self, indices: Iterable[int]) -> int:
        """Fetch the missing chunks of ``indices`` (first-access order), ahead of readers.

        Runs in the caller's task (start it in a nursery). Pieces go out in the
        order of their first chunk in ``indices``, up to the prefetch depth at a
        time, and none starts while an on-demand fetch is in flight, so reads
        always overtake prefetch. A piece claims its chunks only when it starts
        (readers may have fetched some meanwhile); chunks it is fetching are
        in flight like any other: a reader that needs one waits for it.
        Failures are logged and skipped. Returns the number of chunks fetched.
        """
        todo: list[int] = []
        seen: set[int] = set()
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
        fetched = [0]
        slots = trio.CapacityLimiter(self._depth())
        async with trio.open_nursery() as pieces:
            for piece in self._prefetch_pieces(todo):
                slots.total_tokens = self._depth()  # the link may have been measured
                token = object()
                await slots.acquire_on_behalf_of(token)
                await self._readers_first()  # after the wait for a slot: readers came meanwhile
                pieces.start_soon(self._prefetch_batch, piece, slots, token, fetched)
        self.stats.prefetch_chunks += fetched[0]
        return fetched[0]

    def _depth(self) -> int:
        cap = max(1, self._limiter.total_tokens - 1)  # a slot always free for a reader
        if self.prefetch_depth is not None:
            return max(1, min(self.prefetch_depth, cap))
        return self.link.depth(self.prefetch_merge, cap)

    def _prefetch_pieces(self, todo: list[int]) -> list[list[int]]:
        """``todo`` as backend reads (one blob, holes ≤ PREFETCH_GAP, ≤ prefetch_merge
        bytes), in the order of their earliest chunk in ``todo``."""
        position = {index: n for n, index in enumerate(todo)}
        runs = self._plan(todo, self.prefetch_merge, PREFETCH_GAP)
        runs.sort(key=lambda run: min(position[i] for i, _ in run))
        return [[i for i, _ in run] for run in runs]

    async def _readers_first(self) -> None:
        while self._ondemand:
            await self._ondemand_idle.wait()

    async def _prefetch_batch(self, indices: list[int], slots: trio.CapacityLimiter,
                              token: object, fetched: list[int]) -> None:
        """Fetch one piece (what readers have not claimed meanwhile); frees its slot."""
        try:
            run = [i for i in indices if i not in self._inflight and not self.cache.is_ready(i)]
            if not run:
                return
            pending: dict[int, _Pending] = {}
            for piece in self._plan(run, self.prefetch_merge, PREFETCH_GAP):
                # Each piece is claimed as it starts: a reader never waits behind more
                # than one fetch_deadline; pieces a reader took meanwhile are skipped.
                piece = [(i, c) for i, c in piece
                         if i not in self._inflight and not self.cache.is_ready(i)]
                if not piece:
                    continue
                for i, _ in piece:
                    pending[i] = self._inflight[i] = _Pending()
                await self._fetch_run(piece, "prefetch")  # finishes every chunk it claims
            for i, p in pending.items():
                if p.error is None:
                    fetched[0] += 1
                else:
                    log.warning("prefetch of chunk %d failed: %s", i, p.error)
        finally:
            slots.release_on_behalf_of(token)

    def _start(self, missing: list[int], claimed: set[int]) -> None:
        """Hand the claimed chunks ``missing`` to fetch tasks, amplified; each index
        leaves ``claimed`` once a task owns it (the caller finishes the rest on error)."""
        if self._nursery is None:
            raise ChunkError("the fetcher is not running")
        if (self.readahead is not None and not self._map_started
                and not self.readahead.config.placed_by_access):
            self._map_started = True
            self._nursery.start_soon(self._build_file_map)
        if self.readahead is None:
            for run in self._plan(missing, self.amplify_bytes):
                run = self._amplify(run, claimed)
                self._nursery.start_soon(self._fetch_run, run, "ondemand")
                self._ondemand_started()  # prefetch waits while readers fetch
                claimed.difference_update(i for i, _ in run)
            return
        # amplify off, or --amplify-bytes 0: only what readers asked for
        wanted = self.amplify and self.amplify_bytes > 0
        extra: list[int] = []
        if wanted:
            try:
                extra = self.readahead.extra(missing, self._available)
            except RafsError as e:  # read-ahead is an optimisation: never fail the read
                log.warning("read-ahead stopped: %s", e)
        for index in extra:  # claimed like requested ones: a reader of one waits for us
            self._inflight[index] = _Pending()
            claimed.add(index)
        self.stats.readahead_chunks += len(extra)
        for run in self._plan(missing + extra, max(ONDEMAND_MERGE, self.amplify_bytes)):
            self._nursery.start_soon(self._fetch_run, run, "ondemand")
            self._ondemand_started()
            claimed.difference_update(i for i, _ in run)
        if self.speculator is not None:
            try:
                self.speculator.offer(self.readahead.speculate(missing + extra, self._available))
            except RafsError as e:  # speculation is an optimisation: never fail the read
                log.warning("speculation stopped: %s", e)
                return
            self._spec_wake.set()

    async def _speculate(self) -> None:
        """One speculative request slot: fetch what the speculator gives, while it does."""
        spec = self.speculator
        assert spec is not None
        while True:
            try:
                run = spec.next_request(self._available)
            except RafsError as e:
                log.warning("speculation stopped: %s", e)
                run = []
            if not run:
                wake = self._spec_wake
                await wake.wait()
                if self._spec_wake is wake:  # the first slot awake re-arms it
                    self._spec_wake = trio.Event()
                continue
            pending = {i: _Pending() for i in run}
            self._inflight.update(pending)  # claimed: a reader of one waits for this fetch
            await self._fetch_run([(i, self.cache.chunk(i)) for i in run], "speculative")
            for i, p in pending.items():
                if p.error is not None:
                    spec.failed(i)
                    log.debug("speculative fetch of chunk %d failed: %s", i, p.error)

    def _available(self, index: int) -> bool:
        """May chunk ``index`` join a fetch: not cached, in flight, or on this host."""
        return not (index in self._inflight or self.cache.is_ready(index)
                    or self.cache.maybe_local(index))

    def _ondemand_started(self) -> None:
        if not self._ondemand:
            self._ondemand_idle = trio.Event()
        self._ondemand += 1

    def _ondemand_ended(self) -> None:
        self._ondemand -= 1
        if not self._ondemand:
            self._ondemand_idle.set()

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
            table = self._next[blob_index] = {}
            blob = self.blobs[blob_index]
            chunk = self.cache.chunk
            try:
                order = sorted(range(blob.chunk_start, blob.chunk_start + blob.chunk_count),
                               key=lambda i: chunk(i).compressed_offset)
                for a, b in itertools.pairwise(order):
                    ca, cb = chunk(a), chunk(b)
                    if cb.compressed_offset == ca.compressed_offset + ca.compressed_size:
                        table[a] = b
            except RafsError as e:  # a bad record: readers of it get the error, not amplification
                log.warning("blob %d: no read amplification: %s", blob_index, e)
                table.clear()
        return table.get(index)

    def _amplify(self, run: list[tuple[int, Chunk]],
                 claimed: set[int]) -> list[tuple[int, Chunk]]:
        """Extend ``run`` with the chunks that follow it while it is below amplify_bytes.

        Each added chunk is claimed in ``_inflight`` (and in ``claimed``) like a
        requested one, so a reader that wants it meanwhile waits for this fetch.
        Amplification is an optimisation: any error stops it, never the read.
        """
        start = run[0][1].compressed_offset
        last_index, last = run[-1]
        if not self.amplify:
            return run
        if last.compressed_offset + last.compressed_size - start >= self.amplify_bytes:
            return run
        while True:
            try:
                index = self._successor(last_index)
                if (index is None or index in self._inflight or self.cache.is_ready(index)
                        or self.cache.maybe_local(index)):  # on this host already: no refetch
                    return run
                c = self.cache.chunk(index)
            except RafsError as e:
                log.warning("read amplification stopped: %s", e)
                return run
            if c.compressed_offset + c.compressed_size - start > self.amplify_bytes:
                return run
            self._inflight[index] = _Pending()
            claimed.add(index)
            run.append((index, c))
            last_index = index

    def _dictionary(self, blob_index: int) -> Dictionary | None:
        """The blob's zstd dictionary (``dictionaries``: the bootstrap's), asked once."""
        if blob_index not in self._dicts:
            self._dicts[blob_index] = (self.dictionaries(blob_index)
                                       if self.dictionaries is not None else None)
        return self._dicts[blob_index]

    def _finish(self, index: int, error: str | None, pending: _Pending | None = None) -> None:
        """Wake the waiters of chunk ``index`` (of ``pending``, if given) with ``error``."""
        current = self._inflight.get(index)
        if pending is None:
            pending = current
        if pending is None:
            return
        if current is pending:
            del self._inflight[index]
        pending.error = error
        pending.done.set()

    # -- fetching -----------------------------------------------------------

    async def _fetch_run(self, run: list[tuple[int, Chunk]], kind: str) -> None:
        """Fetch ``run`` as one streamed range; each chunk is released as soon as it arrives.

        A transient failure part way keeps the chunks already received and asks
        again for the rest, with backoff; a permanent one (or running out of
        retries, or ``fetch_deadline``) fails the chunks not yet received.
        Whatever happens, every chunk of the run is finished when this returns.
        """
        # The claims this run finishes: only these (a claim a reader retired after
        # answer_bound may have a successor, which is another run's to finish).
        mine = {i: self._inflight.get(i) for i, _ in run}
        todo = list(run)
        try:
            blob = self.blobs[run[0][1].blob_index]
            with trio.move_on_after(self.fetch_deadline) as deadline:
                await self._attempts(blob, todo, kind, mine)
            if deadline.cancelled_caught:
                self.stats.failed("deadline")
                self._fail(todo, f"blob {blob.digest}: no complete answer within "
                           f"{self.fetch_deadline:.0f}s", mine)
        except Exception as e:  # a bug or a record nothing checked: fail the run, not the daemon
            log.exception("fetching chunks %s failed unexpectedly", [i for i, _ in run][:8])
            self.stats.internal_errors += 1
            self._fail(todo, f"internal error: {type(e).__name__}: {e}", mine)
        finally:  # cancelled or crashed: never leave a waiter hanging
            if kind == "ondemand":
                self._ondemand_ended()
            for index, pending in mine.items():
                if pending is not None and not pending.done.is_set():
                    self._finish(index, f"chunk {index}: fetch abandoned", pending)

    async def _attempts(self, blob: Blob, todo: list[tuple[int, Chunk]], kind: str,
                        mine: dict[int, _Pending | None]) -> None:
        backoff = self.retry.start(log)
        async with trio.open_nursery() as verifiers:
            while todo:
                try:
                    await self._stream_run(blob, todo, kind, verifiers, mine)
                except (TransientError, trio.TooSlowError) as e:
                    self.stats.failed(error_class(e))
                    if not await self._backoff(backoff, e, f"blob {blob.digest}: "
                                               f"{len(todo)} chunks from "
                                               f"{todo[0][1].compressed_offset}"):
                        self._fail(todo, f"blob {blob.digest}: giving up after "
                                   f"{backoff.attempts} attempts: {e or 'timed out'}", mine)
                        return
                except RafsError as e:
                    self.stats.failed(error_class(e))
                    self._fail(todo, str(e), mine)
                    return

    async def _stream_run(self, blob: Blob, todo: list[tuple[int, Chunk]], kind: str,
                          verifiers: trio.Nursery, mine: dict[int, _Pending | None]) -> None:
        """One backend request for ``todo``; the chunks received are removed from it."""
        start = todo[0][1].compressed_offset
        end = todo[-1][1].compressed_offset + todo[-1][1].compressed_size
        buf = bytearray()
        base = start  # blob offset of buf[0]
        received = 0
        k = 0
        async with self._limiter:
            asked = trio.current_time()
            first_byte: float | None = None
            pieces = self.backend.stream(blob.digest, start, end - start)
            try:
                while True:
                    with trio.fail_after(self.timeout):  # an idle timeout, not a deadline
                        try:
                            piece = await anext(pieces)
                        except StopAsyncIteration:
                            break
                    if first_byte is None:
                        first_byte = trio.current_time()
                    buf += piece
                    received += len(piece)
                    while k < len(todo):
                        index, c = todo[k]
                        a = c.compressed_offset - base
                        if len(buf) < a + c.compressed_size:
                            break
                        verifiers.start_soon(self._verify_and_store, blob, index, c,
                                             bytes(buf[a : a + c.compressed_size]), kind,
                                             mine.get(index))
                        k += 1
                    if k and todo[k - 1][1].compressed_offset - base > 1 << 20:
                        done = todo[k - 1][1].compressed_offset - base  # keep what is unsent
                        del buf[:done]
                        base += done
            finally:
                del todo[:k]  # on any error the caller retries what is left
                if received:
                    self.stats.fetched(kind, received, k)
                if first_byte is not None:
                    self.link.response(first_byte - asked, trio.current_time() - first_byte,
                                       received)
                await pieces.aclose()
        if received > end - start:
            raise BackendError(f"blob {blob.digest}: backend sent {received} bytes for a read "
                               f"of {end - start}")
        if todo:
            raise TransientError(f"blob {blob.digest}: response ended after {received} of "
                                 f"{end - start} bytes", error_class="truncated")

    def _fail(self, todo: list[tuple[int, Chunk]], message: str,
              mine: dict[int, _Pending | None]) -> None:
        if todo:
            log.error("%s", message)
        for index, _ in todo:
            self._finish(index, f"chunk {index}: {message}", mine.get(index))
        todo.clear()

    async def _backoff(self, backoff: Backoff, e: BaseException, context: str) -> bool:
        """Sleep before the next attempt after ``e``; False when the retries are spent."""
        delay = backoff.next(e, context)
        if delay is None:
            return False
        self.stats.retries += 1
        await trio.sleep(delay)
        return True

    async def _verify_and_store(self, blob: Blob, index: int, c: Chunk, payload: bytes,
                                kind: str, pending: _Pending | None = None) -> None:
        """Decode, verify and cache one chunk; a digest mismatch is fetched again, once
        per source of the backend (a registry's mirrors and the registry), each time
        after telling the backend, so that the refetch comes from the next source."""
        attempts = 1 + self.backend.sources
        for attempt in range(1, attempts + 1):
            try:
                # One worker thread decodes, verifies and writes: zstd, sha256 and
                # pwrite all release the GIL. DigestError means nothing was written.
                await self.cache.store(index, functools.partial(
                    decode_chunk, c, payload, self._dictionary(c.blob_index)))
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
                    self._finish(index, f"chunk {index} of blob {blob.digest}: {e}", pending)
                    return
                log.warning("chunk %d of blob %s: %s; fetching it again", index, blob.digest, e)
            except RafsError as e:
                log.error("chunk %d of blob %s: %s", index, blob.digest, e)
                self._finish(index, f"chunk {index}: {e}", pending)
                return
            except Exception as e:  # never let one chunk take the run (and the daemon) down
                log.exception("chunk %d of blob %s: storing it failed unexpectedly",
                              index, blob.digest)
                self.stats.internal_errors += 1
                self._finish(index, f"chunk {index}: internal error: {type(e).__name__}: {e}",
                             pending)
                return
            try:
                payload = await self._read_one(blob, c, kind)
            except RafsError as e:
                self._finish(index, f"chunk {index}: {e}", pending)
                return
            except Exception as e:
                log.exception("chunk %d of blob %s: refetch failed unexpectedly",
                              index, blob.digest)
                self.stats.internal_errors += 1
                self._finish(index, f"chunk {index}: internal error: {type(e).__name__}: {e}",
                             pending)
                return
        self.stats.coverage.fetched(index, c.uncompressed_size)
        self._finish(index, None, pending)

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
