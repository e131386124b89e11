"""The fetcher fetches each missing chunk once, merges neighbours, and never passes wrong bytes."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from fused.backend import Backend, LocalBackend
from fused.errors import ChunkError
from fused.readahead import FileMap
from rafs.bootstrap import Bootstrap
from rafs.errors import BackendError, FormatError, TransientError
from rafs.model import Node
from rafs.retry import RetryPolicy
from tests.fused_support import Stack, WrittenImage, open_stack, write_rafs_image
from tests.helpers.images import ImageParts

CS = 64 * 1024


@pytest.fixture
def image(tmp_path: Path) -> tuple[WrittenImage, dict[bytes, bytes]]:
    parts = ImageParts(Node.directory(0o755, mtime=1_600_000_000), chunk_size=CS)
    parts.new_blob()
    assert parts.root.children is not None
    files = {
        b"a": os.urandom(6 * CS),
        b"b": os.urandom(2 * CS + 5),
        b"c": b"c" * 1000 + os.urandom(CS),  # compressible head: a zstd chunk
    }
    for name, content in files.items():
        parts.root.children[name] = parts.file(content, mtime=1_600_000_000)
    return write_rafs_image(parts, tmp_path / "img"), files


def chunks_of(s: Stack, name: bytes) -> list[int]:
    attr = s.vfs.lookup(1, name)
    assert attr is not None
    table = s.bootstrap.file_chunks(s.bootstrap.inode(s.vfs.nid(attr.ino)))
    return [i for i in table if i is not None]


async def read_file(s: Stack, name: bytes) -> bytes:
    attr = s.vfs.lookup(1, name)
    assert attr is not None
    return bytes(await s.vfs.read(attr.ino, 0, attr.size))


def test_concurrent_readers_of_one_chunk_cause_one_backend_read(image, tmp_path):
    img, files = image

    async def main() -> None:
        async with open_stack(img, tmp_path / "cache") as s:
            attr = s.vfs.lookup(1, b"a")
            results: list[bytes] = []

            async def reader(off: int) -> None:
                results.append(bytes(await s.vfs.read(attr.ino, off, 4096)))

            async with trio.open_nursery() as n:
                for off in (0, 4096, 8192, 100, 0):
                    n.start_soon(reader, off)
            assert len(s.backend.reads) == 1
            assert s.backend.reads[0][2] == s.cache.chunk(chunks_of(s, b"a")[0]).compressed_size
            assert sorted(results) == sorted(files[b"a"][o : o + 4096]
                                             for o in (0, 4096, 8192, 100, 0))
            assert s.stats.backend_chunks == 1 and s.stats.cache_misses == 5

    trio.run(main)


def test_adjacent_missing_chunks_are_fetched_in_one_read(image, tmp_path):
    img, files = image

    async def main() -> None:
        async with open_stack(img, tmp_path / "cache") as s:
            idx = chunks_of(s, b"a")
            c0, c3 = s.cache.chunk(idx[0]), s.cache.chunk(idx[3])
            await s.fetcher.ensure(idx[0:4])  # four neighbours in the blob: one read
            assert s.backend.reads == [
                (img.blob_digests[0], c0.compressed_offset,
                 c3.compressed_offset + c3.compressed_size - c0.compressed_offset)
            ]
            s.backend.reads.clear()
            await s.fetcher.ensure([idx[5], idx[4], idx[1]])  # one cached, two neighbours
            c4 = s.cache.chunk(idx[4])
            assert [r[1] for r in s.backend.reads] == [c4.compressed_offset]
            assert s.stats.backend_requests == 2 and s.stats.backend_chunks == 6
            assert await read_file(s, b"a") == files[b"a"]

    trio.run(main)


def test_gaps_and_the_merge_limit_split_reads(image, tmp_path):
    img, _ = image

    async def main() -> None:
        async with open_stack(img, tmp_path / "cache", amplify_bytes=2 * CS) as s:
            idx = chunks_of(s, b"a")
            await s.fetcher.ensure([idx[0], idx[2]])  # not back to back: two reads
            assert len(s.backend.reads) == 2
            s.backend.reads.clear()
            await s.fetcher.ensure(idx[3:6])  # 3 neighbours, but at most 2 per read
            assert sorted(r[2] for r in s.backend.reads) == [CS, 2 * CS]

    trio.run(main)


def flip_byte(img: WrittenImage, offset: int) -> None:
    path = img.layout / "blobs" / "sha256" / img.blob_digests[0].removeprefix("sha256:")
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x01]))


@pytest.mark.parametrize("victim", [b"b", b"c"])
def test_a_corrupt_chunk_fails_its_file_with_eio_and_never_reaches_cache_or_reader(
    image, tmp_path, victim
):
    img, files = image

    async def main() -> None:
        async with open_stack(img, tmp_path / "cache") as s:
            bad = s.cache.chunk(chunks_of(s, victim)[1])
            flip_byte(img, bad.compressed_offset + bad.compressed_size // 2)
            with pytest.raises(ChunkError) as e:
                await read_file(s, victim)
            assert e.value.errno == 5  # EIO
            assert s.stats.digest_failures == 2  # the first fetch and the one retry
            for name, content in files.items():  # the other files read fine
                if name != victim:
                    assert await read_file(s, name) == content
            blob = s.cache.blob_file(bad.blob_index)
            await s.cache.commit()
            assert not blob.has(bad.uncompressed_offset, bad.uncompressed_size)
            assert not s.cache.is_ready(chunks_of(s, victim)[1])
            with pytest.raises(ChunkError):  # still EIO next time, never bytes
                await s.vfs.read(s.vfs.lookup(1, victim).ino, CS, 10)
            assert s.stats.digest_failures == 4
        cached = (tmp_path / "cache" / "blobs" / "sha256"
                  / (img.blob_digests[0].removeprefix("sha256:") + ".data")).read_bytes()
        span = cached[bad.uncompressed_offset : bad.uncompressed_offset + bad.uncompressed_size]
        assert span == bytes(len(span))  # nothing was written for the bad chunk

    trio.run(main)


class FlakyBackend(Backend):
    """A real backend that fails the first ``failures`` reads with ``error``."""

    def __init__(self, inner: Backend, failures: int, error: Exception) -> None:
        self.inner, self.failures, self.error = inner, failures, error

    async def read(self, blob_digest: str, offset: int, length: int) -> bytes:
        if self.failures:
            self.failures -= 1
            raise self.error
        return await self.inner.read(blob_digest, offset, length)

    async def aclose(self) -> None:
        await self.inner.aclose()


def test_transient_backend_errors_are_retried(image, tmp_path):
    img, files = image
    flaky = FlakyBackend(LocalBackend(img.layout), 2, TransientError("connection reset"))

    async def main() -> None:
        async with open_stack(img, tmp_path / "cache", backend=flaky,
                              retry=RetryPolicy(base=0.01)) as s:
            assert await read_file(s, b"b") == files[b"b"]
            assert s.stats.backend_errors == 2

    trio.run(main)


def test_a_permanent_backend_error_is_eio_and_the_next_read_tries_again(image, tmp_path):
    img, files = image
    flaky = FlakyBackend(LocalBackend(img.layout), 1, BackendError("blob is gone"))

    async def main() -> None:
        async with open_stack(img, tmp_path / "cache", backend=flaky) as s:
            with pytest.raises(ChunkError, match="blob is gone"):
                await read_file(s, b"b")
            assert await read_file(s, b"b") == files[b"b"]

    trio.run(main)


def test_prefetch_fetches_ahead_in_merged_reads_and_readers_then_hit(image, tmp_path):
    img, files = image

    async def main() -> None:
        async with open_stack(img, tmp_path / "cache") as s:
            wanted = chunks_of(s, b"a") + chunks_of(s, b"b")
            assert await s.fetcher.prefetch(wanted + wanted) == len(wanted)
            assert len(s.backend.reads) == 1  # a and b are back to back in the blob
            assert s.stats.prefetch_chunks == len(wanted)
            assert await s.fetcher.prefetch(wanted) == 0  # nothing left to do
            assert await read_file(s, b"a") == files[b"a"]
            assert len(s.backend.reads) == 1 and s.stats.cache_misses == 0

    trio.run(main)


def test_readers_are_not_queued_behind_prefetch(image, tmp_path):
    img, files = image

    class Slow(Backend):
        """The local backend, slowed down for reads longer than one chunk."""

        def __init__(self, inner: Backend) -> None:
            self.inner = inner

        async def read(self, blob_digest: str, offset: int, length: int) -> bytes:
            if length > CS:
                await trio.sleep(0.5)
            return await self.inner.read(blob_digest, offset, length)

    async def main() -> None:
        async with open_stack(img, tmp_path / "cache", backend=Slow(LocalBackend(img.layout)),
                              amplify_bytes=2 * CS, prefetch_merge=2 * CS) as s:
            idx = chunks_of(s, b"a")
            async with trio.open_nursery() as n:
                n.start_soon(s.fetcher.prefetch, idx)
                await trio.sleep(0.05)  # prefetch is inside its first (slow) read
                with trio.fail_after(0.3):  # the last chunk is not claimed yet: fetch it now
                    attr = s.vfs.lookup(1, b"a")
                    tail = await s.vfs.read(attr.ino, 5 * CS, CS)
                assert bytes(tail) == files[b"a"][5 * CS :]
            assert await read_file(s, b"a") == files[b"a"]
            reads = sorted(r[1] for r in s.backend.reads)
            assert len(reads) == len(set(reads))  # no chunk was fetched twice

    trio.run(main)


def test_chunks_of_a_long_range_are_released_as_they_arrive(image, tmp_path):
    img, files = image

    class Trickle(Backend):
        """The local backend, sending one chunk-sized piece every 0.3 s."""

        def __init__(self, inner: Backend) -> None:
            self.inner = inner

        async def read(self, blob_digest: str, offset: int, length: int) -> bytes:
            return await self.inner.read(blob_digest, offset, length)

        async def stream(self, blob_digest: str, offset: int, length: int):  # type: ignore[override]
            data = await self.inner.read(blob_digest, offset, length)
            for at in range(0, length, CS):
                yield data[at : at + CS]
                await trio.sleep(0.3)

    async def main() -> None:
        async with open_stack(img, tmp_path / "cache", backend=Trickle(LocalBackend(img.layout)),
                              prefetch_merge=64 * CS) as s:
            idx = chunks_of(s, b"a")
            async with trio.open_nursery() as n:
                n.start_soon(s.fetcher.prefetch, idx)
                await trio.sleep(0.05)
                with trio.fail_after(0.25):  # the first piece is there: no wait for the rest
                    attr = s.vfs.lookup(1, b"a")
                    head = await s.vfs.read(attr.ino, 0, CS)
                assert bytes(head) == files[b"a"][:CS]
            assert len(s.backend.reads) == 1  # one request served the whole prefetch
            assert await read_file(s, b"a") == files[b"a"]

    trio.run(main)


def test_a_response_cut_short_is_resumed_from_the_first_missing_chunk(image, tmp_path):
    img, files = image

    class CutOnce(Backend):
        """Sends only the first half of the first response."""

        def __init__(self, inner: Backend) -> None:
            self.inner, self.cut, self.asked = inner, False, []

        async def read(self, blob_digest: str, offset: int, length: int) -> bytes:
            return await self.inner.read(blob_digest, offset, length)

        async def stream(self, blob_digest: str, offset: int, length: int):  # type: ignore[override]
            self.asked.append((offset, length))
            data = await self.inner.read(blob_digest, offset, length)
            if not self.cut:
                self.cut = True
                data = data[: length // 2]
            yield data

    async def main() -> None:
        backend = CutOnce(LocalBackend(img.layout))
        async with open_stack(img, tmp_path / "cache", backend=backend,
                              retry=RetryPolicy(base=0.01), amplify_bytes=64 * CS) as s:
            assert await read_file(s, b"a") == files[b"a"]
            (first_off, first_len), (again_off, again_len) = backend.asked
            assert first_off < again_off and again_off + again_len == first_off + first_len
            assert s.stats.retries == 1 and s.stats.error_classes["truncated"] == 1

    trio.run(main)


def test_an_on_demand_fetch_is_amplified_with_the_chunks_that_follow_it(image, tmp_path):
    img, files = image

    async def main() -> None:
        async with open_stack(img, tmp_path / "cache", amplify=True,
                              amplify_bytes=3 * CS) as s:
            a = chunks_of(s, b"a")
            attr = s.vfs.lookup(1, b"a")
            assert bytes(await s.vfs.read(attr.ino, 0, 100)) == files[b"a"][:100]
            (_, offset, length), = s.backend.reads
            first = s.cache.chunk(a[0])
            assert offset == first.compressed_offset and length > first.compressed_size
            assert length <= 3 * CS
            assert s.stats.backend_chunks >= 2  # the first chunk and what follows it
            assert await read_file(s, b"a") == files[b"a"]
            ready = sum(s.cache.is_ready(i) for i in range(s.bootstrap.header.chunk_count))
            assert s.stats.backend_chunks == ready  # nothing was fetched twice

    trio.run(main)


async def _map_ready(s: Stack) -> None:
    assert s.fetcher.readahead is not None
    with trio.fail_after(60):
        while s.fetcher.readahead.files is None:
            await trio.sleep(0.01)


def test_with_a_file_map_a_miss_fetches_within_its_file_and_a_sequential_one_grows(
        image, tmp_path):
    img, files = image

    async def main() -> None:
        boot = Bootstrap.from_bytes(img.bootstrap)
        async with open_stack(img, tmp_path / "cache", amplify=True, amplify_bytes=8 * CS,
                              files=lambda: FileMap.from_bootstrap(boot),
                              speculate_bytes=0) as s:  # speculation: the tests below
            attr_c = s.vfs.lookup(1, b"c")
            assert bytes(await s.vfs.read(attr_c.ino, 0, 10)) == files[b"c"][:10]
            await _map_ready(s)  # built from the first miss on
            a, b = chunks_of(s, b"a"), chunks_of(s, b"b")
            attr = s.vfs.lookup(1, b"b")
            s.backend.reads.clear()
            assert bytes(await s.vfs.read(attr.ino, 0, 100)) == files[b"b"][:100]
            (_, offset, length), = s.backend.reads  # b's first chunk only: not b[1], not c
            assert (offset, length) == (s.cache.chunk(b[0]).compressed_offset,
                                        s.cache.chunk(b[0]).compressed_size)
            attr = s.vfs.lookup(1, b"a")
            await s.vfs.read(attr.ino, 0, 100)
            s.backend.reads.clear()
            assert bytes(await s.vfs.read(attr.ino, CS, 100)) == files[b"a"][CS:CS + 100]
            (_, offset, length), = s.backend.reads  # sequential: a[1] and a[2] in one go
            assert offset == s.cache.chunk(a[1]).compressed_offset
            assert length == sum(s.cache.chunk(i).compressed_size for i in a[1:3])
            assert s.stats.readahead_chunks == 1
            assert await read_file(s, b"a") == files[b"a"]

    trio.run(main)


def test_a_file_map_that_cannot_be_built_leaves_reads_working(image, tmp_path):
    img, files = image

    def broken() -> FileMap:
        raise ValueError("no map today")

    async def main() -> None:
        async with open_stack(img, tmp_path / "cache", amplify=True, files=broken) as s:
            for name in files:
                assert await read_file(s, name) == files[name]
            assert s.fetcher.readahead is not None and s.fetcher.readahead.files is None
            assert s.stats.readahead_chunks == 0

    trio.run(main)


def test_read_ahead_that_trips_on_a_bad_record_leaves_the_read_working(image, tmp_path):
    """A fault the bootstrap validator would refuse, injected into the policy's chunk
    lookup: read-ahead stops, the read it was planned for still gets its bytes."""
    img, files = image

    async def main() -> None:
        boot = Bootstrap.from_bytes(img.bootstrap)
        async with open_stack(img, tmp_path / "cache", amplify=True, amplify_bytes=8 * CS,
                              files=lambda: FileMap.from_bootstrap(boot)) as s:
            assert s.fetcher.readahead is not None

            def bad_record(index: int) -> object:
                raise FormatError(f"chunk record {index} is broken", 0)

            s.fetcher.readahead.chunk = bad_record  # type: ignore[assignment]
            for name in files:
                assert await read_file(s, name) == files[name]
            assert s.stats.readahead_chunks == 0

    trio.run(main)


class GatedBackend(Backend):
    """A real backend whose reads outside ``open`` (blob offsets) wait for ``release``."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.open: set[int] = set()
        self.release = trio.Event()
        self.held = 0  # requests waiting at the gate now

    async def read(self, blob_digest: str, offset: int, length: int) -> bytes:
        await self._gate(offset)
        return await self.inner.read(blob_digest, offset, length)

    async def stream(self, blob_digest: str, offset: int, length: int) -> AsyncIterator[bytes]:
        await self._gate(offset)
        async for piece in self.inner.stream(blob_digest, offset, length):
            yield piece

    async def _gate(self, offset: int) -> None:
        if offset not in self.open:
            self.held += 1
            try:
                await self.release.wait()
            finally:
                self.held -= 1

    async def aclose(self) -> None:
        await self.inner.aclose()


def test_a_reader_never_waits_for_speculation_and_speculation_stays_in_its_budget(
        image, tmp_path):
    img, files = image

    async def main() -> None:
        boot = Bootstrap.from_bytes(img.bootstrap)
        gated = GatedBackend(LocalBackend(img.layout))
        budget = 2 * CS + CS // 2  # room for two chunks of about CS compressed, not three
        async with open_stack(img, tmp_path / "cache", gated, amplify=True,
                              amplify_bytes=8 * CS, files=lambda: FileMap.from_bootstrap(boot),
                              speculate_bytes=budget) as s:
            assert s.fetcher.speculator is not None
            a = chunks_of(s, b"a")
            gated.open.update(s.cache.chunk(i).compressed_offset for i in (a[0], a[3]))
            attr = s.vfs.lookup(1, b"a")
            assert bytes(await s.vfs.read(attr.ino, 0, 100)) == files[b"a"][:100]
            await _map_ready(s)
            # a random read of a[3]: the reader's request is its chunk alone, and it
            # is answered while the speculative requests after it wait at the gate
            s.backend.reads.clear()
            with trio.fail_after(60):
                got = bytes(await s.vfs.read(attr.ino, 3 * CS, 100))
            assert got == files[b"a"][3 * CS:3 * CS + 100]
            c3 = s.cache.chunk(a[3])
            assert (c3.compressed_offset, c3.compressed_size) in [r[1:] for r in s.backend.reads]
            with trio.fail_after(60):
                while not gated.held:
                    await trio.sleep(0.01)
            spec = s.fetcher.speculator
            assert 0 < spec.unread_bytes <= budget
            gated.release.set()
            with trio.fail_after(60):
                while s.fetcher._inflight:
                    await trio.sleep(0.01)
            # nothing speculative was read yet: the budget stopped it
            assert s.stats.bytes["speculative"] <= budget
            assert spec.unread_bytes <= budget
            assert s.stats.requests["ondemand"] == 2
            speculated = [i for i in a[4:] if s.cache.is_ready(i)]
            assert speculated == a[4:4 + len(speculated)] and speculated
            # reading a speculated chunk is a hit and gives its bytes back to the budget
            assert spec.read_bytes == 0
            ondemand = s.stats.requests["ondemand"]
            got = bytes(await s.vfs.read(attr.ino, 4 * CS, 100))
            assert got == files[b"a"][4 * CS:4 * CS + 100]
            assert s.stats.requests["ondemand"] == ondemand
            assert spec.read_bytes == s.cache.chunk(a[4]).compressed_size
            assert spec.unread_bytes <= budget
            assert await read_file(s, b"a") == files[b"a"]
            assert await read_file(s, b"b") == files[b"b"]
            assert await read_file(s, b"c") == files[b"c"]

    trio.run(main)
