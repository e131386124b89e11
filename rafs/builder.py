"""Bootstrap writer: lay out an image model as an EROFS image plus the RAFS section.

Pure format code, no I/O: ``build_bootstrap`` returns bytes.

Layout (4 KiB blocks):

    block 0            RAFS header [0, 1024), superblock at 1024, device table after it
    meta_blkaddr ...   inodes in breadth-first order, root first (nid 1); each inode is
                       followed by its inline xattrs, then its chunk indexes (regular
                       files) or its inline data (small directories and symlinks)
    after the inodes   data blocks of directories and symlinks too large to inline
    blocks * 4096      RAFS section (blob, chunk and prefetch tables)

Regular files are chunk-based: chunk ``i`` of a file is an index (device, block)
where device ``k`` is blob ``k-1`` and the block is the chunk's uncompressed
offset in that blob's address space. All-zero chunks are holes (NULL_ADDR).
"""

from __future__ import annotations

import logging
import os
import stat
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass

from . import erofs, section
from .model import Blob, Chunk, Node

log = logging.getLogger(__name__)

BS = erofs.BLOCK_SIZE


@dataclass(slots=True)
class _Placed:
    """Layout decisions for one node."""

    node: Node
    parent: Node
    nlink: int = 0
    version: int = erofs.INODE_EXTENDED
    layout: int = erofs.LAYOUT_FLAT_PLAIN
    xattrs: bytes = b""
    names: list[bytes] | None = None  # sorted dirent names, with . and ..
    size: int = 0
    pos: int = 0  # byte offset in the meta area
    data_block: int = 0  # first data block (plain layout, size > 0)


def _align(value: int, unit: int) -> int:
    return (value + unit - 1) // unit * unit


def _collect(root: Node) -> list[_Placed]:
    """Every distinct node, breadth first from the root, with link counts."""
    placed = [_Placed(root, root)]
    seen = {id(root): placed[0]}
    queue: deque[Node] = deque([root])
    while queue:
        directory = queue.popleft()
        assert directory.children is not None
        for name in sorted(directory.children):
            if not name or b"/" in name or name in (b".", b"..") or len(name) > erofs.NAME_LEN:
                raise ValueError(f"invalid file name {name!r}")
            child = directory.children[name]
            entry = seen.get(id(child))
            if entry is None:
                entry = seen[id(child)] = _Placed(child, directory)
                placed.append(entry)
                if child.is_dir:
                    queue.append(child)
            elif child.is_dir:
                raise ValueError(f"directory {name!r} is linked twice")
            entry.nlink += 1
    for p in placed:
        if p.node.is_dir:
            assert p.node.children is not None
            p.nlink = 2 + sum(1 for c in p.node.children.values() if c.is_dir)
    return placed


def _pick_build_time(nodes: Iterable[Node]) -> tuple[int, int]:
    """The most common (mtime, nsec): those inodes can be compact."""
    counts = Counter((n.mtime, n.mtime_nsec) for n in nodes)
    best = max(counts.values())
    return min(k for k, v in counts.items() if v == best)


def _sort_chunks(
    chunks: list[Chunk], blobs: list[Blob]
) -> tuple[list[Chunk], dict[int, int], list[Blob]]:
    order = sorted(range(len(chunks)),
                   key=lambda i: (chunks[i].blob_index, chunks[i].uncompressed_offset))
    remap = {old: new for new, old in enumerate(order)}
    table = [chunks[i] for i in order]
    out_blobs = [Blob(b.digest, b.compressed_size, b.uncompressed_size) for b in blobs]
    for i, c in enumerate(table):
        if not 0 <= c.blob_index < len(blobs):
            raise ValueError(f"chunk {i} names blob {c.blob_index} of {len(blobs)}")
        if c.uncompressed_offset % BS:
            raise ValueError(f"chunk {i} is not block-aligned")
        if c.uncompressed_offset + c.uncompressed_size > blobs[c.blob_index].uncompressed_size:
            raise ValueError(f"chunk {i} lies outside blob {c.blob_index}")
        prev = table[i - 1] if i else None
        if prev is not None and prev.blob_index == c.blob_index and (
            prev.uncompressed_offset + prev.uncompressed_size > c.uncompressed_offset
        ):
            raise ValueError(f"chunks overlap in blob {c.blob_index}")
        blob = out_blobs[c.blob_index]
        if blob.chunk_count == 0:
            blob.chunk_start = i
        blob.chunk_count += 1
    for b in out_blobs:
        if b.chunk_count == 0:
            b.chunk_start = len(table)
    return table, remap, out_blobs


def _resolve(root: Node, path: bytes) -> Node | None:
    node = root
    for part in path.strip(b"/").split(b"/"):
        if not part:
            continue
        if node.children is None or part not in node.children:
            return None
        node = node.children[part]
    return node


@dataclass(slots=True)
class _Layout:
    """Where everything goes: the nodes in nid order, the meta area and the data blocks."""

    placed: list[_Placed]
    index_of: dict[int, int]  # id(node) -> index in placed
    build_time: tuple[int, int]
    devt_off: int = 0  # byte offset of the device table
    meta_blkaddr: int = 0
    blocks: int = 0  # EROFS blocks in all (the RAFS section follows them)

    def nid(self, node: Node) -> int:
        return self.placed[self.index_of[id(node)]].pos >> erofs.ISLOT_BITS


def build_bootstrap(
    root: Node,
    blobs: list[Blob],
    chunks: list[Chunk],
    chunk_size: int,
    prefetch: Iterable[bytes] = (),
) -> bytes:
    """Serialise the image model into a bootstrap (EROFS image + RAFS section)."""
    _check_input(root, chunk_size)
    table, remap, blobs = _sort_chunks(chunks, blobs)
    placed = _collect(root)
    layout = _Layout(placed, {id(p.node): i for i, p in enumerate(placed)},
                     _pick_build_time(p.node for p in placed))
    for p in placed:
        _size_inode(p, chunk_size, layout.build_time)
    _place_meta(layout, len(blobs))
    _place_data(layout)
    image = bytearray(layout.blocks * BS)
    for i, p in enumerate(placed):
        _write_inode(image, layout, i, p, table, remap, chunk_size)
    _write_superblock(image, layout, blobs)
    tables, header = _rafs_section(len(image), blobs, table,
                                   _prefetch_nids(root, layout, prefetch), chunk_size)
    image[0:section.HEADER.size] = header.pack()
    return bytes(image + tables)


def _check_input(root: Node, chunk_size: int) -> None:
    if chunk_size & (chunk_size - 1) or not section.MIN_CHUNK_SIZE <= chunk_size <= (
        section.MAX_CHUNK_SIZE
    ):
        raise ValueError(f"chunk size {chunk_size} is not a power of two in 4 KiB..16 MiB")
    if not root.is_dir:
        raise ValueError("the root is not a directory")


def _size_inode(p: _Placed, chunk_size: int, build_time: tuple[int, int]) -> None:
    """Xattrs, size, layout and inode version of one node (names only; nids come later)."""
    n = p.node
    xattrs = {}
    for name, value in n.xattrs.items():
        if erofs.split_xattr_name(name) is None or len(value) > 0xFFFF:
            log.warning("dropping xattr %r: EROFS cannot store it", name)
        else:
            xattrs[name] = value
    p.xattrs = erofs.pack_xattrs(xattrs)
    if n.is_dir:
        assert n.children is not None
        p.names = sorted([b".", b"..", *n.children])
        p.size = erofs.dir_size(p.names)
    elif stat.S_ISLNK(n.mode):
        p.size = len(n.target)
    elif n.is_reg:
        p.size = n.size
        expected = -(-n.size // chunk_size)
        if len(n.chunks) != expected:
            raise ValueError(f"file of {n.size} bytes has {len(n.chunks)} chunks")
        if n.size:
            p.layout = erofs.LAYOUT_CHUNK_BASED
    compact = (
        (n.mtime, n.mtime_nsec) == build_time
        and n.uid < 0x10000 and n.gid < 0x10000 and p.nlink < 0x10000 and p.size < 2**32
    )
    p.version = erofs.INODE_COMPACT if compact else erofs.INODE_EXTENDED


def _place_meta(layout: _Layout, devices: int) -> None:
    """The device table after the superblock, then every inode in the meta area.

    Slot 0 stays unused: the kernel reports nid as st_ino and readdir hides
    entries whose d_ino is 0, so the root is nid 1.
    """
    layout.devt_off = erofs.SUPER_OFFSET + 128
    layout.meta_blkaddr = _align(layout.devt_off + erofs.DEVICE_SLOT.size * devices, BS) // BS
    pos = 1 << erofs.ISLOT_BITS
    for p in layout.placed:
        isize = (erofs.INODE_EXTENDED_FMT if p.version else erofs.INODE_COMPACT_FMT).size
        head = isize + len(p.xattrs)
        inline = (p.node.is_dir or stat.S_ISLNK(p.node.mode)) and head + p.size <= BS
        if inline and p.size:
            p.layout = erofs.LAYOUT_FLAT_INLINE
            if pos % BS + head + p.size > BS:
                pos = _align(pos, BS)
        p.pos = pos
        pos += head
        if p.layout == erofs.LAYOUT_CHUNK_BASED:
            pos = _align(pos, erofs.CHUNK_INDEX.size) + erofs.CHUNK_INDEX.size * len(p.node.chunks)
        elif p.layout == erofs.LAYOUT_FLAT_INLINE:
            pos += p.size
        pos = _align(pos, 1 << erofs.ISLOT_BITS)
    layout.blocks = layout.meta_blkaddr + _align(pos, BS) // BS


def _place_data(layout: _Layout) -> None:
    """Data blocks, after the meta area, for directories and symlinks not inline."""
    for p in layout.placed:
        if p.layout == erofs.LAYOUT_FLAT_PLAIN and p.size and not p.node.is_reg:
            p.data_block = layout.blocks
            layout.blocks += _align(p.size, BS) // BS


def _contents(layout: _Layout, p: _Placed) -> bytes:
    """A directory's blocks or a symlink's target; nothing for other nodes."""
    n = p.node
    if stat.S_ISLNK(n.mode):
        return n.target
    if not n.is_dir:
        return b""
    assert n.children is not None and p.names is not None
    entries = []
    for name in p.names:
        target = n if name == b"." else p.parent if name == b".." else n.children[name]
        entries.append((name, layout.nid(target), erofs.file_type(target.mode)))
    return b"".join(erofs.pack_dir_blocks(entries))


def _write_inode(image: bytearray, layout: _Layout, i: int, p: _Placed, table: list[Chunk],
                 remap: dict[int, int], chunk_size: int) -> None:
    """Inode ``i`` with its xattrs, then its chunk indexes, inline data or data blocks."""
    n = p.node
    data = _contents(layout, p)
    if p.layout == erofs.LAYOUT_CHUNK_BASED:
        i_u = erofs.chunk_info(chunk_size.bit_length() - 1 - erofs.BLOCK_BITS)
    elif stat.S_ISCHR(n.mode) or stat.S_ISBLK(n.mode):
        i_u = erofs.encode_dev(os.major(n.rdev), os.minor(n.rdev))
    elif p.layout == erofs.LAYOUT_FLAT_PLAIN and data:
        i_u = p.data_block
    else:
        i_u = 0
    raw = erofs.RawInode(
        version=p.version, layout=p.layout, xattr_icount=erofs.xattr_icount(len(p.xattrs)),
        mode=n.mode, nlink=p.nlink, size=p.size, i_u=i_u, ino=i + 1, uid=n.uid,
        gid=n.gid, mtime=n.mtime, mtime_nsec=n.mtime_nsec,
    )
    off = layout.meta_blkaddr * BS + p.pos
    body = raw.pack() + p.xattrs
    image[off:off + len(body)] = body
    off += len(body)
    if p.layout == erofs.LAYOUT_CHUNK_BASED:
        off = _align(off, erofs.CHUNK_INDEX.size)
        for ref in n.chunks:
            if ref is None:
                entry = erofs.CHUNK_INDEX.pack(0, 0, erofs.NULL_ADDR)
            else:
                c = table[remap[ref]]
                entry = erofs.CHUNK_INDEX.pack(0, c.blob_index + 1, c.uncompressed_offset // BS)
            image[off:off + erofs.CHUNK_INDEX.size] = entry
            off += erofs.CHUNK_INDEX.size
    elif p.layout == erofs.LAYOUT_FLAT_INLINE:
        image[off:off + len(data)] = data
    elif data:
        start = p.data_block * BS
        image[start:start + len(data)] = data


def _write_superblock(image: bytearray, layout: _Layout, blobs: list[Blob]) -> None:
    """The superblock, and the device table: one device per blob."""
    sb = erofs.SuperBlock(
        root_nid=layout.placed[0].pos >> erofs.ISLOT_BITS, inos=len(layout.placed),
        build_time=layout.build_time[0], build_time_nsec=layout.build_time[1],
        blocks=layout.blocks, meta_blkaddr=layout.meta_blkaddr,
        feature_incompat=erofs.FEATURE_INCOMPAT_CHUNKED_FILE | erofs.FEATURE_INCOMPAT_DEVICE_TABLE,
        extra_devices=len(blobs), devt_slotoff=layout.devt_off // erofs.DEVICE_SLOT.size,
        volume_name=b"rafs",
    )
    image[erofs.SUPER_OFFSET:erofs.SUPER_OFFSET + 128] = sb.pack()
    for k, b in enumerate(blobs):
        tag = b.digest.partition(":")[2].encode()
        slot = erofs.pack_device_slot(tag, b.uncompressed_size // BS)
        start = layout.devt_off + k * erofs.DEVICE_SLOT.size
        image[start:start + len(slot)] = slot


def _prefetch_nids(root: Node, layout: _Layout, prefetch: Iterable[bytes]) -> list[int]:
    """The nids of the prefetch list's paths that exist, in order, each once."""
    nids = []
    for path in prefetch:
        node = _resolve(root, path)
        if node is None:
            log.warning("prefetch path %s is not in the image", os.fsdecode(path))
        elif id(node) in layout.index_of:
            nids.append(layout.nid(node))
    return list(dict.fromkeys(nids))


def _rafs_section(blob_off: int, blobs: list[Blob], table: list[Chunk],
                  prefetch_nids: list[int], chunk_size: int) -> tuple[bytes, section.Header]:
    """The blob, chunk and prefetch tables starting at ``blob_off``, and the header."""
    tables = bytearray()
    for b in blobs:
        if b.uncompressed_size % BS:
            raise ValueError(f"blob {b.digest} address space is not block-aligned")
        tables += section.pack_blob(b)
    chunk_off = blob_off + len(tables)
    for c in table:
        tables += section.pack_chunk(c)
    prefetch_off = blob_off + len(tables)
    for value in prefetch_nids:
        tables += section.PREFETCH_RECORD.pack(value)
    header = section.Header(
        chunk_size=chunk_size, blob_off=blob_off, blob_count=len(blobs), chunk_off=chunk_off,
        chunk_count=len(table), prefetch_off=prefetch_off, prefetch_count=len(prefetch_nids),
    )
    return bytes(tables), header
