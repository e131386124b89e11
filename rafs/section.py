"""The RAFS section: what EROFS cannot express, stored beside the EROFS area.

Pure format code, no I/O. A bootstrap is one file:

    [0, 1024)            RAFS header (EROFS leaves this area free)
    [1024, blocks*4096)  the EROFS image (superblock, device table, inodes, data)
    [section_off, ...)   RAFS section: blob table, chunk table, prefetch table

The header points at the three tables. The chunk table is sorted by
(blob, uncompressed offset), so a chunk index in an EROFS inode (device,
block address) finds its record by binary search within the blob's range.

    header   magic "RAFSBOOT", version, chunk size, table offsets and counts
    blob     sha256 (32), compressed size, uncompressed size, first chunk, chunk count
    chunk    blob, flags, compressed offset and size, uncompressed offset and size,
             sha256 (32), xxh3_64
    prefetch nids (u64), in access order
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .errors import FormatError
from .model import Blob, Chunk

MAGIC = b"RAFSBOOT"
VERSION = 1

HEADER = struct.Struct("<8sHHIQIIQIIQI36x")
BLOB_RECORD = struct.Struct("<32sQQII")
CHUNK_RECORD = struct.Struct("<IIQIQI32sQ")
PREFETCH_RECORD = struct.Struct("<Q")
assert HEADER.size == 96 and BLOB_RECORD.size == 56 and CHUNK_RECORD.size == 72

MIN_CHUNK_SIZE = 4096
MAX_CHUNK_SIZE = 16 << 20


@dataclass(slots=True)
class Header:
    chunk_size: int
    blob_off: int
    blob_count: int
    chunk_off: int
    chunk_count: int
    prefetch_off: int
    prefetch_count: int
    flags: int = 0

    def pack(self) -> bytes:
        return HEADER.pack(
            MAGIC, VERSION, self.flags, self.chunk_size, self.blob_off, self.blob_count, 0,
            self.chunk_off, self.chunk_count, 0, self.prefetch_off, self.prefetch_count,
        )

    @classmethod
    def unpack(cls, buf: bytes | memoryview) -> Header:
        if len(buf) < HEADER.size:
            raise FormatError("image too small for a RAFS header", 0)
        f = HEADER.unpack_from(buf, 0)
        if f[0] != MAGIC:
            raise FormatError("no RAFS header magic (not a rafs bootstrap)", 0)
        if f[1] != VERSION:
            raise FormatError(f"unsupported RAFS version {f[1]}", 8)
        hdr = cls(chunk_size=f[3], blob_off=f[4], blob_count=f[5], chunk_off=f[7],
                  chunk_count=f[8], prefetch_off=f[10], prefetch_count=f[11], flags=f[2])
        cs = hdr.chunk_size
        if cs & (cs - 1) or not MIN_CHUNK_SIZE <= cs <= MAX_CHUNK_SIZE:
            raise FormatError(f"bad chunk size {cs}", 12)
        for name, off, count, rec in (
            ("blob", hdr.blob_off, hdr.blob_count, BLOB_RECORD),
            ("chunk", hdr.chunk_off, hdr.chunk_count, CHUNK_RECORD),
            ("prefetch", hdr.prefetch_off, hdr.prefetch_count, PREFETCH_RECORD),
        ):
            if off + count * rec.size > len(buf) or (count and off < HEADER.size):
                raise FormatError(f"{name} table outside the image", off)
        return hdr


def pack_blob(blob: Blob) -> bytes:
    algo, _, hexdigest = blob.digest.partition(":")
    if algo != "sha256" or len(hexdigest) != 64:
        raise ValueError(f"blob digest {blob.digest!r} is not sha256")
    return BLOB_RECORD.pack(bytes.fromhex(hexdigest), blob.compressed_size,
                            blob.uncompressed_size, blob.chunk_start, blob.chunk_count)


def unpack_blob(buf: bytes | memoryview, offset: int) -> Blob:
    raw, csize, usize, start, count = BLOB_RECORD.unpack_from(buf, offset)
    return Blob("sha256:" + raw.hex(), csize, usize, start, count)


def pack_chunk(c: Chunk) -> bytes:
    return CHUNK_RECORD.pack(c.blob_index, c.flags, c.compressed_offset, c.compressed_size,
                             c.uncompressed_offset, c.uncompressed_size, c.sha256, c.xxh3)


def unpack_chunk(buf: bytes | memoryview, offset: int) -> Chunk:
    b, flags, coff, csize, uoff, usize, sha, xxh = CHUNK_RECORD.unpack_from(buf, offset)
    return Chunk(b, coff, csize, uoff, usize, sha, xxh, flags)


def chunk_uncompressed_offset(buf: bytes | memoryview, offset: int) -> int:
    """The uncompressed offset of the chunk record at ``offset`` (for binary search)."""
    return struct.unpack_from("<Q", buf, offset + 20)[0]
