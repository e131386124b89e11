"""The access trace: what a workload read, in the order it first read it.

Two recorders, one per mode, with one output (``to_json``):

- ``AccessTrace`` (fuse mode): the vfs calls ``touch(nid)`` when a regular
  file is opened or a symlink read, and ``read(nid, offset, end)`` for every
  read of file data;
- ``ChunkTrace`` (kernel mode, where the daemon never sees a file opened and
  the kernel asks only for blob data its page cache lacks): the blob
  filesystem calls ``read(chunk, offset, end)`` with chunk-table indices and
  offsets inside the chunk.

Both keep, per chunk, its first access (a dict keeps insertion order) and the
4 KiB pages of it that were read (a bit mask), so recording stays O(1) per
access. Paths are found only when someone asks (``rafs trace``), by one walk of
the bootstrap; a hardlinked inode, or a chunk that several files share, is
reported under the first path the walk meets.

The output has the ``paths`` (each file once, in first-access order: opens in
fuse mode, first data read in kernel mode) and the ``ranges`` read: for every
chunk in first-access order, the runs of pages read in it, as byte ranges of
the file (clamped to its size), merged where one continues the previous one.
That is the byte-range form of ``rafs.prefetchlist``. Both recorders are
capped (``limit`` entries) so that a workload that touches a whole image
cannot grow the daemon without bound; the cap is reported with the trace.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Iterator

from rafs.bootstrap import Bootstrap
from rafs.model import BLOCK_SIZE

__all__ = ["AccessTrace", "ChunkTrace", "page_runs"]

DEFAULT_LIMIT = 1 << 20
PAGE = BLOCK_SIZE
PAGE_BITS = PAGE.bit_length() - 1


def _mask(offset: int, end: int) -> int:
    """The bits of the pages [offset, end) touches."""
    lo, hi = offset >> PAGE_BITS, (end + PAGE - 1) >> PAGE_BITS
    return ((1 << (hi - lo)) - 1) << lo


def page_runs(mask: int) -> Iterator[tuple[int, int]]:
    """(first page, page count) of each run of set bits of ``mask``, lowest first."""
    page = 0
    while mask:
        skip = (mask & -mask).bit_length() - 1
        mask >>= skip
        page += skip
        run = (~mask & (mask + 1)).bit_length() - 1
        yield page, run
        mask >>= run
        page += run


class _Recorder:
    """First accesses in order (``_order``: key -> None) and pages read per chunk."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.truncated = False
        self._pages: dict[object, int] = {}  # chunk key -> mask of the pages read

    def _record(self, key: object, mask: int) -> None:
        pages = self._pages
        old = pages.get(key)
        if old is not None:
            pages[key] = old | mask
        elif len(pages) >= self.limit:
            self.truncated = True
        else:
            pages[key] = mask

    def __len__(self) -> int:
        return len(self._pages)

    @staticmethod
    def _ranges(chunks: Iterable[tuple[bytes, int, int, int]],
                chunk_size: int) -> list[tuple[bytes, int, int]]:
        """(path, offset, length) of the pages read, from (path, file chunk, mask, file
        size) in first-access order; a range continuing the previous one extends it."""
        out: list[list[object]] = []
        for path, k, mask, size in chunks:
            base = k * chunk_size
            for page, count in page_runs(mask):
                start = base + page * PAGE
                end = min(base + (page + count) * PAGE, size, base + chunk_size)
                if start >= end:
                    continue
                last = out[-1] if out else None
                if last is not None and last[0] == path and last[1] + last[2] == start:
                    last[2] = end - int(last[1])  # type: ignore[operator]
                else:
                    out.append([path, start, end - start])
        return [(p, o, n) for p, o, n in out]  # type: ignore[misc]

    @staticmethod
    def _json(paths: list[bytes], ranges: list[tuple[bytes, int, int]], chunk_size: int,
              truncated: bool) -> dict[str, object]:
        return {"paths": [os.fsdecode(p) for p in paths],
                "ranges": [{"path": os.fsdecode(p), "offset": o, "length": n}
                           for p, o, n in ranges],
                "chunk_size": chunk_size, "truncated": truncated}


class AccessTrace(_Recorder):
    """The trace of fuse mode: opens by nid, reads by (nid, file chunk)."""

    def __init__(self, limit: int = DEFAULT_LIMIT, chunk_size: int = 1 << 20) -> None:
        super().__init__(limit)
        self.chunk_size = chunk_size
        self._order: dict[int, None] = {}

    def touch(self, nid: int) -> None:
        order = self._order
        if nid in order:
            return
        if len(order) >= self.limit:
            self.truncated = True
            return
        order[nid] = None

    def read(self, nid: int, offset: int, end: int) -> None:
        """A read of [offset, end) of file ``nid`` (end > offset, within the file)."""
        cs = self.chunk_size
        k, last = offset // cs, (end - 1) // cs
        while k <= last:
            base = k * cs
            self._record((nid, k), _mask(max(offset, base) - base, min(end, base + cs) - base))
            k += 1

    def nids(self) -> list[int]:
        return list(self._order)

    def _walk(self, bootstrap: Bootstrap, wanted: set[int]) -> dict[int, tuple[bytes, int]]:
        """nid -> (first path, size) of the wanted inodes."""
        found: dict[int, tuple[bytes, int]] = {}
        if not wanted:
            return found
        for path, node in bootstrap.walk():
            if node.nid in wanted and node.nid not in found:
                found[node.nid] = (path, node.size)
                if len(found) == len(wanted):
                    break
        return found

    def paths(self, bootstrap: Bootstrap) -> list[bytes]:
        """Absolute paths of the traced inodes, in first-access order."""
        found = self._walk(bootstrap, set(self._order))
        return [found[nid][0] for nid in self._order if nid in found]

    def to_json(self, bootstrap: Bootstrap) -> dict[str, object]:
        found = self._walk(bootstrap, set(self._order) | {nid for nid, _ in self._pages})
        paths = [found[nid][0] for nid in self._order if nid in found]
        chunks = ((found[nid][0], k, mask, found[nid][1])
                  for (nid, k), mask in self._pages.items() if nid in found)
        ranges = self._ranges(chunks, bootstrap.chunk_size)
        return self._json(paths, ranges, bootstrap.chunk_size, self.truncated)


class ChunkTrace(_Recorder):
    """The trace of kernel mode: reads by chunk-table index.

    Asked for paths, the trace finds the regular files those chunks belong to
    (one walk of the bootstrap) and lists each file once, ordered by the first
    access to any of its chunks. Files without data and symlinks never appear.
    """

    def __init__(self, limit: int = DEFAULT_LIMIT) -> None:
        super().__init__(limit)

    def touch(self, chunk_index: int) -> None:
        """A read of chunk ``chunk_index``, pages unknown (counted as its first page)."""
        self._record(chunk_index, 1)

    def read(self, chunk_index: int, offset: int, end: int) -> None:
        """A read of [offset, end) inside chunk ``chunk_index`` (end > offset)."""
        self._record(chunk_index, _mask(offset, end))

    def _owners(self, bootstrap: Bootstrap) -> tuple[dict[int, tuple[bytes, int, int]],
                                                     list[bytes]]:
        """chunk index -> (path, file chunk, file size) of the first file the walk meets
        that holds it, for the traced chunks; and every file holding a traced chunk,
        ordered by its earliest one."""
        rank = {index: n for n, index in enumerate(self._pages)}
        owners: dict[int, tuple[bytes, int, int]] = {}
        first: list[tuple[int, bytes]] = []
        seen: set[int] = set()
        for path, node in bootstrap.walk():
            if node.nid in seen or not stat.S_ISREG(node.mode):
                continue
            seen.add(node.nid)
            earliest = None
            for k, index in enumerate(bootstrap.file_chunks(node)):
                r = rank.get(index) if index is not None else None
                if r is None:
                    continue
                if index not in owners:
                    owners[index] = (path, k, node.size)  # type: ignore[index]
                earliest = r if earliest is None else min(earliest, r)
            if earliest is not None:
                first.append((earliest, path))
        return owners, [path for _, path in sorted(first)]

    def paths(self, bootstrap: Bootstrap) -> list[bytes]:
        return self._owners(bootstrap)[1]

    def to_json(self, bootstrap: Bootstrap) -> dict[str, object]:
        owners, paths = self._owners(bootstrap)
        chunks = ((owners[i][0], owners[i][1], mask, owners[i][2])  # type: ignore[index]
                  for i, mask in self._pages.items() if i in owners)
        ranges = self._ranges(chunks, bootstrap.chunk_size)
        return self._json(paths, ranges, bootstrap.chunk_size, self.truncated)
