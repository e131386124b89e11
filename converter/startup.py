"""The start-up order: from a prefetch list to where each chunk goes, and what to prefetch.

Pure: no I/O. A prefetch list (``rafs.prefetchlist``: whole files, directories
and byte ranges of files, in first-access order) becomes

- a *rank* for each chunk of a file being converted (``ranks``): the position
  of the first entry that reads it, then its place in the file. The chunker
  (``converter.chunker``) puts ranked chunks at the front of their blob in
  rank order, so what a start-up reads is one contiguous run per blob, in the
  order it is read; unranked chunks follow in tar order;
- the *start-up set* of the finished image (``chunk_order``): the chunk-table
  entries the entries name in the merged tree, in first-access order, which the
  bootstrap's prefetch table records as runs of chunks (``rafs.builder``).

A whole-file entry ranks every chunk of the file; a directory entry every chunk
of every file below it (in tar order); a range entry the chunks its bytes
overlap. A chunk named by several entries takes the earliest rank.
"""

from __future__ import annotations

import stat
from collections.abc import Iterable, Iterator

from rafs.model import Node
from rafs.prefetchlist import Entry

from .layermodel import RealPath, normalise

__all__ = ["StartupOrder"]

RANK_SHIFT = 40  # rank = entry position << RANK_SHIFT | chunk of the file


class StartupOrder:
    """Ranks of chunks by a prefetch list, for one chunk size."""

    def __init__(self, entries: Iterable[Entry | bytes], chunk_size: int) -> None:
        self.chunk_size = chunk_size
        self.entries: list[tuple[RealPath, Entry]] = []
        self._whole: dict[RealPath, int] = {}  # path -> first whole-file/directory entry
        self._ranges: dict[RealPath, list[tuple[int, int, int]]] = {}  # (entry, first, last)
        for entry in entries:
            if isinstance(entry, bytes):
                entry = Entry(entry)
            real = tuple(normalise(entry.path, "prefetch list", absolute=True))
            position = len(self.entries)
            self.entries.append((real, entry))
            if entry.length is None:
                self._whole.setdefault(real, position)
            elif entry.length > 0:
                first = entry.offset // chunk_size
                last = (entry.offset + entry.length - 1) // chunk_size
                self._ranges.setdefault(real, []).append((position, first, last))

    def __bool__(self) -> bool:
        return bool(self.entries)

    def paths(self) -> list[bytes]:
        """The absolute paths the entries name, each once, in order."""
        return list(dict.fromkeys(b"/" + b"/".join(real) for real, _ in self.entries))

    def ranks(self, real: RealPath, size: int) -> list[int | None] | None:
        """The rank of each chunk of the file at ``real`` of ``size`` bytes (None:
        not read at start-up), or None when no entry names any of it."""
        count = -(-size // self.chunk_size)
        whole = None
        for i in range(len(real), -1, -1):  # the file itself, or its nearest listed ancestor
            whole = self._whole.get(real[:i])
            if whole is not None:
                break
        ranges = self._ranges.get(real)
        if whole is None and ranges is None:
            return None
        ranks: list[int | None] = [None] * count
        if whole is not None:
            ranks = [whole << RANK_SHIFT | k for k in range(count)]
        for position, first, last in ranges or ():
            for k in range(first, min(last, count - 1) + 1):
                rank = position << RANK_SHIFT | k
                old = ranks[k]
                if old is None or rank < old:
                    ranks[k] = rank
        return ranks

    def chunk_order(self, root: Node) -> list[int]:
        """The chunks (store indices) the entries read in the merged tree ``root``,
        in first-access order, each once; entries not in the tree are skipped."""
        order: dict[int, None] = {}
        cs = self.chunk_size
        for real, entry in self.entries:
            node = _lookup(root, real)
            if node is None:
                continue
            if entry.length is None:
                for file in _files(node):
                    order.update((c, None) for c in file.chunks if c is not None)
            elif node.is_reg and entry.length > 0:
                first = entry.offset // cs
                last = (entry.offset + entry.length - 1) // cs
                order.update((c, None) for c in node.chunks[first:last + 1] if c is not None)
        return list(order)


def _lookup(root: Node, real: RealPath) -> Node | None:
    node = root
    for part in real:
        if node.children is None or part not in node.children:
            return None
        node = node.children[part]
    return node


def _files(node: Node) -> Iterator[Node]:
    """``node`` if it is a regular file, else every regular file below it (sorted names)."""
    if node.is_reg:
        yield node
    elif node.is_dir and not stat.S_ISLNK(node.mode):
        assert node.children is not None
        for name in sorted(node.children):
            yield from _files(node.children[name])
