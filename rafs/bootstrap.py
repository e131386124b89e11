"""Bootstrap reader: the filesystem tree and chunk tables of a bootstrap, over mmap.

Nothing trusts a bootstrap before ``rafs.validate`` has accepted it: the
constructor runs the validator (O(size), every structural rule the readers
and the kernel rely on) unless told the bytes were validated already.
``Bootstrap.open(path, stamp=True)`` is the daemon's load: a bootstrap in the
cache that passed this validator version carries a stamp file beside it
(``.<name>.validated``: validator version, the file's identity, whether
``fsck.erofs`` passed too), so later mounts skip the walk and open in the same
time for ten files or a million. With ``fsck=True`` (kernel mode, before the
kernel's EROFS driver ever sees the file) ``rafs.fsck`` runs as well.

After that, an inode is found from its nid in O(1); a name in a directory by
binary search over the sorted directory blocks; a chunk record from a chunk
index by binary search over the blob's sorted range of the chunk table. Every
access stays bounds-checked: a corrupt bootstrap raises ``FormatError``
naming the offset, never an IndexError or a hang.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import mmap
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from . import erofs, section
from . import validate as validator
from .errors import FormatError
from .model import Blob, Chunk

log = logging.getLogger(__name__)

STAMP_SUFFIX = ".validated"
DIR_BLOCKS = 4096  # decoded directory blocks kept per bootstrap

BS = erofs.BLOCK_SIZE


@dataclass(frozen=True, slots=True)
class Inode:
    nid: int
    mode: int
    nlink: int
    size: int
    uid: int
    gid: int
    mtime: int
    mtime_nsec: int
    rdev: int
    layout: int
    i_u: int
    xattr_off: int  # absolute offset of the inline xattr body
    xattr_size: int
    tail_off: int  # absolute offset just past the xattrs

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)


class Bootstrap:
    """A read-only view of one bootstrap image."""

    def __init__(self, buf: bytes | bytearray | mmap.mmap, *, validate: bool = True,
                 _owner: mmap.mmap | None = None):
        self._mmap = _owner
        self.buf = memoryview(buf)
        self.validated: validator.Validated | None = None
        self._blocks: dict[tuple[int, int], list[tuple[bytes, int, int]]] = {}
        try:
            if validate:
                self.validated = validator.validate(self.buf)
            self._parse()
        except BaseException:
            self.buf.release()
            raise

    def _parse(self) -> None:
        self.header = section.Header.unpack(self.buf)
        self.sb = erofs.SuperBlock.unpack(self.buf)
        sb = self.sb
        if sb.blocks * BS > len(self.buf):
            raise FormatError(f"EROFS area of {sb.blocks} blocks exceeds the image", 1024 + 36)
        if sb.extra_devices != self.header.blob_count:
            raise FormatError(
                f"{sb.extra_devices} devices but {self.header.blob_count} blobs", 1024 + 86
            )
        self.meta = sb.meta_blkaddr * BS
        if not 0 < sb.meta_blkaddr < max(sb.blocks, 1):
            raise FormatError(f"meta area at block {sb.meta_blkaddr} is outside", 1024 + 40)
        self.root_nid = sb.root_nid
        self.inode_count = sb.inos
        self.blocks = sb.blocks
        self.chunk_size = self.header.chunk_size
        self.blobs: list[Blob] = [
            section.unpack_blob(self.buf, self.header.blob_off + i * section.BLOB_RECORD.size)
            for i in range(self.header.blob_count)
        ]
        for i, b in enumerate(self.blobs):
            if b.chunk_start + b.chunk_count > self.header.chunk_count:
                raise FormatError(f"blob {i} chunk range exceeds the chunk table",
                                  self.header.blob_off + i * section.BLOB_RECORD.size)
        self.prefetch: list[int] = [
            section.PREFETCH_RECORD.unpack_from(
                self.buf, self.header.prefetch_off + i * section.PREFETCH_RECORD.size)[0]
            for i in range(self.header.prefetch_count)
        ]
        self.root = self.inode(self.root_nid)
        if not self.root.is_dir:
            raise FormatError("root inode is not a directory", self.inode_offset(self.root_nid))

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, stamp: bool = False,
             fsck: bool = False) -> Bootstrap:
        """Map and validate the bootstrap at ``path``.

        ``stamp``: skip the validation when the stamp (``stamp_path_of``) says this file
        passed this validator version, and write that stamp after a pass (for
        the daemon's cache of verified bootstraps). ``fsck``: also require
        ``fsck.erofs`` to accept the file (kernel mode; stamped the same way).
        """
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            if st.st_size == 0:
                raise FormatError("empty bootstrap file", 0)
            m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        stamp_path = stamp_path_of(path)
        trusted = stamp and _stamp_covers(stamp_path, st, fsck)
        try:
            boot = cls(m, _owner=m, validate=not trusted)
        except BaseException:
            m.close()
            raise
        if trusted:
            return boot
        try:
            fscked = False
            if fsck:
                from .fsck import fsck_erofs

                fscked = fsck_erofs(path, len(boot.blobs))
            if stamp:
                _write_stamp(stamp_path, st, fscked)
        except BaseException:
            boot.close()
            raise
        return boot

    @classmethod
    def from_bytes(cls, data: bytes, *, validate: bool = True) -> Bootstrap:
        return cls(data, validate=validate)

    def close(self) -> None:
        self.buf.release()
        if self._mmap is not None:
            self._mmap.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- inodes -------------------------------------------------------------------

    def inode_offset(self, nid: int) -> int:
        return self.meta + (nid << erofs.ISLOT_BITS)

    def inode(self, nid: int) -> Inode:
        off = self.inode_offset(nid)
        if nid < 0 or off >= self.sb.blocks * BS:
            raise FormatError(f"nid {nid} is outside the EROFS area", off)
        raw = erofs.RawInode.unpack(self.buf, off, self.sb.build_time, self.sb.build_time_nsec)
        xsize = erofs.xattr_body_size(raw.xattr_icount)
        xoff = off + raw.isize
        tail = xoff + xsize
        if tail > len(self.buf):
            raise FormatError("inode xattrs run past the image", xoff)
        rdev = 0
        if stat.S_ISCHR(raw.mode) or stat.S_ISBLK(raw.mode):
            rdev = os.makedev(*erofs.decode_dev(raw.i_u))
        elif stat.S_IFMT(raw.mode) not in (stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK,
                                           stat.S_IFIFO, stat.S_IFSOCK):
            raise FormatError(f"unknown file type in mode {raw.mode:o}", off + 4)
        if raw.layout == erofs.LAYOUT_CHUNK_BASED and not stat.S_ISREG(raw.mode):
            raise FormatError("chunk-based layout on a non-regular file", off)
        return Inode(nid, raw.mode, raw.nlink, raw.size, raw.uid, raw.gid, raw.mtime,
                     raw.mtime_nsec, rdev, raw.layout, raw.i_u, xoff, xsize, tail)

    def xattrs(self, ino: Inode) -> dict[bytes, bytes]:
        if not ino.xattr_size:
            return {}
        return erofs.unpack_xattrs(self.buf, ino.xattr_off, ino.xattr_size)

    def _data(self, ino: Inode, start: int, length: int) -> memoryview:
        """Bytes [start, start+length) of a flat (plain or inline) inode's data."""
        if ino.layout == erofs.LAYOUT_FLAT_INLINE:
            if ino.size > BS or (ino.tail_off % BS) + ino.size > BS:
                raise FormatError("inline data crosses a block boundary", ino.tail_off)
            base = ino.tail_off
        elif ino.layout == erofs.LAYOUT_FLAT_PLAIN:
            base = ino.i_u * BS
        else:
            raise FormatError(f"inode {ino.nid} has no flat data", self.inode_offset(ino.nid))
        end = base + start + length
        if end > min(len(self.buf), self.sb.blocks * BS) or ino.size > len(self.buf):
            raise FormatError(f"data of nid {ino.nid} lies outside the image", base)
        return self.buf[base + start:end]

    def readlink(self, ino: Inode) -> bytes:
        if not stat.S_ISLNK(ino.mode):
            raise FormatError(f"nid {ino.nid} is not a symlink", self.inode_offset(ino.nid))
        return bytes(self._data(ino, 0, ino.size))

    # --- directories ----------------------------------------------------------------

    def _dir_block(self, ino: Inode, index: int) -> list[tuple[bytes, int, int]]:
        """The decoded entries of one directory block (the last ``DIR_BLOCKS`` are kept:
        a lookup's binary search decodes the same few blocks again and again)."""
        key = (ino.nid, index)
        entries = self._blocks.get(key)
        if entries is None:
            start = index * BS
            length = min(BS, ino.size - start)
            entries = erofs.unpack_dir_block(self._data(ino, start, length), start)
            if len(self._blocks) >= DIR_BLOCKS:  # oldest first; a racing thread may win
                with contextlib.suppress(KeyError, RuntimeError, StopIteration):
                    del self._blocks[next(iter(self._blocks))]
            self._blocks[key] = entries
        return entries

    def _dir_blocks(self, ino: Inode) -> int:
        if not ino.is_dir:
            raise FormatError(f"nid {ino.nid} is not a directory", self.inode_offset(ino.nid))
        return (ino.size + BS - 1) // BS

    def lookup(self, directory: Inode, name: bytes) -> int | None:
        """The nid of ``name`` in ``directory``, or None."""
        lo, hi = 0, self._dir_blocks(directory) - 1
        while lo <= hi:  # find the last block whose first name <= name
            mid = (lo + hi) // 2
            entries = self._dir_block(directory, mid)
            if not entries:
                raise FormatError("empty directory block", directory.nid)
            first, last = entries[0][0], entries[-1][0]
            if name < first:
                hi = mid - 1
            elif name > last:
                lo = mid + 1
            else:
                names = [e[0] for e in entries]
                i = bisect.bisect_left(names, name)
                return entries[i][1] if i < len(names) and names[i] == name else None
        return None

    def readdir(self, directory: Inode, start: int = 0) -> Iterator[tuple[bytes, int, int]]:
        """(name, nid, next_cookie) for entries past cookie ``start``; skips . and ..

        A cookie is (block << 16) | (index + 1) of the entry it follows, so resuming
        decodes one block, not every block before it.
        """
        first_block, skip = start >> 16, start & 0xFFFF
        for block in range(first_block, self._dir_blocks(directory)):
            entries = self._dir_block(directory, block)
            for i in range(skip if block == first_block else 0, len(entries)):
                name, nid, _ft = entries[i]
                if name not in (b".", b".."):
                    yield name, nid, (block << 16) | (i + 1)

    def dirents(self, directory: Inode) -> Iterator[tuple[bytes, int, int]]:
        """(name, nid, file_type) of every entry, including . and .."""
        for index in range(self._dir_blocks(directory)):
            yield from self._dir_block(directory, index)

    # --- chunks ---------------------------------------------------------------------

    def file_chunks(self, ino: Inode) -> list[int | None]:
        """Chunk table index of each chunk of a regular file (None = hole)."""
        if ino.layout != erofs.LAYOUT_CHUNK_BASED:
            return []
        bits = (ino.i_u & erofs.CHUNK_FORMAT_BLKBITS_MASK) + erofs.BLOCK_BITS
        if not ino.i_u & erofs.CHUNK_FORMAT_INDEXES or 1 << bits != self.chunk_size:
            raise FormatError(f"chunk format {ino.i_u:#x} does not match the image",
                              self.inode_offset(ino.nid))
        count = -(-ino.size // self.chunk_size)
        off = (ino.tail_off + 7) & ~7
        end = off + count * erofs.CHUNK_INDEX.size
        if end > self.sb.blocks * BS:
            raise FormatError("chunk indexes run past the EROFS area", off)
        out: list[int | None] = []
        for _advise, device, blkaddr in erofs.CHUNK_INDEX.iter_unpack(self.buf[off:end]):
            if blkaddr == erofs.NULL_ADDR:
                out.append(None)
            else:
                out.append(self._find_chunk(device, blkaddr, off))
        return out

    def _find_chunk(self, device: int, blkaddr: int, where: int) -> int:
        if not 1 <= device <= len(self.blobs):
            raise FormatError(f"chunk index names device {device}", where)
        blob = self.blobs[device - 1]
        target = blkaddr * BS
        lo, hi = blob.chunk_start, blob.chunk_start + blob.chunk_count
        base, size = self.header.chunk_off, section.CHUNK_RECORD.size
        while lo < hi:
            mid = (lo + hi) // 2
            if section.chunk_uncompressed_offset(self.buf, base + mid * size) < target:
                lo = mid + 1
            else:
                hi = mid
        if lo < blob.chunk_start + blob.chunk_count and section.chunk_uncompressed_offset(
            self.buf, base + lo * size
        ) == target:
            return lo
        raise FormatError(f"no chunk at block {blkaddr} of device {device}", where)

    def chunk(self, index: int) -> Chunk:
        if not 0 <= index < self.header.chunk_count:
            raise FormatError(f"chunk {index} is outside the chunk table", self.header.chunk_off)
        off = self.header.chunk_off + index * section.CHUNK_RECORD.size
        c = section.unpack_chunk(self.buf, off)
        if c.blob_index >= len(self.blobs) or c.uncompressed_size > self.chunk_size:
            raise FormatError(f"chunk {index} record is inconsistent", off)
        return c

    def blob_extents(self, blob_index: int) -> tuple[list[int], list[int]]:
        """(uncompressed offsets, uncompressed sizes) of a blob's chunks in table order,
        which is ascending offset: the layout of the blob's address space."""
        if not 0 <= blob_index < len(self.blobs):
            raise FormatError(f"no blob {blob_index}", self.header.blob_off)
        blob = self.blobs[blob_index]
        start = self.header.chunk_off + blob.chunk_start * section.CHUNK_RECORD.size
        end = start + blob.chunk_count * section.CHUNK_RECORD.size
        if end > len(self.buf):
            raise FormatError(f"chunk table of blob {blob_index} runs past the image", start)
        offsets: list[int] = []
        sizes: list[int] = []
        limit = blob.uncompressed_size
        for rec in section.CHUNK_RECORD.iter_unpack(self.buf[start:end]):
            uoff, usize = rec[4], rec[5]
            if (uoff % BS or usize > self.chunk_size or uoff + usize > limit
                    or (offsets and uoff < offsets[-1] + sizes[-1])):
                raise FormatError(f"chunk at {uoff} of blob {blob_index} is misplaced", start)
            offsets.append(uoff)
            sizes.append(usize)
        return offsets, sizes

    def chunks(self) -> Iterator[Chunk]:
        for i in range(self.header.chunk_count):
            yield self.chunk(i)

    # --- whole-tree helpers ------------------------------------------------------------

    def walk(self) -> Iterator[tuple[bytes, Inode]]:
        """(path, inode) of every entry, depth first; hardlinks appear once per name."""
        stack: list[tuple[bytes, Inode]] = [(b"/", self.root)]
        seen_dirs = {self.root.nid}
        while stack:
            path, ino = stack.pop()
            yield path, ino
            if ino.is_dir:
                children = []
                for name, nid, _next in self.readdir(ino):
                    child = self.inode(nid)
                    if child.is_dir:
                        if nid in seen_dirs:
                            raise FormatError(f"directory loop at {path!r}", self.inode_offset(nid))
                        seen_dirs.add(nid)
                    children.append((path.rstrip(b"/") + b"/" + name, child))
                stack.extend(reversed(children))


# --- validation stamps ---------------------------------------------------------------


def stamp_path_of(path: str | os.PathLike[str]) -> Path:
    """Where the validation stamp of the bootstrap at ``path`` lives: ``.<name>.validated``
    beside it (a dot file, so listings of cached bootstraps pass it over)."""
    p = Path(path)
    return p.with_name(f".{p.name}{STAMP_SUFFIX}")


def _stamp_text(st: os.stat_result, fsck: bool) -> str:
    """What a stamp holds: validator version, the file's identity, and whether fsck.erofs ran.

    The file's identity (device, inode, size, mtime, ctime) changes with any
    rewrite or replacement of it, so a stamp never vouches for other bytes.
    """
    return (f"rafs-validate {validator.VERSION} {st.st_dev} {st.st_ino} {st.st_size} "
            f"{st.st_mtime_ns} {st.st_ctime_ns} {'fsck.erofs' if fsck else '-'}\n")


def _stamp_covers(path: Path, st: os.stat_result, fsck: bool) -> bool:
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError):
        return False
    return text == _stamp_text(st, True) or (not fsck and text == _stamp_text(st, False))


def _write_stamp(path: Path, st: os.stat_result, fsck: bool) -> None:
    """Best effort: without a stamp the next open validates again."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(_stamp_text(st, fsck))
        os.replace(tmp, path)
    except OSError as e:
        log.info("cannot record the validation of %s: %s", path, e.strerror)
        with contextlib.suppress(OSError):
            tmp.unlink()
