"""The bootstrap validator: every structural rule the readers rely on, checked before use.

Pure format code, no I/O: ``validate(buf)`` reads the bytes it is given and
either returns a ``Validated`` summary or raises ``FormatError`` naming the
offset and the rule broken, as one line. ``rafs.bootstrap.Bootstrap`` calls it
on every load (``rafs check``, ``rafs mount`` in both modes, chunk
dictionaries), so neither the daemon, nor ``rafs check``, nor the kernel's
EROFS driver in kernel mode ever sees a bootstrap it has not accepted.

It is O(size of the bootstrap): every table and every inode reachable from
the root is looked at once (directories once, hardlinked files once per name),
and nothing is allocated from a size or count in the image before that size
was checked against the bytes that hold it, so a hostile image can cost
neither unbounded memory nor unbounded time. Column checks of the chunk table
run in C (``memoryview.cast`` and ``map``); the tree walk is Python.

Rules (strict: the subset of EROFS and the RAFS section that ``rafs.builder``
writes, nothing else; a bit we do not write is refused, never interpreted):

- **header**: magic, version, chunk size (power of two, 4 KiB..16 MiB), no
  flags, reserved fields and the rest of the first KiB zero; the blob, chunk
  and prefetch tables back to back from the end of the EROFS area to the end
  of the file.
- **superblock**: magic, 4 KiB blocks, no checksum, no compat features, a
  build time (every compact inode's mtime) representable in ns,
  exactly the incompat features ``chunked_file | device_table``, no
  superblock extensions, shared xattrs, long xattr prefixes, packed inode or
  directory block size of its own; ``blocks`` covers the EROFS area, the meta
  area starts after block 0; one device per blob, the device table between
  the superblock and the meta area.
- **blobs**: device slot ``k`` carries blob ``k``'s digest as its tag and its
  address-space size in blocks, nothing else; address spaces are block
  multiples; chunk ranges lie in the chunk table, together cover it, and each
  holds only records naming that blob.
- **chunks**: flags known; 1 ≤ uncompressed size ≤ chunk size; 1 ≤ compressed
  size ≤ uncompressed size (so no allocation exceeds the chunk size); each
  record inside its blob's compressed and uncompressed spaces; uncompressed
  offsets block-aligned, ascending and non-overlapping (the table order the
  binary search and the blob files of kernel mode rely on); compressed ranges
  non-overlapping.
- **inodes** (every one reachable from the root): nid ≥ 1 and inside the
  meta area; known format and layout bits; reserved fields zero; a known file
  type; nlink ≥ 1; mtime representable in ns; inline xattrs inside the EROFS
  area, without shared xattrs or name filters, every entry inside its body
  with a known prefix. Regular files are chunk-based with the image's chunk
  format (or empty); their chunk indexes lie in the EROFS area, each a hole
  or (device, block) naming a record of that blob whose size is exactly the
  file's bytes in that chunk. Directories and symlinks are flat: inline data
  inside the inode's block, plain data blocks inside the EROFS area after
  block 0; symlinks below 4 KiB without NUL; devices, fifos and sockets have
  no data.
- **directories**: every block parses (name offsets in order and inside the
  block, names of 1..255 bytes without ``/`` or NUL, zero padding after the
  last name), names strictly sorted across the directory (the kernel and
  ``Bootstrap.lookup`` binary-search them), ``.`` names the directory and
  ``..`` its parent (the root's is the root), every dirent's file type
  matches its inode, and each directory has exactly one name, so the tree
  has no loops. ``inos`` counts the inodes reached; prefetch entries name them.

Ours and fsck.erofs's: all of the above are ours, enough on their own for
both modes. ``rafs.fsck`` runs erofs-utils' ``fsck.erofs`` as a second,
independent parser of the EROFS area where that is cheaper than duplicating
its work: it walks the image with the same interpretation of inodes, chunk
maps and device ids as the kernel's driver (in ``rafs check``, and once per
bootstrap before the kernel first mounts it in kernel mode).
"""

from __future__ import annotations

import itertools
import operator
import stat
import struct
from collections import deque
from dataclasses import dataclass
from itertools import repeat

from . import erofs, section
from .errors import FormatError
from .model import CHUNK_COMPRESSED

__all__ = ["VERSION", "Validated", "validate"]

#: bumped whenever a rule changes: bootstraps stamped by an older validator are checked again
VERSION = 2

BS = erofs.BLOCK_SIZE
SB = erofs.SUPER_OFFSET
PATH_MAX = 4096
NS_LIMIT = 1 << 63  # st_mtime_ns must fit an int64

_SUPER = struct.Struct("<IIIBBHQQIIII16s16sIHHHBBIQB23s")
_COMPACT = erofs.INODE_COMPACT_FMT
_EXTENDED = struct.Struct("<HHHHQIIIIQII16s")
_DIRENT = struct.Struct("<QHBB")
_XATTR_HEADER = struct.Struct("<IB7s")
_CHUNK_INDEX = erofs.CHUNK_INDEX
_FEATURES = erofs.FEATURE_INCOMPAT_CHUNKED_FILE | erofs.FEATURE_INCOMPAT_DEVICE_TABLE
_TYPES = {stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK, stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO,
          stat.S_IFSOCK}
_ZERO = bytes(BS)


@dataclass(frozen=True, slots=True)
class Validated:
    """What the validator saw of an accepted bootstrap."""

    inodes: int
    directories: int
    dirents: int
    chunk_refs: int
    chunks: int
    blobs: int


def validate(buf: bytes | bytearray | memoryview) -> Validated:
    """Check every rule of the module docstring; raise ``FormatError`` at the first broken."""
    view = memoryview(buf)
    if view.ndim != 1 or view.itemsize != 1:
        view = view.cast("B")
    try:
        return _Validator(view).run()
    except FormatError as e:
        # Drop the frames (and the views of ``buf`` they hold) so the caller can close
        # the mmap behind ``buf`` at once.
        raise e.with_traceback(None) from None
    finally:
        view.release()


def _bad(rule: str, offset: int) -> FormatError:
    return FormatError(rule, offset)


class _Validator:
    def __init__(self, buf: memoryview) -> None:
        self.buf = buf
        self.size = len(buf)

    # -- header, superblock, tables -----------------------------------------

    def run(self) -> Validated:
        self._header()
        self._superblock()
        self._blobs()
        self._chunk_table()
        walked = self._tree()
        self._prefetch(walked)
        return walked

    def _header(self) -> None:
        buf = self.buf
        hdr = section.Header.unpack(buf)  # magic, version, chunk size, tables inside the file
        raw = section.HEADER.unpack_from(buf, 0)
        if raw[2]:
            raise _bad(f"unknown header flags {raw[2]:#x}", 10)
        if raw[6] or raw[9] or any(buf[60:section.HEADER.size]):
            raise _bad("reserved header fields are not zero", 36)
        if self.size < SB or any(buf[section.HEADER.size:SB]):
            raise _bad("the rest of the first KiB is not zero", section.HEADER.size)
        self.hdr = hdr
        self.chunk_size = hdr.chunk_size

    def _superblock(self) -> None:
        buf, hdr = self.buf, self.hdr
        if self.size < SB + _SUPER.size:
            raise _bad("image too small for an EROFS superblock", SB)
        f = _SUPER.unpack_from(buf, SB)
        if f[0] != erofs.SUPER_MAGIC:
            raise _bad("no EROFS superblock magic", SB)
        if f[1] or f[2]:
            raise _bad(f"superblock checksum {f[1]:#x} / compat features {f[2]:#x}: rafs "
                       "writes neither", SB + 4)
        if f[3] != erofs.BLOCK_BITS:
            raise _bad(f"block size 2^{f[3]} is not 4 KiB", SB + 12)
        if f[4]:
            raise _bad(f"{f[4]} superblock extension slots", SB + 13)
        if f[14] != _FEATURES:
            raise _bad(f"incompat features {f[14]:#x}, expected {_FEATURES:#x} (chunked "
                       "files and a device table only)", SB + 80)
        if f[11] or f[15] or f[18] or f[19] or f[20] or f[21] or f[22] or any(f[23]):
            raise _bad("reserved or unsupported superblock fields are set (shared xattrs, "
                       "xattr prefixes, packed inode, directory block size)", SB + 44)
        self.root_nid, self.inos = f[5], f[6]
        self.build_time, self.build_nsec = f[7], f[8]
        blocks, meta = f[9], f[10]
        if (self.build_nsec >= 1_000_000_000
                or self.build_time * 1_000_000_000 + self.build_nsec >= NS_LIMIT):
            raise _bad(f"build time {self.build_time}.{self.build_nsec} is out of range (the "
                       "mtime of every compact inode)", SB + 24)
        if blocks * BS != hdr.blob_off:
            raise _bad(f"EROFS area of {blocks} blocks does not end where the RAFS section "
                       f"starts ({hdr.blob_off:#x})", SB + 36)
        if not 1 <= meta < blocks:
            raise _bad(f"meta area at block {meta} is outside 1..{blocks - 1}", SB + 40)
        self.meta, self.area_end = meta * BS, blocks * BS
        self.meta_blkaddr = meta
        if f[16] != hdr.blob_count:
            raise _bad(f"{f[16]} extra devices for {hdr.blob_count} blobs", SB + 86)
        devt = f[17] * erofs.DEVICE_SLOT.size
        if devt < SB + _SUPER.size or devt + f[16] * erofs.DEVICE_SLOT.size > self.meta:
            raise _bad(f"device table at {devt:#x} is not between the superblock and the "
                       "meta area", SB + 88)
        self.devt = devt
        # The RAFS section: blob, chunk and prefetch tables back to back to the end.
        want = hdr.blob_off
        for name, off, count, rec in (
            ("blob", hdr.blob_off, hdr.blob_count, section.BLOB_RECORD),
            ("chunk", hdr.chunk_off, hdr.chunk_count, section.CHUNK_RECORD),
            ("prefetch", hdr.prefetch_off, hdr.prefetch_count, section.PREFETCH_RECORD),
        ):
            if off != want:
                raise _bad(f"{name} table at {off:#x}, expected {want:#x}", 16)
            want = off + count * rec.size
        if want != self.size:
            raise _bad(f"{self.size - want} bytes after the prefetch table", want)

    def _blobs(self) -> None:
        buf, hdr = self.buf, self.hdr
        self.blobs = []
        total = 0
        for k in range(hdr.blob_count):
            rec = hdr.blob_off + k * section.BLOB_RECORD.size
            blob = section.unpack_blob(buf, rec)
            if blob.uncompressed_size % BS:
                raise _bad(f"blob {k} address space of {blob.uncompressed_size} bytes is not "
                           "a block multiple", rec + 40)
            if blob.chunk_start + blob.chunk_count > hdr.chunk_count:
                raise _bad(f"blob {k} chunk range exceeds the chunk table", rec + 48)
            slot = self.devt + k * erofs.DEVICE_SLOT.size
            tag, blocks, rest = struct.unpack_from("<64sI60s", buf, slot)
            if tag != blob.digest[7:].encode():
                raise _bad(f"device {k + 1} tag does not name blob {k}", slot)
            if blocks * BS != blob.uncompressed_size or any(rest):
                raise _bad(f"device {k + 1} is {blocks} blocks, blob {k} is "
                           f"{blob.uncompressed_size} bytes (or reserved fields set)", slot + 64)
            total += blob.chunk_count
            self.blobs.append(blob)
        if total != hdr.chunk_count:
            raise _bad(f"blobs hold {total} chunks, the table {hdr.chunk_count}", hdr.blob_off)

    def _chunk_table(self) -> None:
        hdr, cs = self.hdr, self.chunk_size
        n = hdr.chunk_count
        base, rs = hdr.chunk_off, section.CHUNK_RECORD.size
        words = self.buf[base:base + n * rs].cast("I")
        per = rs // 4

        def column(k: int) -> list[int]:
            return words[k::per].tolist()

        def at(index: int, field: int) -> int:
            return base + index * rs + field

        def first(bad: list[bool]) -> int:
            return next(i for i, b in enumerate(bad) if b)

        def wide(lo: list[int], hi: list[int]) -> list[int]:
            if not any(hi):
                return lo
            return [a | b << 32 for a, b in zip(lo, hi, strict=True)]

        owner, flags, csize, usize = column(0), column(1), column(4), column(7)
        coff, uoff = wide(column(2), column(3)), wide(column(5), column(6))
        if n:
            if max(flags) > CHUNK_COMPRESSED:
                i = first([f > CHUNK_COMPRESSED for f in flags])
                raise _bad(f"chunk {i}: unknown flags {flags[i]:#x}", at(i, 4))
            if min(usize) < 1 or max(usize) > cs:
                i = first([not 1 <= u <= cs for u in usize])
                raise _bad(f"chunk {i}: uncompressed size {usize[i]} is not in 1..{cs}",
                           at(i, 28))
            if min(csize) < 1 or not all(map(operator.le, csize, usize)):
                i = first([not 1 <= c <= u for c, u in zip(csize, usize, strict=True)])
                raise _bad(f"chunk {i}: compressed size {csize[i]} is not in 1..{usize[i]}",
                           at(i, 16))
            if any(map(operator.and_, uoff, repeat(BS - 1))):
                i = first([u % BS != 0 for u in uoff])
                raise _bad(f"chunk {i}: uncompressed offset {uoff[i]:#x} is not "
                           "block-aligned", at(i, 20))
        uend = list(map(operator.add, uoff, usize))
        cend = list(map(operator.add, coff, csize))
        self.blocks_of: list[dict[int, int]] = []
        for k, blob in enumerate(self.blobs):
            s, e = blob.chunk_start, blob.chunk_start + blob.chunk_count
            if s == e:
                self.blocks_of.append({})
                continue
            mine = owner[s:e]
            if min(mine) != k or max(mine) != k:
                i = s + first([o != k for o in mine])
                raise _bad(f"chunk {i} names blob {owner[i]} but lies in blob {k}'s range",
                           at(i, 0))
            if not all(map(operator.le, uend[s:e - 1], uoff[s + 1:e])):
                i = s + 1 + first(list(map(operator.gt, uend[s:e - 1], uoff[s + 1:e])))
                raise _bad(f"chunk {i} is out of order or overlaps chunk {i - 1} in blob {k}'s "
                           "address space", at(i, 20))
            if uend[e - 1] > blob.uncompressed_size:
                raise _bad(f"chunk {e - 1} ends at {uend[e - 1]:#x}, past blob {k}'s address "
                           f"space of {blob.uncompressed_size:#x}", at(e - 1, 20))
            if max(cend[s:e]) > blob.compressed_size:
                i = s + first([c > blob.compressed_size for c in cend[s:e]])
                raise _bad(f"chunk {i} ends at {cend[i]} in blob {k}, which is "
                           f"{blob.compressed_size} bytes", at(i, 8))
            ordered_starts, ordered_ends = coff[s:e], cend[s:e]
            order: range | list[int] = range(s, e)
            if not all(map(operator.le, ordered_starts, ordered_starts[1:])):
                order = sorted(order, key=coff.__getitem__)
                ordered_starts = [coff[i] for i in order]
                ordered_ends = [cend[i] for i in order]
            if not all(map(operator.le, ordered_ends[:-1], ordered_starts[1:])):
                j = 1 + first(list(map(operator.gt, ordered_ends[:-1], ordered_starts[1:])))
                i = order[j]
                raise _bad(f"chunk {i} overlaps chunk {order[j - 1]} in blob {k}'s compressed "
                           "bytes", at(i, 8))
            self.blocks_of.append(dict(zip(map(operator.rshift, uoff[s:e], repeat(12)),
                                           range(s, e), strict=True)))
        self.usize = usize

    def _prefetch(self, walked: Validated) -> None:
        hdr = self.hdr
        n = hdr.prefetch_count
        values = self.buf[hdr.prefetch_off:hdr.prefetch_off + 8 * n].cast("Q").tolist()
        for i, nid in enumerate(values):
            if nid not in self.seen:
                raise _bad(f"prefetch entry {i} names nid {nid}, which no directory holds",
                           hdr.prefetch_off + 8 * i)

    # -- the tree ---------------------------------------------------------------

    def _tree(self) -> Validated:
        root = self.root_nid
        self.seen: dict[int, int] = {}  # nid -> file type (dirent code) of every inode reached
        self.refs = 0
        self.dir_data: dict[int, tuple[int, int]] = {}
        if self._inode(root) != erofs.FT_DIR:
            raise _bad(f"root nid {root} is not a directory", SB + 14)
        dirs = deque([(root, root)])
        parents = {root: root}
        dirents = 0
        # The fast path below takes the commonest inode (compact, no xattrs, a regular
        # file of one chunk) with exactly the checks ``_inode`` makes of it; any other
        # inode, or any doubt, goes through ``_inode``.
        seen, buf, meta, area_end = self.seen, self.buf, self.meta, self.area_end
        cs, nblobs, blocks_of, usize = self.chunk_size, len(self.blobs), self.blocks_of, self.usize
        fast_fmt = erofs.LAYOUT_CHUNK_BASED << 1
        want = erofs.CHUNK_FORMAT_INDEXES | (cs.bit_length() - 1 - erofs.BLOCK_BITS)
        unpack_inode, unpack_index = _COMPACT.unpack_from, _CHUNK_INDEX.unpack_from
        ft_reg, ft_dir, null = erofs.FT_REG, erofs.FT_DIR, erofs.NULL_ADDR
        refs = 0
        while dirs:
            nid, parent = dirs.popleft()
            dots = 0
            for name, child, ftype, where in self._entries(nid):
                dirents += 1
                if name == b"." or name == b"..":
                    if ftype != ft_dir:
                        raise _bad(f"{name.decode()!r} of directory nid {nid} has file type "
                                   f"{ftype}", where + 10)
                    if child != (nid if name == b"." else parent):
                        raise _bad(f"{name.decode()!r} of directory nid {nid} names nid "
                                   f"{child}, not {nid if name == b'.' else parent}", where)
                    dots += 1
                    continue
                have = seen.get(child)
                if have is None:
                    off = meta + (child << 5)
                    if child > 0 and off + 40 <= area_end:
                        f = unpack_inode(buf, off)
                        if (f[0] == fast_fmt and not f[1] and f[2] & 0o170000 == 0o100000
                                and f[3] and not f[5] and not f[10] and f[6] == want
                                and 0 < f[4] <= cs):
                            advise, device, blkaddr = unpack_index(buf, off + 32)
                            if advise:
                                pass
                            elif blkaddr == null:
                                if not device:
                                    have = seen[child] = ft_reg
                            elif 0 < device <= nblobs:
                                index = blocks_of[device - 1].get(blkaddr)
                                if index is not None and usize[index] == f[4]:
                                    refs += 1
                                    have = seen[child] = ft_reg
                    if have is None:
                        have = self._inode(child, where)
                if ftype != have:
                    raise _bad(f"dirent {name!r} of nid {nid} says file type {ftype}, its "
                               f"inode {child} is type {have}", where + 10)
                if have == ft_dir:
                    if child in parents:
                        raise _bad(f"directory nid {child} has a second name {name!r} in "
                                   f"nid {nid} (a loop or a hard-linked directory)", where)
                    parents[child] = nid
                    dirs.append((child, nid))
            if dots != 2:
                raise _bad(f"directory nid {nid} lacks '.' or '..'", self.dir_data[nid][0])
        self.refs += refs
        if len(seen) != self.inos:
            raise _bad(f"superblock counts {self.inos} inodes, the tree holds "
                       f"{len(seen)}", SB + 16)
        return Validated(inodes=len(seen), directories=len(parents), dirents=dirents,
                         chunk_refs=self.refs, chunks=self.hdr.chunk_count,
                         blobs=len(self.blobs))

    def _inode(self, nid: int, where: int | None = None) -> int:
        """Check inode ``nid`` once; its dirent file type."""
        known = self.seen.get(nid)
        if known is not None:
            return known
        buf = self.buf
        off = self.meta + (nid << erofs.ISLOT_BITS)
        if nid < 1 or off + _COMPACT.size > self.area_end:
            raise _bad(f"nid {nid} is outside the meta area", SB + 14 if where is None
                       else where)
        fmt = buf[off] | buf[off + 1] << 8
        version, layout = fmt & 1, (fmt >> 1) & 7
        if fmt >> 4 or layout not in erofs.KNOWN_LAYOUTS:
            raise _bad(f"nid {nid}: unsupported inode format {fmt:#x}", off)
        if version == erofs.INODE_COMPACT:
            (_f, xic, mode, nlink, size, mdelta, i_u, _ino, _uid, _gid,
             reserved) = _COMPACT.unpack_from(buf, off)
            if mdelta or reserved:
                raise _bad(f"nid {nid}: reserved compact inode fields are set", off + 12)
            mtime, nsec, isize = self.build_time, self.build_nsec, _COMPACT.size
        else:
            if off + _EXTENDED.size > self.area_end:
                raise _bad(f"nid {nid} runs past the EROFS area", off)
            (_f, xic, mode, i_nb, size, i_u, _ino, _uid, _gid, mtime, nsec, nlink,
             reserved2) = _EXTENDED.unpack_from(buf, off)
            if i_nb or any(reserved2):
                raise _bad(f"nid {nid}: reserved extended inode fields are set", off + 6)
            if nsec >= 1_000_000_000 or mtime * 1_000_000_000 + nsec >= NS_LIMIT:
                raise _bad(f"nid {nid}: mtime {mtime}.{nsec} is out of range", off + 48)
            isize = _EXTENDED.size
        if nlink < 1:
            raise _bad(f"nid {nid}: link count 0", off + 6)
        ifmt = stat.S_IFMT(mode)
        if ifmt not in _TYPES:
            raise _bad(f"nid {nid}: unknown file type in mode {mode:o}", off + 4)
        tail = off + isize
        if xic:
            tail = self._xattrs(nid, tail, erofs.xattr_body_size(xic))
        if tail > self.area_end:
            raise _bad(f"nid {nid} runs past the EROFS area", off)
        if ifmt == stat.S_IFREG:
            self._file(nid, off, layout, size, i_u, tail)
        elif ifmt in (stat.S_IFDIR, stat.S_IFLNK):
            self._flat(nid, off, ifmt, layout, size, i_u, tail)
        elif layout != erofs.LAYOUT_FLAT_PLAIN or size or (
                i_u and ifmt in (stat.S_IFIFO, stat.S_IFSOCK)):
            raise _bad(f"nid {nid}: a device, fifo or socket with data", off)
        ftype = erofs.file_type(mode)
        self.seen[nid] = ftype
        return ftype

    def _xattrs(self, nid: int, start: int, size: int) -> int:
        end = start + size
        if end > self.area_end:
            raise _bad(f"nid {nid}: xattrs run past the EROFS area", start)
        name_filter, shared, reserved = _XATTR_HEADER.unpack_from(self.buf, start)
        if name_filter or shared or any(reserved):
            raise _bad(f"nid {nid}: shared xattrs or an xattr name filter", start)
        erofs.unpack_xattrs(self.buf, start, size)  # every entry inside, known prefixes
        return end

    def _file(self, nid: int, off: int, layout: int, size: int, i_u: int, tail: int) -> None:
        cs = self.chunk_size
        if layout != erofs.LAYOUT_CHUNK_BASED:
            if layout != erofs.LAYOUT_FLAT_PLAIN or size or i_u:
                raise _bad(f"nid {nid}: a regular file whose data is not chunk-based", off)
            return
        want = erofs.CHUNK_FORMAT_INDEXES | (cs.bit_length() - 1 - erofs.BLOCK_BITS)
        if i_u != want:
            raise _bad(f"nid {nid}: chunk format {i_u:#x}, the image's is {want:#x}", off + 16)
        count = -(-size // cs)
        start = (tail + 7) & ~7
        end = start + count * _CHUNK_INDEX.size
        if end > self.area_end:
            raise _bad(f"nid {nid}: {count} chunk indexes run past the EROFS area", start)
        blocks_of, usize, nblobs = self.blocks_of, self.usize, len(self.blobs)
        pos = start
        for k, (advise, device, blkaddr) in enumerate(
                _CHUNK_INDEX.iter_unpack(self.buf[start:end])):
            if advise:
                raise _bad(f"nid {nid}: chunk index {k} has reserved bits set", pos)
            if blkaddr == erofs.NULL_ADDR:
                if device:
                    raise _bad(f"nid {nid}: hole {k} names device {device}", pos)
            else:
                if not 1 <= device <= nblobs:
                    raise _bad(f"nid {nid}: chunk {k} names device {device} of {nblobs}", pos)
                index = blocks_of[device - 1].get(blkaddr)
                if index is None:
                    raise _bad(f"nid {nid}: no chunk at block {blkaddr} of device {device}",
                               pos)
                need = min(cs, size - k * cs)
                if usize[index] != need:
                    raise _bad(f"nid {nid}: chunk {k} (record {index}) holds {usize[index]} "
                               f"bytes, the file needs {need} there", pos)
                self.refs += 1
            pos += _CHUNK_INDEX.size

    def _flat(self, nid: int, off: int, ifmt: int, layout: int, size: int, i_u: int,
              tail: int) -> None:
        kind = "directory" if ifmt == stat.S_IFDIR else "symlink"
        if (ifmt == stat.S_IFDIR and size < 1) or (ifmt == stat.S_IFLNK and size >= PATH_MAX):
            raise _bad(f"nid {nid}: {kind} of {size} bytes", off + 8)
        if layout == erofs.LAYOUT_FLAT_INLINE:
            if i_u or tail % BS + size > BS:
                raise _bad(f"nid {nid}: inline {kind} data crosses its block", tail)
            start = tail
        elif layout == erofs.LAYOUT_FLAT_PLAIN:
            start = i_u * BS
            if size and (i_u < self.meta_blkaddr or start + size > self.area_end):
                raise _bad(f"nid {nid}: {kind} data at block {i_u} is outside the EROFS area",
                           off + 16)
            if not size and i_u:
                raise _bad(f"nid {nid}: empty {kind} names block {i_u}", off + 16)
        else:
            raise _bad(f"nid {nid}: a {kind} with chunk-based data", off)
        if ifmt == stat.S_IFLNK:
            if bytes(self.buf[start:start + size]).find(b"\0") >= 0:
                raise _bad(f"nid {nid}: symlink target holds a NUL byte", start)
        else:
            self.dir_data[nid] = (start, size)

    def _entries(self, nid: int) -> list[tuple[bytes, int, int, int]]:
        """(name, nid, file type, dirent offset) of directory ``nid``, checked.

        Each block is checked column-wise (``map`` over its dirents runs in C);
        the loop that finds the culprit only runs once a check has failed.
        """
        start, size = self.dir_data[nid]
        out: list[tuple[bytes, int, int, int]] = []
        prev = b""
        lt, le, sub = operator.lt, operator.le, operator.sub
        for block in range(start, start + size, BS):
            length = min(BS, start + size - block)
            data = bytes(self.buf[block:block + length])
            if length < _DIRENT.size:
                raise _bad(f"directory nid {nid}: block too short", block)
            nameoff0 = data[8] | data[9] << 8
            if nameoff0 % _DIRENT.size or not _DIRENT.size <= nameoff0 < length:
                raise _bad(f"directory nid {nid}: bad first name offset {nameoff0}", block)
            ents = list(_DIRENT.iter_unpack(data[:nameoff0]))
            nids, offs, ftypes, reserved = (list(c) for c in zip(*ents, strict=True))
            last = data.find(b"\0", offs[-1])  # the last name ends at a NUL or the block end
            if last < 0:
                last = length
            elif data[last:].strip(b"\0"):
                raise _bad(f"directory nid {nid}: bytes after the last name", block + last)
            ends = [*offs[1:], last]
            names = list(map(data.__getitem__, map(slice, offs, ends)))
            if not (all(map(lt, offs, ends)) and offs[0] == nameoff0 and ends[-1] <= length
                    and max(map(sub, ends, offs)) <= erofs.NAME_LEN
                    and b"/" not in data[nameoff0:last] and b"\0" not in data[nameoff0:last]):
                j = next(j for j, (a, b, n) in enumerate(zip(offs, ends, names, strict=True))
                         if not a < b <= length or b - a > erofs.NAME_LEN or b"/" in n
                         or b"\0" in n)
                raise _bad(f"directory nid {nid}: bad name {names[j]!r} at offsets "
                           f"{offs[j]}..{ends[j]}", block + j * _DIRENT.size + 8)
            if not (prev < names[0] and all(map(lt, names, names[1:]))):
                j = 0 if names[0] <= prev else 1 + next(
                    j for j, (a, b) in enumerate(itertools.pairwise(names)) if not a < b)
                raise _bad(f"directory nid {nid}: name {names[j]!r} is out of order",
                           block + j * _DIRENT.size)
            if any(reserved) or min(ftypes) < erofs.FT_REG or max(ftypes) > erofs.FT_LNK:
                j = next(j for j, (t, r) in enumerate(zip(ftypes, reserved, strict=True))
                         if r or not le(erofs.FT_REG, t) or t > erofs.FT_LNK)
                raise _bad(f"directory nid {nid}: dirent {names[j]!r} has file type "
                           f"{ftypes[j]}", block + j * _DIRENT.size + 10)
            prev = names[-1]
            out.extend(zip(names, nids, ftypes, range(block, block + nameoff0, _DIRENT.size),
                           strict=True))
        return out
