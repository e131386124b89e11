"""Prefetch of the start-up set: pieces in access order, several in flight, readers first.

The fetcher runs against a real image in an OCI layout; the backend in front of
it holds every request until the test lets it go (a delay a real registry cannot
be told to produce on demand), so the order of requests is observable.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio
import trio.testing

from fused.backend import Backend, LocalBackend
from fused.fetcher import MIN_PREFETCH_DEPTH
from rafs.model import Node
from tests.fused_support import Stack, WrittenImage, open_stack, write_rafs_image
from tests.helpers.images import ImageParts

CS = 64 * 1024


@dataclass
class HeldBackend(Backend):
    """A real backend whose responses wait until ``release`` lets each one go."""

    inner: Backend = field(default=None)  # type: ignore[assignment]
    asked: list[tuple[int, int]] = field(default_factory=list)  # (offset, length), in order
    _gates: list[trio.Event] = field(default_factory=list)

    async def read(self, blob_digest: str, offset: int, length: int) -> bytes:
        return b"".join([p async for p in self.stream(blob_digest, offset, length)])

    async def stream(self, blob_digest: str, offset: int, length: int) -> AsyncIterator[bytes]:
        self.asked.append((offset, length))
        gate = trio.Event()
        self._gates.append(gate)
        await gate.wait()
        async for piece in self.inner.stream(blob_digest, offset, length):
            yield piece

    def release(self, n: int) -> None:
        """Let the ``n``-th request (0-based, in asking order) answer."""
        self._gates[n].set()

    async def aclose(self) -> None:
        await self.inner.aclose()


@pytest.fixture
def image(tmp_path: Path) -> WrittenImage:
    parts = ImageParts(Node.directory(0o755, mtime=1_600_000_000), chunk_size=CS)
    parts.new_blob()
    assert parts.root.children is not None
    for name in (b"a", b"b", b"c"):  # laid out a, b, c: 4 chunks each
        parts.root.children[name] = parts.file(os.urandom(4 * CS), mtime=1_600_000_000)
    return write_rafs_image(parts, tmp_path / "img")


async def settle() -> None:
    """Let every task run until it waits on something only the test can give (cache
    probes and stores run in worker threads, so blocked tasks are checked twice)."""
    for _ in range(3):
        await trio.sleep(0.05)
        await trio.testing.wait_all_tasks_blocked(cushion=0.02)


async def until(cond: object) -> None:
    with trio.fail_after(60):
        while not cond():  # type: ignore[operator]
            await settle()


def _chunks(s: Stack, name: bytes) -> list[int]:
    attr = s.vfs.lookup(1, name)
    assert attr is not None
    return [i for i in s.bootstrap.file_chunks(s.bootstrap.inode(s.vfs.nid(attr.ino)))
            if i is not None]


def _offset(s: Stack, index: int) -> int:
    return s.cache.chunk(index).compressed_offset


def test_pieces_go_out_in_access_order_a_few_at_a_time_and_readers_overtake(
        image: WrittenImage, tmp_path: Path) -> None:
    held = HeldBackend(inner=LocalBackend(image.layout))

    async def main() -> None:
        async with open_stack(image, tmp_path / "cache", held, prefetch_merge=2 * CS) as s:
            a, b, c = (_chunks(s, n) for n in (b"a", b"b", b"c"))
            order = c + a + b  # the start reads c first, then a, then b
            done: list[int] = []

            async def prefetch() -> None:
                done.append(await s.fetcher.prefetch(order))

            async with trio.open_nursery() as n:
                n.start_soon(prefetch)
                await until(lambda: len(held.asked) >= 2)
                await settle()
                # two pieces in flight (the depth before the link is measured), c's first
                assert held.asked == [(_offset(s, c[0]), 2 * CS), (_offset(s, c[2]), 2 * CS)]
                assert MIN_PREFETCH_DEPTH == 2
                # a reader of b's last chunk does not queue behind prefetch
                n.start_soon(s.fetcher.ensure, [b[3]])
                await until(lambda: len(held.asked) >= 3)
                assert held.asked[2] == (_offset(s, b[3]), CS)
                held.release(0)  # a prefetch piece ends: its slot is free ...
                await until(lambda: all(s.cache.is_ready(i) for i in c[:2]))
                await settle()
                assert len(held.asked) == 3  # ... but no piece starts while a read waits
                held.release(2)  # the read is answered
                await until(lambda: len(held.asked) >= 4)
                assert held.asked[3] == (_offset(s, a[0]), 2 * CS)  # prefetch goes on
                k = 1
                while not done:
                    if k < len(held.asked):
                        held.release(k)
                        k += 1
                    await settle()
            # b's remaining chunks after the reader took b[3]: b[0:2] and b[2] (one piece
            # each way is fine); every chunk is in the cache, fetched once
            starts = sorted(o for o, _ in held.asked)
            assert len(starts) == len(set(starts))
            assert done == [len(order) - 1]
            assert all(s.cache.is_ready(i) for i in order)
            assert s.stats.requests["ondemand"] == 1

    trio.run(main)


def test_a_fixed_depth_is_obeyed(image: WrittenImage, tmp_path: Path) -> None:
    held = HeldBackend(inner=LocalBackend(image.layout))

    async def main() -> None:
        async with open_stack(image, tmp_path / "cache", held, prefetch_merge=CS,
                              prefetch_depth=3) as s:
            order = _chunks(s, b"a") + _chunks(s, b"b")
            async with trio.open_nursery() as n:
                n.start_soon(s.fetcher.prefetch, order)
                await until(lambda: len(held.asked) >= 3)
                await settle()
                assert len(held.asked) == 3
                for k in range(len(order)):
                    held.release(k)
                    await settle()
                    assert len(held.asked) - (k + 1) <= 3
            assert len(held.asked) == len(order)
            assert s.fetcher.link.rtt is not None  # measured on the way

    trio.run(main)
