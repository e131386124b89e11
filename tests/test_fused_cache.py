"""The chunk cache keeps verified data durably and never serves what fails its check."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from fused.cache import HEADER_SIZE, BlobCache, ChunkCache, cached_bootstrap, store_bootstrap
from rafs.model import Node
from tests.fused_support import WrittenImage, open_stack, write_rafs_image
from tests.helpers.images import ImageParts

CS = 64 * 1024


@pytest.fixture
def image(tmp_path: Path) -> tuple[WrittenImage, bytes]:
    parts = ImageParts(Node.directory(0o755, mtime=1_600_000_000), chunk_size=CS)
    parts.new_blob()
    assert parts.root.children is not None
    content = os.urandom(4 * CS + 100)
    parts.root.children[b"f"] = parts.file(content, mtime=1_600_000_000)
    return write_rafs_image(parts, tmp_path / "img"), content


def read_all(image: WrittenImage, cache_dir: Path) -> tuple[bytes, dict[str, int | float], int]:
    """Read file f through the stack; (bytes, stats, backend reads)."""

    async def main() -> tuple[bytes, dict[str, int | float], int]:
        async with open_stack(image, cache_dir) as s:
            attr = s.vfs.lookup(1, b"f")
            assert attr is not None
            data = bytes(await s.vfs.read(attr.ino, 0, attr.size))
            return data, s.stats.snapshot(), len(s.backend.reads)

    return trio.run(main)


def data_file(cache_dir: Path, digest: str) -> Path:
    return cache_dir / "blobs" / "sha256" / (digest.removeprefix("sha256:") + ".data")


def test_cached_chunks_survive_a_restart_without_touching_the_backend(image, tmp_path):
    img, content = image
    cache = tmp_path / "cache"
    data, stats, reads = read_all(img, cache)
    assert data == content and reads >= 1 and stats["cache_misses"] == 5
    data, stats, reads = read_all(img, cache)  # a new "daemon" over the same directory
    assert data == content
    assert reads == 0 and stats["backend_requests"] == 0
    assert stats["cache_hits"] == 5 and stats["cache_misses"] == 0


def test_bits_are_set_only_after_the_commit(image, tmp_path):
    img, content = image

    async def main() -> None:
        async with open_stack(img, tmp_path / "cache") as s:
            node = s.vfs.bootstrap.inode(s.vfs.nid(s.vfs.lookup(1, b"f").ino))
            index = s.vfs.bootstrap.file_chunks(node)[0]
            assert index is not None
            c = s.cache.chunk(index)
            blob = s.cache.blob_file(c.blob_index)
            # store() returns without a checkpoint after queueing the commit, so
            # the committer has not run yet: readable here, not yet marked.
            await s.cache.store(index, content[:CS])
            assert s.cache.is_ready(index)
            assert not blob.has(c.uncompressed_offset, c.uncompressed_size)
            await s.cache.commit()
            assert blob.has(c.uncompressed_offset, c.uncompressed_size)

    trio.run(main)


def test_a_corrupted_cache_file_is_detected_and_refetched(image, tmp_path):
    img, content = image
    cache = tmp_path / "cache"
    read_all(img, cache)
    path = data_file(cache, img.blob_digests[0])
    with open(path, "r+b") as f:  # flip one byte inside the second chunk
        f.seek(CS + 10)
        b = f.read(1)
        f.seek(CS + 10)
        f.write(bytes([b[0] ^ 0xFF]))
    data, stats, reads = read_all(img, cache)
    assert data == content  # never the corrupted byte
    assert stats["cache_corrupt"] == 1 and stats["cache_misses"] == 1 and reads == 1
    data, stats, reads = read_all(img, cache)  # and the refetch repaired the cache
    assert data == content and stats["cache_corrupt"] == 0 and reads == 0


def test_two_daemons_share_one_cache_directory(image, tmp_path):
    img, content = image
    cache = tmp_path / "cache"

    async def main() -> None:
        async with open_stack(img, cache) as a, open_stack(img, cache) as b:
            attr = a.vfs.lookup(1, b"f")
            assert bytes(await a.vfs.read(attr.ino, 0, CS)) == content[:CS]
            await a.cache.commit()
            assert bytes(await b.vfs.read(attr.ino, 0, CS)) == content[:CS]
            assert len(b.backend.reads) == 0  # b found a's chunk through the shared bitmap
            # both fetch the rest at once: identical verified bytes, no harm
            async with trio.open_nursery() as n:
                n.start_soon(a.vfs.read, attr.ino, 0, attr.size)
                n.start_soon(b.vfs.read, attr.ino, 0, attr.size)
            assert bytes(await b.vfs.read(attr.ino, 0, attr.size)) == content

    trio.run(main)
    data, _stats, reads = read_all(img, cache)
    assert data == content and reads == 0


def test_a_bitmap_with_a_bad_header_is_reset(image, tmp_path):
    img, content = image
    cache = tmp_path / "cache"
    read_all(img, cache)
    bitmap = data_file(cache, img.blob_digests[0]).with_suffix(".map")
    raw = bytearray(bitmap.read_bytes())
    assert raw[HEADER_SIZE] != 0
    raw[0:8] = b"garbage!"
    bitmap.write_bytes(raw)
    data, stats, reads = read_all(img, cache)
    assert data == content and stats["cache_misses"] == 5 and reads >= 1


def test_bitmap_marks_blocks_of_the_blob_address_space(tmp_path):
    from rafs.model import Blob

    f = BlobCache(tmp_path, Blob("sha256:" + "ab" * 32, 0, 40 * 4096))
    try:
        assert not f.has(4096 * 3, 4096 * 5)
        f.mark([(4096 * 3, 4096 * 5 - 100)])
        assert f.has(4096 * 3, 4096 * 5) and f.has(4096 * 7, 1)
        assert not f.has(4096 * 2, 4096 * 2) and not f.has(4096 * 8, 4096)
        f.mark([(4096 * 5, 4096)], present=False)
        assert not f.has(4096 * 3, 4096 * 5) and f.has(4096 * 3, 4096 * 2)
    finally:
        f.close()


def test_bootstraps_are_stored_atomically_and_checked_when_reused(tmp_path):
    import hashlib

    raw = os.urandom(5000)
    digest = "sha256:" + hashlib.sha256(raw).hexdigest()
    assert cached_bootstrap(tmp_path, digest) is None
    path = store_bootstrap(tmp_path, digest, raw)
    assert cached_bootstrap(tmp_path, digest) == path and path.read_bytes() == raw
    path.write_bytes(raw[:-1] + b"\0")
    assert cached_bootstrap(tmp_path, digest) is None
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp files left


def test_chunk_cache_rejects_data_of_the_wrong_size(image, tmp_path):
    from fused.errors import CacheError
    from rafs.bootstrap import Bootstrap

    img, _ = image
    boot = Bootstrap.from_bytes(img.bootstrap)
    cache = ChunkCache(tmp_path / "cache", boot.blobs, boot.chunk)

    async def main() -> None:
        with pytest.raises(CacheError):
            await cache.store(0, b"short")

    try:
        trio.run(main)
        assert not cache.is_ready(0)
    finally:
        cache.close()
