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
    prefetch nids (u64) of the prefetch list's files, in access order
    ranges   (version 2) the start-up set: runs of the chunk table (first chunk,
             count), in first-access order
    dicts    (version 2) zstd dictionaries: (blob, size, offset, sha256) records,
             then the dictionaries' bytes; chunks flagged ``CHUNK_DICT`` are
             compressed with their blob's dictionary

Version 1 has the first three tables only (the header's fields for the other
two are zero); a writer stamps version 2 only when the image has a range or a
dictionary table, so an image without them stays readable by version-1
readers. A version-1 reader refuses version 2 (it could not decode chunks
compressed with a dictionary); this reader takes both.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .errors import FormatError
from .model import Blob, Chunk

MAGIC = b"RAFSBOOT"
VERSION = 2  # the newest this module writes and reads
VERSIONS = (1, 2)

HEADER = struct.Struct("<8sHHIQIIQIIQIIQIIQI4x")
BLOB_RECORD = struct.Struct("<32sQQII")
CHUNK_RECORD = struct.Struct("<IIQIQI32sQ")
PREFETCH_RECORD = struct.Struct("<Q")
RANGE_RECORD = struct.Struct("<II")
DICT_RECORD = struct.Struct("<IIQ32s")
assert HEADER.size == 96 and BLOB_RECORD.size == 56 and CHUNK_RECORD.size == 72
assert RANGE_RECORD.size == 8 and DICT_RECORD.size == 48

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
    range_off: int = 0
    range_count: int = 0
    dict_off: int = 0
    dict_count: int = 0

    @property
    def version(self) -> int:
        """1 unless a version-2 table is present."""
        return 2 if self.range_count or self.dict_count else 1

    def pack(self) -> bytes:
        v2 = self.version == 2
        return HEADER.pack(
            MAGIC, self.version, self.flags, self.chunk_size, self.blob_off, self.blob_count, 0,
            self.chunk_off, self.chunk_count, 0, self.prefetch_off, self.prefetch_count, 0,
            self.range_off if v2 else 0, self.range_count, 0, self.dict_off if v2 else 0,
            self.dict_count,
        )

    @classmethod
    def unpack(cls, buf: bytes | memoryview) -> Header:
        if len(buf) < HEADER.size:
            raise FormatError("image too small for a RAFS header", 0)
        f = HEADER.unpack_from(buf, 0)
        if f[0] != MAGIC:
            raise FormatError("no RAFS header magic (not a rafs bootstrap)", 0)
        if f[1] not in VERSIONS:
            raise FormatError(f"unsupported RAFS version {f[1]}", 8)
        hdr = cls(chunk_size=f[3], blob_off=f[4], blob_count=f[5], chunk_off=f[7],
                  chunk_count=f[8], prefetch_off=f[10], prefetch_count=f[11], flags=f[2],
                  range_off=f[13], range_count=f[14], dict_off=f[16], dict_count=f[17])
        if f[1] == 1 and (hdr.range_count or hdr.dict_count):
            raise FormatError("version 1 header with version 2 tables", 64)
        cs = hdr.chunk_size
        if cs & (cs - 1) or not MIN_CHUNK_SIZE <= cs <= MAX_CHUNK_SIZE:
            raise FormatError(f"bad chunk size {cs}", 12)
        for name, off, count, rec in (
            ("blob", hdr.blob_off, hdr.blob_count, BLOB_RECORD),
            ("chunk", hdr.chunk_off, hdr.chunk_count, CHUNK_RECORD),
            ("prefetch", hdr.prefetch_off, hdr.prefetch_count, PREFETCH_RECORD),
            ("range", hdr.range_off, hdr.range_count, RANGE_RECORD),
            ("dictionary", hdr.dict_off, hdr.dict_count, DICT_RECORD),
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


@dataclass(frozen=True, slots=True)
class DictRecord:
    """Where a blob's zstd dictionary lies in the bootstrap, and its sha256."""

    blob_index: int
    size: int
    offset: int
    sha256: bytes


def pack_dict(rec: DictRecord) -> bytes:
    return DICT_RECORD.pack(rec.blob_index, rec.size, rec.offset, rec.sha256)


def unpack_dict(buf: bytes | memoryview, offset: int) -> DictRecord:
    return DictRecord(*DICT_RECORD.unpack_from(buf, offset))
