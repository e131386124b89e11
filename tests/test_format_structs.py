"""Round trips of every on-disk structure: format then parse gives the same value."""

from __future__ import annotations

import stat

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rafs import erofs, section
from rafs.errors import FormatError
from rafs.model import Blob, Chunk

u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
u64 = st.integers(0, 2**64 - 1)
names = st.binary(min_size=1, max_size=255).filter(lambda n: b"/" not in n and b"\0" not in n)


@given(root_nid=u16, inos=u64, bt=u64, btn=u32, blocks=u32, meta=u32, inc=u32, devs=u16, slot=u16)
def test_superblock_round_trip(root_nid, inos, bt, btn, blocks, meta, inc, devs, slot):
    sb = erofs.SuperBlock(root_nid, inos, bt, btn, blocks, meta, inc, devs, slot,
                          volume_name=b"rafs".ljust(16, b"\0"))
    buf = bytes(erofs.SUPER_OFFSET) + sb.pack()
    assert erofs.SuperBlock.unpack(buf) == sb


def test_superblock_rejects_bad_magic_and_block_size():
    sb = erofs.SuperBlock(1, 1, 0, 0, 1, 1, 0, 0, 9)
    buf = bytearray(bytes(erofs.SUPER_OFFSET) + sb.pack())
    bad = bytearray(buf)
    bad[erofs.SUPER_OFFSET] ^= 1
    with pytest.raises(FormatError, match="magic"):
        erofs.SuperBlock.unpack(bad)
    buf[erofs.SUPER_OFFSET + 12] = 9
    with pytest.raises(FormatError, match="block size"):
        erofs.SuperBlock.unpack(buf)


@given(
    layout=st.sampled_from(erofs.KNOWN_LAYOUTS),
    xic=u16, mode=u16, nlink=u16, size=u32, i_u=u32, ino=u32, uid=u16, gid=u16,
)
def test_compact_inode_round_trip(layout, xic, mode, nlink, size, i_u, ino, uid, gid):
    raw = erofs.RawInode(erofs.INODE_COMPACT, layout, xic, mode, nlink, size, i_u, ino, uid,
                         gid, 77, 5)
    assert erofs.RawInode.unpack(raw.pack(), 0, 77, 5) == raw


@given(
    layout=st.sampled_from(erofs.KNOWN_LAYOUTS), xic=u16, mode=u16, nlink=u32, size=u64,
    i_u=u32, ino=u32, uid=u32, gid=u32, mtime=u64, nsec=u32,
)
def test_extended_inode_round_trip(layout, xic, mode, nlink, size, i_u, ino, uid, gid, mtime,
                                   nsec):
    raw = erofs.RawInode(erofs.INODE_EXTENDED, layout, xic, mode, nlink, size, i_u, ino, uid,
                         gid, mtime, nsec)
    assert erofs.RawInode.unpack(raw.pack(), 0, 0, 0) == raw


def test_inode_rejects_unknown_layout():
    raw = bytearray(erofs.RawInode(0, 0, 0, stat.S_IFREG, 1, 0, 0, 1, 0, 0, 0, 0).pack())
    raw[0] = 3 << 1  # compressed layouts are not ours
    with pytest.raises(FormatError, match="layout"):
        erofs.RawInode.unpack(bytes(raw), 0, 0, 0)


@given(tag=st.binary(min_size=0, max_size=64).map(lambda b: b.rstrip(b"\0")), blocks=u32)
def test_device_slot_round_trip(tag, blocks):
    assert erofs.unpack_device_slot(erofs.pack_device_slot(tag, blocks), 0) == (tag, blocks)


xattr_names = st.one_of(
    st.sampled_from([b"system.posix_acl_access", b"system.posix_acl_default"]),
    st.tuples(st.sampled_from([b"user.", b"trusted.", b"security."]),
              st.binary(min_size=1, max_size=40)).map(lambda t: t[0] + t[1]),
)


@given(st.dictionaries(xattr_names, st.binary(max_size=300), max_size=8))
def test_xattrs_round_trip(xattrs):
    body = erofs.pack_xattrs(xattrs)
    assert len(body) % 4 == 0
    assert erofs.xattr_body_size(erofs.xattr_icount(len(body))) == len(body)
    assert erofs.unpack_xattrs(body, 0, len(body)) == xattrs if xattrs else body == b""


def test_xattr_without_erofs_prefix_is_refused():
    assert erofs.split_xattr_name(b"system.nfs4_acl") is None
    with pytest.raises(ValueError):
        erofs.pack_xattrs({b"other.x": b"1"})


@given(st.lists(names, min_size=1, max_size=400, unique=True), st.data())
def test_directory_blocks_round_trip(entry_names, data):
    entry_names.sort()
    entries = [(n, data.draw(u64), data.draw(st.integers(0, 7))) for n in entry_names]
    blocks = erofs.pack_dir_blocks(entries)
    assert sum(len(b) for b in blocks) == erofs.dir_size(entry_names)
    assert all(len(b) == erofs.BLOCK_SIZE for b in blocks[:-1])
    back = [e for i, b in enumerate(blocks) for e in erofs.unpack_dir_block(b, i * 4096)]
    assert back == entries


@given(major=st.integers(0, 0xFFF), minor=st.integers(0, 0xFFFFF))
def test_device_numbers_round_trip(major, minor):
    assert erofs.decode_dev(erofs.encode_dev(major, minor)) == (major, minor)


small = st.integers(0, 40)


@given(cs_bits=st.integers(12, 24), counts=st.tuples(small, small, small),
       offs=st.tuples(small, small, small))
def test_rafs_header_round_trip(cs_bits, counts, offs):
    hdr = section.Header(1 << cs_bits, 96 + offs[0], counts[0], 96 + offs[1], counts[1],
                         96 + offs[2], counts[2])
    end = max(o + c * r.size for o, c, r in zip(
        (hdr.blob_off, hdr.chunk_off, hdr.prefetch_off), counts,
        (section.BLOB_RECORD, section.CHUNK_RECORD, section.PREFETCH_RECORD), strict=True))
    buf = hdr.pack() + bytes(max(0, end - section.HEADER.size))
    assert section.Header.unpack(buf) == hdr


def test_rafs_header_rejects_tables_outside_and_bad_chunk_size():
    hdr = section.Header(1 << 20, 96, 5, 96, 0, 96, 0)
    with pytest.raises(FormatError, match="blob table outside"):
        section.Header.unpack(hdr.pack())
    bad = section.Header(3000, 96, 0, 96, 0, 96, 0)
    with pytest.raises(FormatError, match="chunk size"):
        section.Header.unpack(bad.pack())
    with pytest.raises(FormatError, match="RAFS header magic"):
        section.Header.unpack(bytes(200))


@given(digest=st.binary(min_size=32, max_size=32), c=u64, u=u64, s=u32, n=u32)
def test_blob_record_round_trip(digest, c, u, s, n):
    blob = Blob("sha256:" + digest.hex(), c, u, s, n)
    assert section.unpack_blob(section.pack_blob(blob), 0) == blob


@given(b=u32, flags=u32, co=u64, cs=u32, uo=u64, us=u32, sha=st.binary(min_size=32, max_size=32),
       x=u64)
def test_chunk_record_round_trip(b, flags, co, cs, uo, us, sha, x):
    chunk = Chunk(b, co, cs, uo, us, sha, x, flags)
    packed = section.pack_chunk(chunk)
    assert section.unpack_chunk(packed, 0) == chunk
    assert section.chunk_uncompressed_offset(packed, 0) == uo
