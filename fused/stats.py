"""The daemon's counters: one ``Stats`` object per mount, bumped in place.

Counters are plain ints (and small dicts of ints) mutated from the trio thread
only (worker threads hand their results back before anything is counted), so
no locking is needed on the hot path. ``snapshot()`` is the JSON that
``rafs stats`` prints; ``fused.metrics`` exposes the same numbers to
Prometheus through ``prometheus_client``.

Backend traffic is counted by kind: ``ondemand`` (a reader is waiting),
``prefetch`` (the background prefetch list) and ``speculative`` (background
guesses of the read-ahead policy, ``fused.readahead.Speculator``). The
``backend_*`` totals are the sums of all kinds. Failed fetches are counted by
class in ``error_classes`` (the ``error_class`` of
``rafs.errors.TransientError``: ``connection``, ``timeout``, ``5xx``, ``429``,
``truncated``, ``range``; ``digest`` for a chunk
whose sha256 did not match; ``other``). ``errors`` counts requests answered
with an error, ``internal_errors`` those answered EIO because of a bug or a
missed deadline (``fused.adapter``), ``fuse_requests`` every request answered,
by operation. The cache counters (hits, misses, corrupt and lost entries,
refetches, evictions, ENOSPC, dedup) and the ``cache_bytes``/``cache_cap``
gauges come from the shared chunk cache (``fused.cache``).

``endpoints`` are the registry endpoints of the mount (mirrors and the
registry, ``rafs.endpoints.EndpointHealth`` objects set by the backend): each
with its state (up/down), requests, errors, bytes, digest errors and stalls.
"""

from __future__ import annotations

import bisect
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

__all__ = ["COVERAGE_BUCKETS", "KINDS", "LATENCY_BUCKETS", "Coverage", "Stats"]

KINDS = ("ondemand", "prefetch", "speculative")

# Upper bounds in seconds of the read-latency histogram (the last bucket is +Inf).
LATENCY_BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0, 30.0)

# Upper bounds of the fraction-read histogram of fetched chunks (the last is 1.0).
COVERAGE_BUCKETS = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)
COVERAGE_PAGE = 4096  # coverage is kept in pages of this size
COVERAGE_LIMIT = 1 << 18  # chunks tracked; beyond, new fetches are not followed


class Coverage:
    """How much of each chunk this daemon fetched was then read (granularity).

    ``fetched`` marks a chunk that came from the backend (on demand, read-ahead
    or prefetch); ``read`` records the byte range a reader got from one chunk,
    in 4 KiB pages (a bit per page in one int per chunk). Only fetched chunks
    are followed, at most ``COVERAGE_LIMIT`` of them. ``snapshot`` gives the
    uncompressed bytes fetched, the part of them read, and a histogram of the
    fraction read per chunk.
    """

    __slots__ = ("_pages", "_sizes", "truncated")

    def __init__(self) -> None:
        self._pages: dict[int, int] = {}  # chunk -> bitmap of pages read
        self._sizes: dict[int, int] = {}  # chunk -> uncompressed size
        self.truncated = False

    def fetched(self, index: int, size: int) -> None:
        if index in self._sizes:
            return
        if len(self._sizes) >= COVERAGE_LIMIT:
            self.truncated = True
            return
        self._sizes[index] = size
        self._pages[index] = 0

    def read(self, index: int, offset: int, size: int) -> None:
        pages = self._pages.get(index)
        if pages is None or size <= 0:
            return
        first, last = offset // COVERAGE_PAGE, (offset + size - 1) // COVERAGE_PAGE
        self._pages[index] = pages | (((1 << (last - first + 1)) - 1) << first)

    def snapshot(self) -> dict[str, object]:
        fetched = read = 0
        counts = [0] * len(COVERAGE_BUCKETS)
        for index, size in self._sizes.items():
            got = min(size, self._pages[index].bit_count() * COVERAGE_PAGE)
            fetched += size
            read += got
            counts[bisect.bisect_left(COVERAGE_BUCKETS, got / size if size else 1.0)] += 1
        return {"chunks": len(self._sizes), "fetched_bytes": fetched, "read_bytes": read,
                "fraction_read": round(read / fetched, 4) if fetched else None,
                "buckets": list(COVERAGE_BUCKETS), "counts": counts,
                "truncated": self.truncated}


HELP = {
    "read_requests": "read requests served to users",
    "read_bytes": "bytes returned to users by read requests",
    "cache_hits": "chunks a read found in the local cache",
    "cache_misses": "chunks a read had to fetch (or wait for)",
    "cache_corrupt": "cached chunks whose xxh3 did not match and were refetched",
    "cache_lost": "chunks a reader found evicted under it (by any process) and got again",
    "cache_refetched": "chunks fetched again after an eviction had removed them",
    "cache_enospc": "chunk writes that found the disk full (served from memory)",
    "cache_write_errors": "chunk writes that failed otherwise (served from memory)",
    "cache_evictions": "chunks this daemon evicted to keep the cache under its cap",
    "cache_evicted_bytes": "bytes this daemon's evictions freed",
    "dedup_hits": "chunks found in another blob on this host instead of being fetched",
    "dedup_bytes": "compressed bytes not fetched because a local copy existed",
    "backend_requests": "requests made to the blob backend",
    "backend_bytes": "compressed bytes fetched from the backend",
    "backend_chunks": "chunks fetched from the backend",
    "backend_errors": "backend requests that failed (each retry counts)",
    "retries": "backend requests retried after a transient failure",
    "range_ignored": "range requests a server answered with the whole blob",
    "prefetch_chunks": "chunks fetched ahead of readers by the prefetch list",
    "readahead_chunks": "chunks the read-ahead policy fetched along with a reader's misses",
    "digest_failures": "fetched chunks whose sha256 did not match",
    "errors": "read requests answered with an error",
    "internal_errors": "requests answered EIO because of an unexpected exception or a missed "
                       "deadline (a bug or a bad image the validator let through)",
    "fuse_requests": "FUSE requests the daemon answered, by operation",
}


def _kinds() -> dict[str, int]:
    return dict.fromkeys(KINDS, 0)


@dataclass(slots=True)
class Stats:
    """Counters of one mount; every number is monotonic except the prefetch state and the
    ``cache_bytes``/``cache_cap`` gauges."""

    read_requests: int = 0
    read_bytes: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    cache_corrupt: int = 0
    cache_lost: int = 0
    cache_refetched: int = 0
    cache_enospc: int = 0
    cache_write_errors: int = 0
    cache_evictions: int = 0
    cache_evicted_bytes: int = 0
    dedup_hits: int = 0
    dedup_bytes: int = 0
    cache_bytes: int = 0  # gauge: the cache directory's size on disk, last measured
    cache_cap: int = 0  # gauge: the cap in force (0: none)
    backend_errors: int = 0
    retries: int = 0
    range_ignored: int = 0
    prefetch_chunks: int = 0
    readahead_chunks: int = 0
    digest_failures: int = 0
    errors: int = 0
    internal_errors: int = 0
    requests: dict[str, int] = field(default_factory=_kinds)
    bytes: dict[str, int] = field(default_factory=_kinds)
    chunks: dict[str, int] = field(default_factory=_kinds)
    error_classes: Counter[str] = field(default_factory=Counter)
    fuse_requests: Counter[str] = field(default_factory=Counter)  # by operation
    prefetch_state: str = "none"  # none | running | done | stopped
    prefetch_planned: int = 0  # chunks on the prefetch list
    latency_counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    latency_sum: float = 0.0
    started: float = field(default_factory=time.time)
    endpoints: dict[str, Any] = field(default_factory=dict)  # name -> EndpointHealth
    coverage: Coverage = field(default_factory=Coverage)  # fraction read of fetched chunks

    # -- recording ------------------------------------------------------------

    def fetched(self, kind: str, nbytes: int, nchunks: int) -> None:
        """One successful backend request of ``kind``."""
        self.requests[kind] += 1
        self.bytes[kind] += nbytes
        self.chunks[kind] += nchunks

    def failed(self, error_class: str) -> None:
        """One failed backend request (or failed chunk check) of ``error_class``."""
        self.backend_errors += 1
        self.error_classes[error_class] += 1

    def read_latency(self, seconds: float) -> None:
        self.latency_counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.latency_sum += seconds

    # -- totals ---------------------------------------------------------------

    @property
    def backend_requests(self) -> int:
        return sum(self.requests.values())

    @property
    def backend_bytes(self) -> int:
        return sum(self.bytes.values())

    @property
    def backend_chunks(self) -> int:
        return sum(self.chunks.values())

    def snapshot(self) -> dict[str, object]:
        """A JSON-serialisable copy of every counter, plus uptime in seconds."""
        return {
            "read_requests": self.read_requests,
            "read_bytes": self.read_bytes,
            "cache_hits": self.cache_hits,
            "cache_misses": self.cache_misses,
            "cache_corrupt": self.cache_corrupt,
            "cache_lost": self.cache_lost,
            "cache_refetched": self.cache_refetched,
            "cache_enospc": self.cache_enospc,
            "cache_write_errors": self.cache_write_errors,
            "cache_evictions": self.cache_evictions,
            "cache_evicted_bytes": self.cache_evicted_bytes,
            "cache_bytes": self.cache_bytes,
            "cache_cap": self.cache_cap,
            "dedup_hits": self.dedup_hits,
            "dedup_bytes": self.dedup_bytes,
            "backend_requests": self.backend_requests,
            "backend_bytes": self.backend_bytes,
            "backend_chunks": self.backend_chunks,
            "backend_errors": self.backend_errors,
            "retries": self.retries,
            "range_ignored": self.range_ignored,
            "prefetch_chunks": self.prefetch_chunks,
            "readahead_chunks": self.readahead_chunks,
            "digest_failures": self.digest_failures,
            "errors": self.errors,
            "internal_errors": self.internal_errors,
            "requests": dict(self.requests),
            "bytes": dict(self.bytes),
            "chunks": dict(self.chunks),
            "error_classes": dict(sorted(self.error_classes.items())),
            "fuse_requests": sum(self.fuse_requests.values()),
            "fuse_requests_by_op": dict(sorted(self.fuse_requests.items())),
            "prefetch": {"state": self.prefetch_state, "planned": self.prefetch_planned,
                         "fetched": self.prefetch_chunks},
            "read_latency": {
                "buckets": [*LATENCY_BUCKETS, "+Inf"],
                "counts": list(self.latency_counts),
                "sum": round(self.latency_sum, 6),
            },
            "endpoints": {name: e.snapshot() for name, e in self.endpoints.items()},
            "coverage": self.coverage.snapshot(),
            "uptime": round(time.time() - self.started, 3),
        }
