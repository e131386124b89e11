"""Chunk codecs: compress a chunk for a blob, and decode and verify it back.

A chunk is stored as a zstd frame, or raw when that is not smaller. Decoding
checks the size and the sha256 before anything is handed on; xxh3 is offered
for cheap local integrity checks (cache), never for trust.
"""

from __future__ import annotations

import hashlib
import threading

import xxhash
import zstandard

from .errors import DigestError
from .model import CHUNK_COMPRESSED, Chunk

DEFAULT_LEVEL = 3  # chunks: zstd level
BOOTSTRAP_LEVEL = 9  # measured on a 1.8 MB bootstrap: 19 is 7% smaller but 8x slower
_local = threading.local()  # zstd contexts are not thread-safe: one per thread


def compress_chunk(data: bytes, level: int = DEFAULT_LEVEL) -> tuple[bytes, int]:
    """Return (payload, flags) for ``data``: zstd when smaller, else raw."""
    cache: dict[int, zstandard.ZstdCompressor] = _local.__dict__.setdefault("cctx", {})
    cctx = cache.get(level)
    if cctx is None:
        cctx = cache[level] = zstandard.ZstdCompressor(level=level, write_content_size=True)
    packed = cctx.compress(data)
    if len(packed) < len(data):
        return packed, CHUNK_COMPRESSED
    return data, 0


def digest_chunk(data: bytes) -> tuple[bytes, int]:
    """The (sha256, xxh3_64) pair recorded in the chunk table for ``data``."""
    return hashlib.sha256(data).digest(), xxhash.xxh3_64_intdigest(data)


def decode_chunk(chunk: Chunk, payload: bytes) -> bytes:
    """Decompress ``payload`` and verify it against ``chunk``; raise DigestError if wrong."""
    if len(payload) != chunk.compressed_size:
        raise DigestError(
            f"chunk at blob offset {chunk.compressed_offset}: got {len(payload)} bytes, "
            f"expected {chunk.compressed_size}"
        )
    if chunk.flags & CHUNK_COMPRESSED:
        try:
            dctx = _local.__dict__.get("dctx")
            if dctx is None:
                dctx = _local.dctx = zstandard.ZstdDecompressor()
            data = dctx.decompress(
                payload, max_output_size=chunk.uncompressed_size
            )
        except zstandard.ZstdError as e:
            raise DigestError(f"chunk at blob offset {chunk.compressed_offset}: {e}") from None
    else:
        data = payload
    if len(data) != chunk.uncompressed_size or hashlib.sha256(data).digest() != chunk.sha256:
        raise DigestError(
            f"chunk at blob offset {chunk.compressed_offset}: sha256 mismatch"
        )
    return data


def check_xxh3(chunk: Chunk, data: bytes) -> bool:
    """Cheap local check of cached bytes."""
    return len(data) == chunk.uncompressed_size and xxhash.xxh3_64_intdigest(data) == chunk.xxh3


MAX_BOOTSTRAP = 1 << 30


def decompress_bootstrap(payload: bytes) -> bytes:
    """Decompress a bootstrap layer (one zstd frame, at most MAX_BOOTSTRAP bytes out).
    Its digests are checked by ``rafs.trust.verify_bootstrap``, which calls this."""
    try:
        return zstandard.ZstdDecompressor().decompress(payload, max_output_size=MAX_BOOTSTRAP)
    except zstandard.ZstdError as e:
        raise DigestError(f"bootstrap layer does not decompress: {e}") from None
