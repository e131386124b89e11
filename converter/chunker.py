"""Chunking, dedup and blob writing.

This module owns the chunk table and the data blobs of one conversion:

- ``ChunkStore`` holds what is global to an image: the chunk table
  (``rafs.model.Chunk``), the finished ``Blob`` records in device order, the
  sha256 -> chunk index used to dedup within and across layers, and a small
  thread pool that hashes and compresses chunks (hashlib and zstandard release
  the GIL, so this runs in parallel with tar parsing and decompression).
- ``BlobWriter`` writes one layer's blob: each regular file is cut into fixed
  ``chunk_size`` pieces; an all-zero piece is a hole (``None``), a piece seen
  before (same sha256) refers to the existing chunk, wherever it lives, and a
  new piece is compressed (zstd, or raw when that is not smaller) and appended
  to the blob's temp file. In the blob's uncompressed address space every
  chunk starts on a block boundary. A layer that adds no new chunk has no blob.

Determinism: results are consumed strictly in submission order, so the blob
bytes and the chunk table depend only on the input and the options, never on
thread timing. Memory: at most ``max_inflight`` chunks are buffered.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

import zstandard

from rafs.codec import digest_chunk
from rafs.model import BLOCK_SIZE, CHUNK_COMPRESSED, Blob, Chunk, Node

from .errors import BadTarError, OptionError

log = logging.getLogger(__name__)

DEFAULT_CHUNK_SIZE = 1 << 20
MIN_CHUNK_SIZE = 4 << 10
MAX_CHUNK_SIZE = 16 << 20
COMPRESSIONS = ("zstd", "none")
DEFAULT_LEVEL = 3


class Readable(Protocol):
    def read(self, n: int = -1, /) -> bytes: ...


def check_chunk_size(size: int) -> int:
    """``size`` if it is a power of two in 4 KiB..16 MiB, else OptionError."""
    if size & (size - 1) or not MIN_CHUNK_SIZE <= size <= MAX_CHUNK_SIZE:
        raise OptionError(f"chunk size {size} is not a power of two between 4 KiB and 16 MiB")
    return size


def align_up(value: int, unit: int = BLOCK_SIZE) -> int:
    return (value + unit - 1) // unit * unit


@dataclass(frozen=True, slots=True)
class _Piece:
    """What a worker learnt about one chunk of data."""

    sha256: bytes | None  # None: all zeros (a hole)
    xxh3: int = 0
    payload: bytes | None = None  # None: known already when the worker looked
    flags: int = 0
    size: int = 0


class _Compressor:
    """Per-thread zstd compressors: a ZstdCompressor must not be shared by threads."""

    def __init__(self, compression: str, level: int) -> None:
        if compression not in COMPRESSIONS:
            raise OptionError(f"unknown compression {compression!r} (use zstd or none)")
        if compression == "zstd" and not 1 <= level <= 22:
            raise OptionError(f"zstd level {level} is not in 1..22")
        self.compression = compression
        self.level = level
        self._local = threading.local()

    def __call__(self, data: bytes) -> tuple[bytes, int]:
        if self.compression == "none":
            return data, 0
        cctx = getattr(self._local, "cctx", None)
        if cctx is None:
            # Same parameters as rafs.codec.compress_chunk, so the same bytes.
            cctx = self._local.cctx = zstandard.ZstdCompressor(
                level=self.level, write_content_size=True)
        packed = cctx.compress(data)
        if len(packed) < len(data):
            return packed, CHUNK_COMPRESSED
        return data, 0


class ChunkStore:
    """The chunk table, the blobs and the dedup index of one conversion."""

    def __init__(
        self,
        workdir: Path,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        compression: str = "zstd",
        level: int = DEFAULT_LEVEL,
        workers: int | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.chunk_size = check_chunk_size(chunk_size)
        self._compress = _Compressor(compression, level)
        self.chunks: list[Chunk] = []
        self.blobs: list[Blob] = []
        self.blob_files: list[Path] = []  # temp file of blobs[i]
        self.index: dict[bytes, int] = {}  # sha256 -> chunk table index
        self._zero = bytes(self.chunk_size)
        if workers is None:
            workers = min(4, os.cpu_count() or 1)
        self.workers = max(0, workers)
        self._pool = (ThreadPoolExecutor(self.workers, thread_name_prefix="rafs-chunk")
                      if self.workers else None)
        self.max_inflight = max(2, 2 * self.workers + 2)
        # statistics
        self.bytes_in = 0
        self.hole_chunks = 0
        self.dedup_chunks = 0

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> ChunkStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def begin_layer(self, name: str = "") -> BlobWriter:
        """A writer for the next layer's blob (device ``len(blobs) + 1`` if it adds data)."""
        return BlobWriter(self, name)

    # runs in worker threads
    def _examine(self, data: bytes) -> _Piece:
        n = len(data)
        if data == (self._zero if n == self.chunk_size else self._zero[:n]):
            return _Piece(None, size=n)
        sha, xxh = digest_chunk(data)
        if sha in self.index:  # a racy peek: only ever saves work, never decides
            return _Piece(sha, xxh, None, 0, n)
        payload, flags = self._compress(data)
        return _Piece(sha, xxh, payload, flags, n)

    def _submit(self, data: bytes) -> Future[_Piece] | _Piece:
        if self._pool is None:
            return self._examine(data)
        return self._pool.submit(self._examine, data)


class BlobWriter:
    """Writes one layer's new chunks to a temp blob file and fills ``Node.chunks``."""

    def __init__(self, store: ChunkStore, name: str = "") -> None:
        self.store = store
        self.name = name
        self.blob_index = len(store.blobs)
        self.path = store.workdir / f"blob-{self.blob_index}.tmp"
        self._file: BinaryIO | None = None
        self._sha256 = hashlib.sha256()
        # Blob writes and the blob hash run on one I/O thread, in order (they drop the GIL).
        self._io: ThreadPoolExecutor | None = None
        self._writes: deque[Future[None]] = deque()
        self._compressed_size = 0
        self._uncompressed_end = 0  # block-aligned end of the address space
        self._first_chunk = len(store.chunks)
        self._pending: deque[tuple[Future[_Piece] | _Piece, Node, int]] = deque()
        self._finished = False

    def add_file(self, node: Node, data: Readable, size: int,
                 on_chunk: Callable[[int], None] | None = None) -> None:
        """Chunk ``size`` bytes of ``data`` into ``node`` (a regular file).

        ``node.chunks`` gets its final values no later than ``finish()``.
        """
        cs = self.store.chunk_size
        count = -(-size // cs)
        node.size = size
        node.chunks = [None] * count
        for i in range(count):
            want = min(cs, size - i * cs)
            piece = data.read(want)
            if len(piece) != want:
                raise BadTarError(f"{self.name}: file data ends after {i * cs + len(piece)} "
                                  f"of {size} bytes")
            self.store.bytes_in += want
            self._pending.append((self.store._submit(piece), node, i))
            if len(self._pending) > self.store.max_inflight:
                self._settle_one()

    def _settle_one(self) -> None:
        fut, node, i = self._pending.popleft()
        piece = fut.result() if isinstance(fut, Future) else fut
        store = self.store
        if piece.sha256 is None:
            store.hole_chunks += 1
            node.chunks[i] = None
            return
        known = store.index.get(piece.sha256)
        if known is not None:
            store.dedup_chunks += 1
            node.chunks[i] = known
            return
        assert piece.payload is not None  # the index only grows: a miss now was a miss then
        self._write(piece.payload)
        chunk = Chunk(
            blob_index=self.blob_index,
            compressed_offset=self._compressed_size,
            compressed_size=len(piece.payload),
            uncompressed_offset=self._uncompressed_end,
            uncompressed_size=piece.size,
            sha256=piece.sha256,
            xxh3=piece.xxh3,
            flags=piece.flags,
        )
        self._compressed_size += len(piece.payload)
        self._uncompressed_end = align_up(self._uncompressed_end + piece.size)
        store.index[piece.sha256] = len(store.chunks)
        store.chunks.append(chunk)
        node.chunks[i] = len(store.chunks) - 1

    def _append(self, payload: bytes) -> None:
        assert self._file is not None
        self._file.write(payload)
        self._sha256.update(payload)

    def _write(self, payload: bytes) -> None:
        if self._file is None:
            self._file = open(self.path, "wb")  # noqa: SIM115 - closed in finish()/abort()
        if self.store.workers == 0:
            self._append(payload)
            return
        if self._io is None:
            self._io = ThreadPoolExecutor(1, thread_name_prefix="rafs-blob")
        self._writes.append(self._io.submit(self._append, payload))
        while len(self._writes) > self.store.max_inflight or (
                self._writes and self._writes[0].done()):
            self._writes.popleft().result()  # raises the write's OSError, if any

    def flush(self) -> None:
        """Settle every pending chunk and finish every write."""
        while self._pending:
            self._settle_one()
        while self._writes:
            self._writes.popleft().result()
        if self._io is not None:
            self._io.shutdown(wait=True)
            self._io = None

    def finish(self) -> Blob | None:
        """Close the layer: the new Blob (also appended to the store), or None."""
        assert not self._finished, "finish() twice"
        self.flush()
        self._finished = True
        if self._file is None:
            log.debug("%s: no new chunks, no blob", self.name)
            return None
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        blob = Blob(
            digest="sha256:" + self._sha256.hexdigest(),
            compressed_size=self._compressed_size,
            uncompressed_size=self._uncompressed_end,
            chunk_start=self._first_chunk,
            chunk_count=len(self.store.chunks) - self._first_chunk,
        )
        self.store.blobs.append(blob)
        self.store.blob_files.append(self.path)
        log.info("%s: blob %s, %d chunks, %d bytes (%d uncompressed)", self.name, blob.digest,
                 blob.chunk_count, blob.compressed_size, blob.uncompressed_size)
        return blob

    def abort(self) -> None:
        """Drop everything of this layer (after an error)."""
        for fut, _node, _i in self._pending:
            if isinstance(fut, Future):
                fut.cancel()
        self._pending.clear()
        if self._io is not None:
            self._io.shutdown(wait=True, cancel_futures=True)
            self._io = None
        self._writes.clear()
        if self._file is not None:
            self._file.close()
            self._file = None
        self.path.unlink(missing_ok=True)
        self._finished = True
