"""The lazy tree: layers applied, in order, onto one ``rafs.model.Node`` tree.

The meaning of every entry (whiteouts, opaque directories, replacement,
hardlinks, implied parents, symlinks in parent paths, unsafe names) is
``converter.layermodel``'s; its tree is the image. This module adds what
conversion needs on top: the data of each new regular file goes to the layer's
``BlobWriter`` (chunked, deduplicated, compressed), ranked by the prefetch list.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import BinaryIO

from rafs.model import Node

from .chunker import BlobWriter
from .layermodel import Create, Layer, RealPath, new_root, normalise
from .tarstream import Entry

__all__ = ["LayerApplier", "PrefetchRanks", "new_root"]


class PrefetchRanks:
    """Where a path stands in the prefetch list: the rank of the path itself or of its
    nearest listed ancestor directory (a directory prefetches what is below it)."""

    def __init__(self, paths: Iterable[bytes]) -> None:
        self._ranks: dict[bytes, int] = {}
        for i, path in enumerate(paths):
            self._ranks.setdefault(b"/".join(normalise(path, "prefetch list", absolute=True)), i)

    def __bool__(self) -> bool:
        return bool(self._ranks)

    def rank(self, real: RealPath) -> int | None:
        for i in range(len(real), -1, -1):
            found = self._ranks.get(b"/".join(real[:i]))
            if found is not None:
                return found
        return None


class LayerApplier:
    """Applies the entries of one layer onto ``root``; file data goes to ``writer``."""

    def __init__(self, root: Node, writer: BlobWriter | None, what: str = "layer",
                 prefetch: PrefetchRanks | None = None) -> None:
        self.root = root
        self.writer = writer
        self.what = what
        self.prefetch = prefetch or None
        self._layer = Layer(root, what)

    @property
    def entries(self) -> int:
        return self._layer.entries

    def apply(self, entry: Entry) -> None:
        """Apply one entry (and consume its data, for regular files)."""
        for op in self._layer.apply(entry):
            if isinstance(op, Create) and op.data is not None and op.node.size:
                self._read_data(op.node, op.data, op.path)

    def _read_data(self, node: Node, data: BinaryIO, real: RealPath) -> None:
        if self.writer is None:
            raise AssertionError("a regular file with data needs a BlobWriter")
        rank = self.prefetch.rank(real) if self.prefetch is not None else None
        self.writer.add_file(node, data, node.size, rank)
