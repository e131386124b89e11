"""Node-wide dedup: a chunk already on this host, in any image's blob, is never fetched again
and is stored once.

In-process stacks over two images whose blobs differ (the same files laid out in
another order, as two separate conversions without a chunk dictionary give); the
registry-backed version through ``rafs convert`` is in ``test_fused_cache_mount.py``.
"""

from __future__ import annotations

import random
from pathlib import Path

import trio

from fused.evict import measure
from fused.vfs import Vfs
from tests.cache_support import capped_stack, files_image, random_files, read_everything

CS = 64 << 10


async def _read_into(vfs: Vfs, files: dict[str, bytes], seed: int, out: list[int]) -> None:
    out.append(await read_everything(vfs, files, random.Random(seed)))


def allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


def test_shared_chunks_come_from_the_other_image_and_are_stored_once(tmp_path: Path):
    shared = random_files(10, 50_000, 300_000, seed=1)
    own_a = {"a-only": random.Random(2).randbytes(400_000)}
    own_b = {"b-only": random.Random(3).randbytes(300_000)}
    a = files_image(tmp_path / "a", {**shared, **own_a})
    order = ["b-only", *sorted(shared, reverse=True)]
    b = files_image(tmp_path / "b", {**shared, **own_b}, order=order)
    assert a.blob_digests != b.blob_digests  # converted separately: different blobs
    cache = tmp_path / "cache"

    async def main() -> None:
        async with capped_stack(a, cache) as s:
            assert await read_everything(s.vfs, {**shared, **own_a}, random.Random(4)) == 0
        after_a = measure(cache)
        async with capped_stack(b, cache) as s:
            wrong = []
            async with trio.open_nursery() as n:  # two readers: each chunk counted once
                for seed in (5, 5):
                    n.start_soon(lambda seed=seed: _read_into(s.vfs, shared, seed, wrong))
            assert wrong == [0, 0]
            assert s.backend.reads == []  # not one byte of the shared files fetched
            chunks = sum(-(-len(v) // CS) for v in shared.values())
            assert s.stats.dedup_hits == chunks
            assert s.stats.dedup_bytes > 0
            await s.cache.commit()
        b_data = cache / "blobs" / "sha256" / (b.blob_digests[0].removeprefix("sha256:")
                                               + ".data")
        assert allocated(b_data) == 0  # stored once: B reads A's copy
        assert measure(cache) - after_a < 64 << 10  # B added a bitmap, no data
        async with capped_stack(b, cache) as s:  # a later daemon finds them again
            assert await read_everything(s.vfs, {**shared, **own_b}, random.Random(6)) == 0
            node = s.vfs.inode(s.vfs.lookup(1, b"b-only").ino)
            own = sum(s.cache.chunk(i).compressed_size
                      for i in s.bootstrap.file_chunks(node) if i is not None)
            assert sum(n for _d, _o, n in s.backend.reads) == own  # only b-only's bytes

    trio.run(main)


def test_a_dedup_source_that_went_bad_is_not_used(tmp_path: Path):
    from tests.cache_support import tamper

    shared = {"s": random.Random(1).randbytes(4 * CS)}
    a = files_image(tmp_path / "a", shared)
    b = files_image(tmp_path / "b", {**shared, "0": b"x" * 5000}, order=["0", "s"])
    cache = tmp_path / "cache"

    async def main() -> None:
        async with capped_stack(a, cache) as s:
            assert await read_everything(s.vfs, shared, random.Random(1)) == 0
        a_data = cache / "blobs" / "sha256" / (a.blob_digests[0].removeprefix("sha256:")
                                               + ".data")
        tamper(a_data, [CS + 100], random.Random(2))  # A's copy of chunk 1 rots
        async with capped_stack(b, cache) as s:
            assert await read_everything(s.vfs, shared, random.Random(3)) == 0
            assert s.stats.dedup_hits == 3 and s.stats.cache_corrupt == 1
            assert len(s.backend.reads) == 1  # the rotten one, from the backend

    trio.run(main)


def test_evicting_the_source_costs_the_other_image_a_refetch_only(tmp_path: Path):
    from fused.cacheindex import CacheIndex
    from fused.evict import evict_to

    shared = random_files(4, 100_000, 200_000, seed=8)
    a = files_image(tmp_path / "a", shared)
    b = files_image(tmp_path / "b", {**shared, "0": b"y" * 5000}, order=["0", *sorted(shared)])
    cache = tmp_path / "cache"

    async def main() -> None:
        async with capped_stack(a, cache) as s:
            assert await read_everything(s.vfs, shared, random.Random(1)) == 0
        async with capped_stack(b, cache) as s:
            assert await read_everything(s.vfs, shared, random.Random(2)) == 0
            assert s.backend.reads == []
            index = CacheIndex(cache)
            try:
                evict_to(cache, index, 0)  # A's blob goes (A is unmounted)
            finally:
                index.close()
            assert await read_everything(s.vfs, shared, random.Random(3)) == 0
            assert s.stats.cache_lost > 0 and len(s.backend.reads) > 0

    trio.run(main)


def test_amplified_fetches_stop_at_chunks_the_host_already_has(tmp_path: Path):
    shared = {"s": random.Random(5).randbytes(6 * CS)}
    a = files_image(tmp_path / "a", shared)
    b = files_image(tmp_path / "b", {**shared, "0": random.Random(6).randbytes(CS)},
                    order=["0", "s"])  # B's blob: its own chunk, then the shared ones
    cache = tmp_path / "cache"

    async def main() -> None:
        async with capped_stack(a, cache) as s:
            assert await read_everything(s.vfs, shared, random.Random(1)) == 0
        async with capped_stack(b, cache, amplify=True, amplify_bytes=8 * CS) as s:
            await s.cache.load_hints()
            data = await s.vfs.read(s.vfs.lookup(1, b"0").ino, 0, CS)
            assert bytes(data) == random.Random(6).randbytes(CS)
            # Amplification would have taken the 6 shared chunks after it: they are local.
            assert [n for _d, _o, n in s.backend.reads] == [s.cache.chunk(0).compressed_size]

    trio.run(main)
