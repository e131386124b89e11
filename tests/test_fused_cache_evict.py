"""The chunk cache under a cap: eviction never costs a reader a wrong byte or an error,
recency survives restarts, and what is in use is never removed.

In-process stacks (``tests.cache_support.capped_stack``: the daemon's pieces minus
FUSE) over real cache directories, real sqlite, real hole punching; the mounted,
registry-backed versions are in ``test_fused_cache_mount.py``.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import trio

from fused.blobcache import BlobCache
from fused.cache import hold_bootstrap, store_bootstrap
from fused.cacheindex import CacheIndex
from fused.evict import bootstrap_files, evict_to, measure
from tests.cache_support import (
    capped_stack,
    files_image,
    random_files,
    read_everything,
    read_file,
    set_bits_have_rows,
)

CS = 64 << 10


def test_readers_under_a_cap_get_every_byte_and_the_cache_stays_under_it(tmp_path: Path):
    files = random_files(24, 20_000, 400_000)
    img = files_image(tmp_path / "img", files)
    total = sum(len(v) for v in files.values())
    cap = total * 30 // 100
    window = 8 * (128 << 10)  # one fetch window: 8 requests of one 128 KiB read each
    cache = tmp_path / "cache"
    sizes: list[int] = []

    async def main() -> tuple[int, dict[str, object]]:
        async with capped_stack(img, cache, cap) as s:
            wrong = 0

            async def reader(seed: int) -> None:
                nonlocal wrong
                wrong += await read_everything(s.vfs, files, random.Random(seed))

            async def sampler() -> None:
                while True:
                    sizes.append(await trio.to_thread.run_sync(measure, cache))
                    await trio.sleep(0.01)

            async with trio.open_nursery() as n:
                n.start_soon(sampler)
                async with trio.open_nursery() as readers:
                    for seed in range(8):
                        readers.start_soon(reader, seed)
                n.cancel_scope.cancel()
            return wrong, s.stats.snapshot()

    wrong, stats = trio.run(main)
    assert wrong == 0
    assert stats["errors"] == 0
    assert stats["cache_evictions"] > 0 and stats["cache_refetched"] > 0
    assert max(sizes) <= cap + window, (max(sizes), cap)
    assert set_bits_have_rows(cache) == []


def test_a_chunk_evicted_by_another_process_under_a_reader_is_fetched_again(tmp_path: Path):
    files = random_files(4, 200_000, 300_000)
    img = files_image(tmp_path / "img", files)
    cache = tmp_path / "cache"

    async def main() -> None:
        async with capped_stack(img, cache) as s:
            for name in files:
                assert await read_file(s.vfs, name) == files[name]
            await s.cache.commit()
            await s.cache.flush()
            before = len(s.backend.reads)
            # Another process evicts everything while this daemon believes it has it all.
            other = CacheIndex(cache)
            try:
                report = await trio.to_thread.run_sync(evict_to, cache, other, 0)
            finally:
                other.close()
            assert report.chunks > 0
            for name in files:  # every read sees its bits set, then zeros: caught
                assert await read_file(s.vfs, name) == files[name]
            assert s.stats.cache_lost > 0 and s.stats.cache_corrupt == 0
            assert len(s.backend.reads) > before

    trio.run(main)


def test_an_eviction_between_write_and_commit_leaves_the_bits_unset(tmp_path: Path):
    files = {"a": os.urandom(3 * CS)}
    img = files_image(tmp_path / "img", files)
    cache = tmp_path / "cache"

    async def main() -> None:
        async with capped_stack(img, cache) as s:
            index = s.vfs.bootstrap.file_chunks(s.vfs.inode(s.vfs.lookup(1, b"a").ino))[1]
            assert index is not None
            c = s.cache.chunk(index)
            f = s.cache.blob_file(c.blob_index)
            await s.cache.store(index, files["a"][CS:2 * CS])  # no checkpoint: not committed
            f.evict([(c.uncompressed_offset, c.uncompressed_size)])  # punched before commit
            await s.cache.commit()
            assert not f.has(c.uncompressed_offset, c.uncompressed_size)
            assert await read_file(s.vfs, "a") == files["a"]
            await s.cache.commit()
            assert f.has(c.uncompressed_offset, c.uncompressed_size)

    trio.run(main)
    assert set_bits_have_rows(cache) == []


def test_recency_survives_a_restart_and_decides_what_goes(tmp_path: Path):
    import sqlite3

    files = {"old": os.urandom(6 * CS), "new": os.urandom(6 * CS)}
    img = files_image(tmp_path / "img", files)
    cache = tmp_path / "cache"

    async def read(*names: str) -> int:
        async with capped_stack(img, cache) as s:
            for name in names:
                assert await read_file(s.vfs, name) == files[name]
            return len(s.backend.reads)

    assert trio.run(read, "old", "new") > 0  # one daemon stores both
    db = sqlite3.connect(cache / "index.db")  # an hour passes
    with db:
        db.execute("UPDATE chunks SET atime = atime - 3600000")
    db.close()
    assert trio.run(read, "new") == 0  # a second daemon reads one of them: hits only
    index = CacheIndex(cache)
    try:  # its hits were flushed at exit: they decide, not the store times
        report = evict_to(cache, index, measure(cache) - 3 * CS)
        assert report.chunks >= 3
    finally:
        index.close()
    assert trio.run(read, "new") == 0  # the recently read file stayed
    assert trio.run(read, "old") > 0  # the least recently read one went


def test_a_bootstrap_in_use_is_never_removed_and_unused_ones_go_oldest_first(tmp_path: Path):
    import hashlib

    cache = tmp_path / "cache"
    paths = {}
    for k, age in (("a", 300), ("b", 200), ("c", 100)):
        raw = os.urandom(10_000)
        digest = "sha256:" + hashlib.sha256(raw).hexdigest()
        paths[k] = store_bootstrap(cache, digest, raw)
        os.utime(paths[k], (1_000_000 - age, 1_000_000 - age))
    held = hold_bootstrap(paths["a"])  # a is the oldest, but a daemon serves it
    assert held is not None
    index = CacheIndex(cache)
    try:
        usage = measure(cache)
        report = evict_to(cache, index, usage - 1)  # one bootstrap must go
        assert report.bootstraps == 1
        assert paths["a"].exists() and not paths["b"].exists() and paths["c"].exists()
        report = evict_to(cache, index, 0)
        assert paths["a"].exists() and not paths["c"].exists()
        os.close(held)  # the daemon is gone: now it may go
        evict_to(cache, index, 0)
        assert bootstrap_files(cache) == []
    finally:
        index.close()


def test_blob_files_in_use_stay_and_unused_empty_ones_are_removed(tmp_path: Path):
    files = {"a": os.urandom(3 * CS)}
    img = files_image(tmp_path / "img", files)
    cache = tmp_path / "cache"

    async def main() -> None:
        async with capped_stack(img, cache) as s:
            assert await read_file(s.vfs, "a") == files["a"]
            await s.cache.commit()
            index = CacheIndex(cache)
            try:
                evict_to(cache, index, 0)  # every chunk goes; the files are in use: kept
            finally:
                index.close()
            data = s.cache.blob_file(0).data_path
            assert data.exists()
            assert await read_file(s.vfs, "a") == files["a"]  # fetched again
        index = CacheIndex(cache)
        try:
            evict_to(cache, index, 0)
        finally:
            index.close()
        assert not data.exists() and not data.with_suffix(".map").exists()

    trio.run(main)


def test_an_old_version_1_bitmap_is_migrated_not_dropped(tmp_path: Path):
    import struct

    files = {"a": os.urandom(2 * CS)}
    img = files_image(tmp_path / "img", files)
    cache = tmp_path / "cache"

    async def fill() -> None:
        async with capped_stack(img, cache) as s:
            assert await read_file(s.vfs, "a") == files["a"]

    trio.run(fill)
    bitmap = next((cache / "blobs" / "sha256").glob("*.map"))
    raw = bitmap.read_bytes()
    bits = raw[32:]
    bitmap.write_bytes(struct.pack("<8sII", b"RAFSCMAP", 1, 12) + bits)  # as rafs 1 wrote it

    async def again() -> None:
        async with capped_stack(img, cache) as s:
            assert await read_file(s.vfs, "a") == files["a"]
            assert len(s.backend.reads) == 0

    trio.run(again)
    f = BlobCache.existing(cache, img.blob_digests[0])
    assert f is not None
    f.close()
