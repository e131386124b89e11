"""Test support for the chunk cache's cap, eviction, dedup and verification tests.

Owns: ``capped_stack`` (the daemon's pieces wired as ``fused.cachehost`` wires
them: host index, evictor with a cap, chunk cache, fetcher, vfs; minus FUSE),
``files_image`` (a RAFS image of random files through the builder),
``read_everything`` (every file of a stack, checked against the expected
bytes), ``cache_size`` (what the cap applies to, as ``fused.evict.measure``
counts it, for sampling), ``tamper`` (change bytes of a cache data file and
drop that file's page cache, nothing else) and ``set_bits_have_rows`` (the
index invariant of ``fused.cache`` rule 6).
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from fused.backend import Backend, LocalBackend
from fused.blobcache import BlobCache, blob_digests
from fused.cache import ChunkCache
from fused.cacheconf import CacheConfig, Limit
from fused.cacheindex import CacheIndex
from fused.evict import Evictor, measure
from fused.fetcher import Fetcher
from fused.stats import Stats
from fused.vfs import Vfs
from rafs.bootstrap import Bootstrap
from rafs.model import Node
from tests.fused_support import CountingBackend, WrittenImage, write_rafs_image
from tests.helpers.images import ImageParts

MTIME = 1_600_000_000


@dataclass
class CappedStack:
    bootstrap: Bootstrap
    backend: CountingBackend
    stats: Stats
    cache: ChunkCache
    evictor: Evictor
    fetcher: Fetcher
    vfs: Vfs


@asynccontextmanager
async def capped_stack(image: WrittenImage, cache_dir: Path, cap: int | None = None,
                       backend: Backend | None = None, **fetcher_kw: Any
                       ) -> AsyncIterator[CappedStack]:
    """The daemon's stack over ``image`` with the cache capped at ``cap`` bytes."""
    fetcher_kw.setdefault("amplify", False)
    bootstrap = Bootstrap.from_bytes(image.bootstrap)
    counting = CountingBackend(backend or LocalBackend(image.layout))
    stats = Stats()
    index = CacheIndex(cache_dir)
    config = CacheConfig(cache_dir, Limit(bytes=cap) if cap is not None else None, None)
    evictor = Evictor(cache_dir, index, config, stats)
    cache = ChunkCache(cache_dir, bootstrap.blobs, bootstrap.chunk, stats, index=index,
                       evictor=evictor, owns_index=True)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(cache.run)
            fetcher = Fetcher(cache, counting, stats, **fetcher_kw)
            async with fetcher.running():
                yield CappedStack(bootstrap, counting, stats, cache, evictor, fetcher,
                                  Vfs(bootstrap, fetcher))
            nursery.cancel_scope.cancel()
    finally:
        cache.close()
        await counting.aclose()


def files_image(path: Path, files: dict[str, bytes], chunk_size: int = 64 << 10,
                order: list[str] | None = None) -> WrittenImage:
    """A one-blob RAFS image of ``files`` (laid out in ``order``, default sorted)."""
    parts = ImageParts(Node.directory(0o755, mtime=MTIME), chunk_size=chunk_size)
    parts.new_blob()
    assert parts.root.children is not None
    for name in order or sorted(files):
        parts.root.children[name.encode()] = parts.file(files[name], mtime=MTIME)
    return write_rafs_image(parts, path)


def random_files(n: int, low: int, high: int, seed: int = 1) -> dict[str, bytes]:
    rng = random.Random(seed)
    return {f"f{i:03d}": rng.randbytes(rng.randrange(low, high)) for i in range(n)}


async def read_file(vfs: Vfs, name: str) -> bytes:
    attr = vfs.lookup(1, name.encode())
    assert attr is not None, name
    out = bytearray()
    pos = 0
    while pos < attr.size:  # 128 KiB requests, like the kernel's
        piece = await vfs.read(attr.ino, pos, 128 << 10)
        assert piece, f"{name}: short read at {pos}"
        out += piece
        pos += len(piece)
    return bytes(out)


async def read_everything(vfs: Vfs, files: dict[str, bytes], rng: random.Random) -> int:
    """Read every file in random order; return how many differed from ``files``."""
    wrong = 0
    names = list(files)
    rng.shuffle(names)
    for name in names:
        data = await read_file(vfs, name)
        if hashlib.sha256(data).digest() != hashlib.sha256(files[name]).digest():
            wrong += 1
    return wrong


def cache_size(cache_dir: Path) -> int:
    return measure(cache_dir)


def tamper(path: Path, offsets: list[int], rng: random.Random) -> None:
    """Flip bytes of a cache data file as another process would, then drop its page cache."""
    fd = os.open(path, os.O_RDWR)
    try:
        for off in offsets:
            old = os.pread(fd, 16, off)
            os.pwrite(fd, bytes(b ^ (rng.randrange(1, 256)) for b in old), off)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def set_bits_have_rows(cache_dir: Path) -> list[str]:
    """Violations of "a set bit has a row" (fused.cache rule 6), as readable lines."""
    index = CacheIndex(cache_dir)
    problems = []
    try:
        for digest in blob_digests(cache_dir):
            f = BlobCache.existing(cache_dir, digest)
            if f is None:
                continue
            try:
                covered = [False] * (f.span >> 12)
                for r in index.rows_of_blob(digest):
                    for b in range(r.off >> 12, (r.off + r.size + 4095) >> 12):
                        if b < len(covered):
                            covered[b] = True
                for start, length in f.set_ranges():
                    for b in range(start >> 12, (start + length) >> 12):
                        if not covered[b]:
                            problems.append(f"{digest}: block {b} set without a row")
                            break
            finally:
                f.close()
    finally:
        index.close()
    return problems
