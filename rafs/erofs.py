"""EROFS on-disk structures: struct formats with matching parse/format pairs.

Pure format code, no I/O. The layout follows the kernel's ``fs/erofs/erofs_fs.h``
for the subset rafs writes: 4 KiB blocks, compact and extended inodes, flat
(plain and inline) data for directories and symlinks, chunk-based regular files
whose chunk indexes point at extra devices, inline xattrs, and the device table.

Compact inodes are used only where the older and newer readings of their time
field agree (mtime equal to the superblock's build time, the field itself 0).
"""

from __future__ import annotations

import stat
import struct
from dataclasses import dataclass

from .errors import FormatError

SUPER_OFFSET = 1024
SUPER_MAGIC = 0xE0F5E1E2
BLOCK_BITS = 12
BLOCK_SIZE = 1 << BLOCK_BITS
NULL_ADDR = 0xFFFFFFFF
NAME_LEN = 255
ISLOT_BITS = 5  # nid = (inode offset - meta area start) >> ISLOT_BITS

FEATURE_INCOMPAT_CHUNKED_FILE = 0x4
FEATURE_INCOMPAT_DEVICE_TABLE = 0x8

# i_format: bit 0 is the inode version, bits 1-3 the data layout.
INODE_COMPACT = 0
INODE_EXTENDED = 1
LAYOUT_FLAT_PLAIN = 0
LAYOUT_FLAT_INLINE = 2
LAYOUT_CHUNK_BASED = 4
KNOWN_LAYOUTS = (LAYOUT_FLAT_PLAIN, LAYOUT_FLAT_INLINE, LAYOUT_CHUNK_BASED)

CHUNK_FORMAT_BLKBITS_MASK = 0x1F
CHUNK_FORMAT_INDEXES = 0x20

# Directory entry file types.
FT_UNKNOWN, FT_REG, FT_DIR, FT_CHR, FT_BLK, FT_FIFO, FT_SOCK, FT_LNK = range(8)
_FT_BY_IFMT = {
    stat.S_IFREG: FT_REG,
    stat.S_IFDIR: FT_DIR,
    stat.S_IFCHR: FT_CHR,
    stat.S_IFBLK: FT_BLK,
    stat.S_IFIFO: FT_FIFO,
    stat.S_IFSOCK: FT_SOCK,
    stat.S_IFLNK: FT_LNK,
}

# Xattr name prefixes by index (erofs_xattr_entry.e_name_index).
XATTR_PREFIXES: dict[int, bytes] = {
    1: b"user.",
    2: b"system.posix_acl_access",
    3: b"system.posix_acl_default",
    4: b"trusted.",
    6: b"security.",
}


def file_type(mode: int) -> int:
    return _FT_BY_IFMT.get(stat.S_IFMT(mode), FT_UNKNOWN)


def encode_dev(major: int, minor: int) -> int:
    """The kernel's ``new_encode_dev``."""
    return (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)


def decode_dev(raw: int) -> tuple[int, int]:
    """The kernel's ``new_decode_dev``: (major, minor)."""
    return (raw & 0xFFF00) >> 8, (raw & 0xFF) | ((raw >> 12) & 0xFFF00)


# --- superblock ---------------------------------------------------------------

_SUPER = struct.Struct("<IIIBBHQQIIII16s16sIHHHBBIQB23x")
assert _SUPER.size == 128


@dataclass(slots=True)
class SuperBlock:
    root_nid: int
    inos: int
    build_time: int
    build_time_nsec: int
    blocks: int
    meta_blkaddr: int
    feature_incompat: int
    extra_devices: int
    devt_slotoff: int
    uuid: bytes = bytes(16)
    volume_name: bytes = b""
    feature_compat: int = 0
    xattr_blkaddr: int = 0
    blkszbits: int = BLOCK_BITS

    def pack(self) -> bytes:
        return _SUPER.pack(
            SUPER_MAGIC, 0, self.feature_compat, self.blkszbits, 0, self.root_nid, self.inos,
            self.build_time, self.build_time_nsec, self.blocks, self.meta_blkaddr,
            self.xattr_blkaddr, self.uuid, self.volume_name, self.feature_incompat, 0,
            self.extra_devices, self.devt_slotoff, 0, 0, 0, 0, 0,
        )

    @classmethod
    def unpack(cls, buf: bytes | memoryview) -> SuperBlock:
        if len(buf) < SUPER_OFFSET + _SUPER.size:
            raise FormatError("image too small for an EROFS superblock", 0)
        f = _SUPER.unpack_from(buf, SUPER_OFFSET)
        if f[0] != SUPER_MAGIC:
            raise FormatError("no EROFS superblock magic", SUPER_OFFSET)
        if f[3] != BLOCK_BITS:
            raise FormatError(f"unsupported block size 2^{f[3]}", SUPER_OFFSET + 12)
        return cls(
            feature_compat=f[2], blkszbits=f[3], root_nid=f[5], inos=f[6], build_time=f[7],
            build_time_nsec=f[8], blocks=f[9], meta_blkaddr=f[10], xattr_blkaddr=f[11],
            uuid=f[12], volume_name=f[13], feature_incompat=f[14], extra_devices=f[16],
            devt_slotoff=f[17],
        )


# --- device table ---------------------------------------------------------------

DEVICE_SLOT = struct.Struct("<64sII56x")
assert DEVICE_SLOT.size == 128


def pack_device_slot(tag: bytes, blocks: int) -> bytes:
    return DEVICE_SLOT.pack(tag, blocks, 0)


def unpack_device_slot(buf: bytes | memoryview, offset: int) -> tuple[bytes, int]:
    tag, blocks, _mapped = DEVICE_SLOT.unpack_from(buf, offset)
    return tag.rstrip(b"\0"), blocks


# --- inodes ---------------------------------------------------------------------

INODE_COMPACT_FMT = struct.Struct("<HHHHIIIIHHI")
INODE_EXTENDED_FMT = struct.Struct("<HHHHQIIIIQII16x")
assert INODE_COMPACT_FMT.size == 32 and INODE_EXTENDED_FMT.size == 64


@dataclass(slots=True)
class RawInode:
    """An inode as stored: ``i_u`` is raw_blkaddr, rdev or chunk info by layout."""

    version: int
    layout: int
    xattr_icount: int
    mode: int
    nlink: int
    size: int
    i_u: int
    ino: int
    uid: int
    gid: int
    mtime: int
    mtime_nsec: int

    @property
    def isize(self) -> int:
        return INODE_EXTENDED_FMT.size if self.version == INODE_EXTENDED else INODE_COMPACT_FMT.size

    def pack(self) -> bytes:
        fmt = (self.layout << 1) | self.version
        if self.version == INODE_COMPACT:
            return INODE_COMPACT_FMT.pack(
                fmt, self.xattr_icount, self.mode, self.nlink, self.size, 0, self.i_u,
                self.ino, self.uid, self.gid, 0,
            )
        return INODE_EXTENDED_FMT.pack(
            fmt, self.xattr_icount, self.mode, 0, self.size, self.i_u, self.ino, self.uid,
            self.gid, self.mtime, self.mtime_nsec, self.nlink,
        )

    @classmethod
    def unpack(
        cls, buf: bytes | memoryview, offset: int, build_time: int, build_time_nsec: int
    ) -> RawInode:
        if offset < 0 or offset + INODE_COMPACT_FMT.size > len(buf):
            raise FormatError("inode outside the image", offset)
        (fmt,) = struct.unpack_from("<H", buf, offset)
        version, layout = fmt & 1, (fmt >> 1) & 0x7
        if fmt >> 4:
            raise FormatError(f"unknown inode format bits {fmt:#x}", offset)
        if layout not in KNOWN_LAYOUTS:
            raise FormatError(f"unsupported inode data layout {layout}", offset)
        if version == INODE_COMPACT:
            f = INODE_COMPACT_FMT.unpack_from(buf, offset)
            return cls(version, layout, f[1], f[2], f[3], f[4], f[6], f[7], f[8], f[9],
                       build_time + f[5], build_time_nsec)
        if offset + INODE_EXTENDED_FMT.size > len(buf):
            raise FormatError("inode outside the image", offset)
        f = INODE_EXTENDED_FMT.unpack_from(buf, offset)
        return cls(version, layout, f[1], f[2], f[11], f[4], f[5], f[6], f[7], f[8], f[9], f[10])


def chunk_info(chunk_bits: int) -> int:
    """``i_u`` of a chunk-based inode: chunk size is ``BLOCK_SIZE << chunk_bits``."""
    return (chunk_bits & CHUNK_FORMAT_BLKBITS_MASK) | CHUNK_FORMAT_INDEXES


CHUNK_INDEX = struct.Struct("<HHI")  # advise (0), device_id, blkaddr


# --- xattrs ---------------------------------------------------------------------

XATTR_IBODY_HEADER = struct.Struct("<IB7x")
XATTR_ENTRY = struct.Struct("<BBH")


def split_xattr_name(name: bytes) -> tuple[int, bytes] | None:
    """(prefix index, suffix) for ``name``, or None when EROFS has no prefix for it."""
    for index in (2, 3):  # the ACL prefixes are whole names
        if name == XATTR_PREFIXES[index]:
            return index, b""
    for index in (1, 4, 6):
        prefix = XATTR_PREFIXES[index]
        if name.startswith(prefix) and 0 < len(name) - len(prefix) <= NAME_LEN:
            return index, name[len(prefix):]
    return None


def pack_xattrs(xattrs: dict[bytes, bytes]) -> bytes:
    """The inline xattr body for ``xattrs`` (empty when there are none)."""
    if not xattrs:
        return b""
    out = bytearray(XATTR_IBODY_HEADER.pack(0, 0))
    for name in sorted(xattrs):
        split = split_xattr_name(name)
        if split is None:
            raise ValueError(f"xattr name {name!r} has no EROFS prefix")
        index, suffix = split
        value = xattrs[name]
        out += XATTR_ENTRY.pack(len(suffix), index, len(value)) + suffix + value
        out += bytes(-len(out) % 4)
    return bytes(out)


def xattr_icount(body_size: int) -> int:
    return 0 if body_size == 0 else (body_size - XATTR_IBODY_HEADER.size) // 4 + 1


def xattr_body_size(icount: int) -> int:
    return 0 if icount == 0 else XATTR_IBODY_HEADER.size + (icount - 1) * 4


def unpack_xattrs(buf: bytes | memoryview, offset: int, size: int) -> dict[bytes, bytes]:
    end = offset + size
    if end > len(buf) or size < XATTR_IBODY_HEADER.size:
        raise FormatError("xattr body outside the image", offset)
    _filter, shared = XATTR_IBODY_HEADER.unpack_from(buf, offset)
    if shared:
        raise FormatError("shared xattrs are not supported", offset)
    pos = offset + XATTR_IBODY_HEADER.size
    out: dict[bytes, bytes] = {}
    while pos + XATTR_ENTRY.size <= end:
        name_len, index, value_size = XATTR_ENTRY.unpack_from(buf, pos)
        start = pos + XATTR_ENTRY.size
        stop = start + name_len + value_size
        if stop > end:
            raise FormatError("xattr entry runs past its inode", pos)
        prefix = XATTR_PREFIXES.get(index)
        if prefix is None:
            raise FormatError(f"unknown xattr prefix index {index}", pos)
        out[prefix + bytes(buf[start:start + name_len])] = bytes(buf[start + name_len:stop])
        pos = stop + (-stop % 4)
    return out


# --- directories ----------------------------------------------------------------

DIRENT = struct.Struct("<QHBx")  # nid, nameoff, file_type


def pack_dir_blocks(entries: list[tuple[bytes, int, int]]) -> list[bytes]:
    """Pack sorted (name, nid, file_type) entries into directory blocks.

    Each block holds its dirents followed by their names; the last block is not
    padded (its length sets the directory's ``i_size``).
    """
    blocks: list[bytes] = []
    for group in split_dir_entries([e[0] for e in entries]):
        part = entries[group[0]:group[1]]
        nameoff = DIRENT.size * len(part)
        head = bytearray()
        for name, nid, ftype in part:
            head += DIRENT.pack(nid, nameoff, ftype)
            nameoff += len(name)
        blocks.append(bytes(head) + b"".join(e[0] for e in part))
    for i in range(len(blocks) - 1):
        blocks[i] += bytes(BLOCK_SIZE - len(blocks[i]))
    return blocks


def split_dir_entries(names: list[bytes]) -> list[tuple[int, int]]:
    """Block boundaries (start, stop) for sorted names, packed greedily."""
    groups: list[tuple[int, int]] = []
    start, used = 0, 0
    for i, name in enumerate(names):
        need = DIRENT.size + len(name)
        if used + need > BLOCK_SIZE:
            groups.append((start, i))
            start, used = i, 0
        used += need
    groups.append((start, len(names)))
    return groups


def dir_size(names: list[bytes]) -> int:
    """``i_size`` of a directory with these sorted names (including . and ..)."""
    groups = split_dir_entries(names)
    last = groups[-1]
    tail = sum(DIRENT.size + len(n) for n in names[last[0]:last[1]])
    return (len(groups) - 1) * BLOCK_SIZE + tail


def unpack_dir_block(block: bytes | memoryview, base: int) -> list[tuple[bytes, int, int]]:
    """(name, nid, file_type) of one directory block; ``base`` is its image offset."""
    size = len(block)
    if size < DIRENT.size:
        raise FormatError("directory block too short", base)
    _nid, nameoff0, _ft = DIRENT.unpack_from(block, 0)
    if nameoff0 % DIRENT.size or not DIRENT.size <= nameoff0 <= size:
        raise FormatError(f"bad first name offset {nameoff0}", base)
    count = nameoff0 // DIRENT.size
    out = []
    for i in range(count):
        nid, nameoff, ftype = DIRENT.unpack_from(block, i * DIRENT.size)
        if i + 1 < count:
            end = DIRENT.unpack_from(block, (i + 1) * DIRENT.size)[1]
        else:
            end = size
            nul = bytes(block[nameoff:end]).find(b"\0")
            if nul >= 0:
                end = nameoff + nul
        if not nameoff0 <= nameoff < end <= size or end - nameoff > NAME_LEN:
            raise FormatError(f"bad name offsets {nameoff}..{end} in directory", base)
        out.append((bytes(block[nameoff:end]), nid, ftype))
    return out
