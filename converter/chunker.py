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
- Access order: chunks of files on the prefetch list (``add_file(rank=...)``)
  go to the front of the blob, ordered by their rank in the list, so that the
  startup reads of a container are a few contiguous ranges; the other chunks
  follow in tar order.

Determinism: results are consumed strictly in submission order, so the blob
bytes and the chunk table depend only on the input and the options, never on
thread timing. Chunks go to the pool in batches of about ``BATCH_BYTES`` (most
files of an OS image are one small chunk; a task per chunk spent more time in
thread hand-offs than in zstd). Memory: at most ``max_inflight`` batches are
buffered.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from rafs.codec import DEFAULT_LEVEL, compress_chunk, digest_chunk
from rafs.model import BLOCK_SIZE, Blob, Chunk, Node
from rafs.section import MAX_CHUNK_SIZE, MIN_CHUNK_SIZE

from .errors import BadTarError, OptionError

log = logging.getLogger(__name__)

DEFAULT_CHUNK_SIZE = 1 << 20
COMPRESSIONS = ("zstd", "none")
BATCH_BYTES = 1 << 20
BATCH_PIECES = 256


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
    """The chunk codec with the conversion's options (thread-safe via rafs.codec)."""

    def __init__(self, compression: str, level: int) -> None:
        if compression not in COMPRESSIONS:
            raise OptionError(f"unknown compression {compression!r} (use zstd or none)")
        if compression == "zstd" and not 1 <= level <= 22:
            raise OptionError(f"zstd level {level} is not in 1..22")
        self.compression = compression
        self.level = level

    def __call__(self, data: bytes) -> tuple[bytes, int]:
        if self.compression == "none":
            return data, 0
        return compress_chunk(data, self.level)


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
        self.blob_files: list[Path | None] = []  # temp file of blobs[i]; None: seeded
        self.seeded_blobs = 0  # blobs[:seeded_blobs] come from a chunk dictionary
        self.index: dict[bytes, int] = {}  # sha256 -> chunk table index
        self._zero = bytes(self.chunk_size)
        if workers is None:
            workers = min(4, len(os.sched_getaffinity(0)))
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

    def seed(self, blobs: list[Blob], chunks: list[Chunk]) -> None:
        """Start from another image's blobs and chunk table (a chunk dictionary):
        chunks it has are referenced there instead of stored again."""
        assert not self.blobs and not self.chunks, "seed() before any layer"
        self.blobs.extend(blobs)
        self.blob_files.extend(None for _ in blobs)
        self.chunks.extend(chunks)
        for i, c in enumerate(chunks):
            self.index.setdefault(c.sha256, i)
        self.seeded_blobs = len(blobs)

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

    def _examine_all(self, pieces: list[bytes]) -> list[_Piece]:
        return [self._examine(p) for p in pieces]

    def _submit(self, batch: _Batch) -> None:
        if self._pool is None:
            batch.results = self._examine_all(batch.pieces)
        else:
            batch.future = self._pool.submit(self._examine_all, batch.pieces)


class _Batch:
    """Chunks examined by one pool task, in order."""

    __slots__ = ("future", "pieces", "results", "size")

    def __init__(self) -> None:
        self.pieces: list[bytes] = []
        self.size = 0
        self.future: Future[list[_Piece]] | None = None
        self.results: list[_Piece] | None = None

    def result(self, index: int) -> _Piece:
        if self.results is None:
            assert self.future is not None
            self.results = self.future.result()
            self.pieces = []
        return self.results[index]


class BlobWriter:
    """Writes one layer's new chunks to a temp blob file and fills ``Node.chunks``."""

    def __init__(self, store: ChunkStore, name: str = "") -> None:
        self.store = store
        self.name = name
        self.blob_index = len(store.blobs)
        self.path = store.workdir / f"blob-{self.blob_index}.tmp"
        self._front_path = store.workdir / f"blob-{self.blob_index}.front.tmp"
        self._files: dict[bool, BinaryIO] = {}  # front? -> temp file
        self._front_size = 0
        self._front: list[tuple[int, int, int, int]] = []  # (rank, seq, chunk, offset)
        self._sha256 = hashlib.sha256()  # of the back file; the blob's when nothing is in front
        # Blob writes and the blob hash run on one I/O thread, in order (they drop the GIL).
        self._io: ThreadPoolExecutor | None = None
        self._writes: deque[Future[None]] = deque()
        self._compressed_size = 0
        self._uncompressed_end = 0  # block-aligned end of the address space
        self._first_chunk = len(store.chunks)
        self._pending: deque[tuple[_Batch, int, Node, int, int | None]] = deque()
        self._batch: _Batch | None = None  # being filled
        self._batches: deque[_Batch] = deque()  # submitted, not yet settled
        self._finished = False

    def add_file(self, node: Node, data: Readable, size: int, rank: int | None = None) -> None:
        """Chunk ``size`` bytes of ``data`` into ``node`` (a regular file).

        ``rank``: the file's position in the prefetch list (its new chunks go
        to the front of the blob), or None. ``node.chunks`` gets its final
        values no later than ``finish()``.
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
            batch = self._batch
            if batch is None:
                batch = self._batch = _Batch()
            batch.pieces.append(piece)
            batch.size += want
            self._pending.append((batch, len(batch.pieces) - 1, node, i, rank))
            if batch.size >= BATCH_BYTES or len(batch.pieces) >= BATCH_PIECES:
                self._submit_batch()

    def _submit_batch(self) -> None:
        batch, self._batch = self._batch, None
        if batch is None:
            return
        self.store._submit(batch)
        self._batches.append(batch)
        while len(self._batches) > self.store.max_inflight:
            if self._pending and self._pending[0][0] is self._batches[0]:
                self._settle_one()  # pops the batch once its last chunk is settled
            else:
                self._batches.popleft()

    def _settle_one(self) -> None:
        batch, index, node, i, rank = self._pending.popleft()
        if batch is self._batch:
            self._submit_batch()
        piece = batch.result(index)
        batch.results[index] = None  # type: ignore[index, call-overload]  # free the payload
        if self._batches and self._batches[0] is batch and (
                not self._pending or self._pending[0][0] is not batch):
            self._batches.popleft()
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
        if rank is not None:
            # Offsets are set when finish() lays out the front.
            self._write(piece.payload, front=True)
            self._front.append((rank, len(self._front), len(store.chunks), self._front_size))
            self._front_size += len(piece.payload)
            store.index[piece.sha256] = len(store.chunks)
            store.chunks.append(Chunk(self.blob_index, 0, len(piece.payload), 0, piece.size,
                                      piece.sha256, piece.xxh3, piece.flags))
            node.chunks[i] = len(store.chunks) - 1
            return
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

    def _append(self, f: BinaryIO, payload: bytes, front: bool) -> None:
        f.write(payload)
        if not front:
            self._sha256.update(payload)

    def _write(self, payload: bytes, front: bool = False) -> None:
        f = self._files.get(front)
        if f is None:
            path = self._front_path if front else self.path
            f = self._files[front] = open(path, "wb")  # noqa: SIM115 - closed by finish/abort
        if self.store.workers == 0:
            self._append(f, payload, front)
            return
        if self._io is None:
            self._io = ThreadPoolExecutor(1, thread_name_prefix="rafs-blob")
        self._writes.append(self._io.submit(self._append, f, payload, front))
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
        if not self._files:
            log.debug("%s: no new chunks, no blob", self.name)
            return None
        for f in self._files.values():
            f.close()
        self._files.clear()
        digest = self._lay_out_front() if self._front else "sha256:" + self._sha256.hexdigest()
        with open(self.path, "rb+") as f:
            os.fsync(f.fileno())
        blob = Blob(
            digest=digest,
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

    def _lay_out_front(self) -> str:
        """Rewrite the blob as front chunks by rank, then the rest; returns its digest."""
        chunks = self.store.chunks
        front_ids = {c for _r, _s, c, _o in self._front}
        back_ids = [c for c in range(self._first_chunk, len(chunks)) if c not in front_ids]
        final = self.path.with_suffix(".final")
        sha = hashlib.sha256()
        coff = uoff = 0
        with open(final, "wb") as out:
            with open(self._front_path, "rb") as front:
                for _rank, _seq, c, offset in sorted(self._front):
                    chunk = chunks[c]
                    front.seek(offset)
                    payload = front.read(chunk.compressed_size)
                    out.write(payload)
                    sha.update(payload)
                    chunk.compressed_offset, chunk.uncompressed_offset = coff, uoff
                    coff += chunk.compressed_size
                    uoff = align_up(uoff + chunk.uncompressed_size)
            if back_ids:
                for c in back_ids:  # back chunks keep their order and relative places
                    chunks[c].compressed_offset += coff
                    chunks[c].uncompressed_offset += uoff
                with open(self.path, "rb") as back:
                    while block := back.read(1 << 20):
                        out.write(block)
                        sha.update(block)
        self._compressed_size += coff
        self._uncompressed_end += uoff
        self._front_path.unlink()
        os.replace(final, self.path)
        log.debug("%s: %d prefetch chunks (%d bytes) in front", self.name, len(self._front), coff)
        return "sha256:" + sha.hexdigest()

    def abort(self) -> None:
        """Drop everything of this layer (after an error)."""
        for batch in self._batches:
            if batch.future is not None:
                batch.future.cancel()
        self._batches.clear()
        self._batch = None
        self._pending.clear()
        if self._io is not None:
            self._io.shutdown(wait=True, cancel_futures=True)
            self._io = None
        self._writes.clear()
        for f in self._files.values():
            f.close()
        self._files.clear()
        self.path.unlink(missing_ok=True)
        self._front_path.unlink(missing_ok=True)
        self._finished = True
