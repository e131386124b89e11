"""Chunk codecs: compress a chunk for a blob, and decode and verify it back.

A chunk is stored as a zstd frame, or raw when that is not smaller; a frame
may use its blob's zstd dictionary (``CHUNK_DICT``; the dictionary lives in the
bootstrap, which the trust chain verifies before use). Decoding checks the
size and the sha256 before anything is handed on; xxh3 is offered for cheap
local integrity checks (cache), never for trust.

Dictionaries are trained per blob on its small chunks of the start-up set
(``train_dictionary``): small files compress poorly on their own, and a
dictionary learnt from their neighbours makes them smaller.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from typing import Any

import xxhash
import zstandard

from .errors import DigestError
from .model import CHUNK_COMPRESSED, CHUNK_DICT, Chunk

DEFAULT_LEVEL = 3  # chunks: zstd level
# The start-up set's chunks (bench.compression, README "Compression"): 6 % fewer start-up
# bytes than level 3 at no measurable cost in conversion time; 19 saves 15 % but makes
# the conversion of an optimized image 4-5x slower.
STARTUP_LEVEL = 9
BOOTSTRAP_LEVEL = 9  # measured on a 1.8 MB bootstrap: 19 is 7% smaller but 8x slower
DICT_SIZE = 112 << 10  # bytes of a trained dictionary (zstd's own default)
DICT_MAX_CHUNK = 16 << 10  # chunks up to this size use their blob's dictionary
_local = threading.local()  # zstd contexts are not thread-safe: one per thread
_CACHED_DICTS = 8  # per thread: (de)compression contexts kept per dictionary


def _context(kind: str, key: object, make: Callable[[], Any]) -> Any:
    """A thread-local zstd context for ``key`` (a level, or (dictionary, level))."""
    cache: dict[object, Any] = _local.__dict__.setdefault(kind, {})
    ctx = cache.get(key)
    if ctx is None:
        if len(cache) >= _CACHED_DICTS + 32:
            cache.clear()
        ctx = cache[key] = make()
    return ctx


class Dictionary:
    """A blob's zstd dictionary: its bytes, named by their sha256."""

    __slots__ = ("data", "key")

    def __init__(self, data: bytes) -> None:
        self.data = bytes(data)
        self.key = hashlib.sha256(self.data).digest()

    def __len__(self) -> int:
        return len(self.data)


def compress_chunk(data: bytes, level: int = DEFAULT_LEVEL,
                   dictionary: Dictionary | None = None) -> tuple[bytes, int]:
    """Return (payload, flags) for ``data``: zstd (with ``dictionary``, if given) when
    smaller, else raw."""
    if dictionary is None:
        cctx = _context("cctx", level, lambda: zstandard.ZstdCompressor(
            level=level, write_content_size=True))
        flags = CHUNK_COMPRESSED
    else:
        cctx = _context("cctx", (dictionary.key, level), lambda: zstandard.ZstdCompressor(
            level=level, write_content_size=True, write_dict_id=False,
            dict_data=zstandard.ZstdCompressionDict(dictionary.data)))
        flags = CHUNK_COMPRESSED | CHUNK_DICT
    packed = cctx.compress(data)
    if len(packed) < len(data):
        return packed, flags
    return data, 0


def train_dictionary(samples: list[bytes], size: int = DICT_SIZE) -> Dictionary | None:
    """A zstd dictionary of at most ``size`` bytes learnt from ``samples``, or None when
    they are too few to learn from. Deterministic: the same samples give the same bytes."""
    if len(samples) < 8 or sum(map(len, samples)) < 8 * size:
        return None
    try:
        trained = zstandard.train_dictionary(size, samples, k=1024, d=8)
    except zstandard.ZstdError:
        return None
    return Dictionary(trained.as_bytes())


def digest_chunk(data: bytes) -> tuple[bytes, int]:
    """The (sha256, xxh3_64) pair recorded in the chunk table for ``data``."""
    return hashlib.sha256(data).digest(), xxhash.xxh3_64_intdigest(data)


def decode_chunk(chunk: Chunk, payload: bytes, dictionary: Dictionary | None = None) -> bytes:
    """Decompress ``payload`` (with ``dictionary``, its blob's, if the chunk needs one)
    and verify it against ``chunk``; raise DigestError if wrong."""
    if len(payload) != chunk.compressed_size:
        raise DigestError(
            f"chunk at blob offset {chunk.compressed_offset}: got {len(payload)} bytes, "
            f"expected {chunk.compressed_size}"
        )
    if chunk.flags & CHUNK_COMPRESSED:
        try:
            if not chunk.flags & CHUNK_DICT:
                dctx = _context("dctx", None, zstandard.ZstdDecompressor)
            elif dictionary is None:
                raise DigestError(f"chunk at blob offset {chunk.compressed_offset} needs its "
                                  "blob's dictionary, which the image does not have")
            else:
                dctx = _context("dctx", dictionary.key, lambda: zstandard.ZstdDecompressor(
                    dict_data=zstandard.ZstdCompressionDict(dictionary.data)))
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
