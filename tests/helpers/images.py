"""Build RAFS images in memory from a plain description, straight through the builder.

For format tests that must not depend on the converter: files become chunks of
one uncompressed blob, laid out block-aligned as the converter would.
"""

from __future__ import annotations

import hashlib
import stat
from dataclasses import dataclass, field
from pathlib import Path

from rafs.builder import build_bootstrap
from rafs.codec import compress_chunk, digest_chunk
from rafs.model import BLOCK_SIZE, Blob, Chunk, Node


@dataclass
class ImageParts:
    root: Node
    blobs: list[Blob] = field(default_factory=list)
    chunks: list[Chunk] = field(default_factory=list)
    blob_data: list[bytearray] = field(default_factory=list)  # compressed blob bytes
    flat_data: list[bytearray] = field(default_factory=list)  # uncompressed address space
    chunk_size: int = 1 << 20
    _dedup: dict[bytes, int] = field(default_factory=dict)

    def new_blob(self) -> int:
        self.blob_data.append(bytearray())
        self.flat_data.append(bytearray())
        self.blobs.append(Blob("", 0, 0))
        return len(self.blobs) - 1

    def file(self, data: bytes, mode: int = 0o644, blob: int = 0, **kw: object) -> Node:
        refs: list[int | None] = []
        for i in range(0, len(data), self.chunk_size):
            piece = data[i:i + self.chunk_size]
            sha, xxh = digest_chunk(piece)
            if not piece.strip(b"\0") and len(piece) == self.chunk_size:
                refs.append(None)
                continue
            if sha in self._dedup:
                refs.append(self._dedup[sha])
                continue
            payload, flags = compress_chunk(piece)
            comp, flat = self.blob_data[blob], self.flat_data[blob]
            chunk = Chunk(blob, len(comp), len(payload), len(flat), len(piece), sha, xxh, flags)
            comp += payload
            flat += piece + bytes(-len(piece) % BLOCK_SIZE)
            self.chunks.append(chunk)
            self._dedup[sha] = len(self.chunks) - 1
            refs.append(len(self.chunks) - 1)
        return Node(mode=stat.S_IFREG | mode, size=len(data), chunks=refs, **kw)  # type: ignore[arg-type]

    def finish(self, prefetch: tuple[bytes, ...] = ()) -> bytes:
        for i, blob in enumerate(self.blobs):
            blob.digest = "sha256:" + hashlib.sha256(self.blob_data[i]).hexdigest()
            blob.compressed_size = len(self.blob_data[i])
            blob.uncompressed_size = len(self.flat_data[i])
        return build_bootstrap(self.root, self.blobs, self.chunks, self.chunk_size, prefetch)

    def write(self, directory: Path) -> tuple[Path, list[Path], list[Path]]:
        """Write bootstrap, compressed blobs and flat device files; return their paths."""
        directory.mkdir(parents=True, exist_ok=True)
        boot = directory / "bootstrap"
        boot.write_bytes(self.finish())
        blobs, flats = [], []
        for i in range(len(self.blobs)):
            b, f = directory / f"blob{i}", directory / f"flat{i}"
            b.write_bytes(self.blob_data[i])
            f.write_bytes(self.flat_data[i])
            blobs.append(b)
            flats.append(f)
        return boot, blobs, flats


def write_flat_blobs(ref: str, outdir: Path) -> tuple[Path, list[Path]]:
    """Write a converted image's bootstrap and each blob's uncompressed address space.

    The flat files are what a kernel EROFS mount takes as ``-o device=``; every
    chunk is decoded (and so verified) on the way.
    """
    from rafs.bootstrap import Bootstrap
    from rafs.codec import decode_chunk
    from rafs.image import open_local_image

    img = open_local_image(ref)
    outdir.mkdir(parents=True, exist_ok=True)
    boot_path = outdir / "bootstrap"
    boot_path.write_bytes(img.bootstrap)
    boot = Bootstrap.from_bytes(img.bootstrap)
    flats = []
    for i, blob in enumerate(boot.blobs):
        flat = outdir / f"blob{i}.flat"
        with open(img.layout.blob_path(blob.digest), "rb") as src, open(flat, "wb") as dst:
            dst.truncate(blob.uncompressed_size)
            dictionary = boot.dictionary(i)
            for index in range(blob.chunk_start, blob.chunk_start + blob.chunk_count):
                c = boot.chunk(index)
                src.seek(c.compressed_offset)
                data = decode_chunk(c, src.read(c.compressed_size), dictionary)
                dst.seek(c.uncompressed_offset)
                dst.write(data)
        flats.append(flat)
    return boot_path, flats
