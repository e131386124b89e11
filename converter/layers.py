"""The lazy tree: layers applied, in order, onto one ``rafs.model.Node`` tree.

The meaning of every entry (whiteouts, opaque directories, replacement,
hardlinks, implied parents, symlinks in parent paths, unsafe names) is
``converter.layermodel``'s; its tree is the image. This module adds what
conversion needs on top: the data of each new regular file goes to the layer's
``BlobWriter`` (chunked, deduplicated, compressed), its chunks ranked by the
start-up order (``converter.startup``).
"""

from __future__ import annotations

from typing import BinaryIO

from rafs.model import Node

from .chunker import BlobWriter
from .layermodel import Create, Layer, RealPath, new_root
from .startup import StartupOrder
from .tarstream import Entry

__all__ = ["LayerApplier", "new_root"]


class LayerApplier:
    """Applies the entries of one layer onto ``root``; file data goes to ``writer``."""

    def __init__(self, root: Node, writer: BlobWriter | None, what: str = "layer",
                 prefetch: StartupOrder | None = None) -> None:
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
        ranks = self.prefetch.ranks(real, node.size) if self.prefetch is not None else None
        self.writer.add_file(node, data, node.size, ranks)
