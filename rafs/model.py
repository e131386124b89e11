"""The in-memory image model shared by the converter and the bootstrap writer.

A RAFS image is a tree of ``Node`` objects (a hardlink is one ``Node`` reachable
under several names), a table of ``Blob`` records (one per data blob, in device
order) and a table of ``Chunk`` records. A regular file's data is the
concatenation of its chunks; ``None`` in ``Node.chunks`` is a hole (zeros).

These are plain data: no I/O, no format details.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass, field

BLOCK_SIZE = 4096
BLOCK_BITS = 12

CHUNK_COMPRESSED = 0x1  # Chunk.flags: payload is a zstd frame; otherwise raw bytes
CHUNK_DICT = 0x2  # with CHUNK_COMPRESSED: the frame uses its blob's zstd dictionary
CHUNK_FLAGS = CHUNK_COMPRESSED | CHUNK_DICT  # every flag a chunk may carry


@dataclass(slots=True)
class Chunk:
    """One entry of the chunk table: where a chunk lives and what it must hash to."""

    blob_index: int
    compressed_offset: int
    compressed_size: int
    uncompressed_offset: int  # block-aligned, in the blob's uncompressed address space
    uncompressed_size: int
    sha256: bytes  # of the uncompressed bytes; the trust anchor
    xxh3: int  # xxh3_64 of the uncompressed bytes; fast local checks only
    flags: int = 0

    @property
    def compressed(self) -> bool:
        return bool(self.flags & CHUNK_COMPRESSED)


@dataclass(slots=True)
class Blob:
    """One data blob: an OCI layer holding compressed chunks back to back."""

    digest: str  # "sha256:<hex>" of the blob as stored in the registry
    compressed_size: int
    uncompressed_size: int  # size of the uncompressed address space, a block multiple
    chunk_start: int = 0  # first index of this blob's chunks in the chunk table
    chunk_count: int = 0


@dataclass(eq=False)
class Node:
    """A filesystem object. ``mode`` carries the file type bits (``stat.S_IFMT``)."""

    mode: int
    uid: int = 0
    gid: int = 0
    mtime: int = 0
    mtime_nsec: int = 0
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    size: int = 0  # regular files
    chunks: list[int | None] = field(default_factory=list)  # chunk table indices
    target: bytes = b""  # symlinks
    rdev: int = 0  # character and block devices
    children: dict[bytes, Node] | None = None  # directories

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_reg(self) -> bool:
        return stat.S_ISREG(self.mode)

    @classmethod
    def directory(cls, mode: int = 0o755, **kw: object) -> Node:
        return cls(mode=stat.S_IFDIR | mode, children={}, **kw)  # type: ignore[arg-type]


def blocks_for(size: int) -> int:
    """Number of blocks needed to hold ``size`` bytes."""
    return (size + BLOCK_SIZE - 1) >> BLOCK_BITS
