"""A layer as a verified stream of tar entries.

This module owns reading one layer: sniffing its compression (gzip, zstd or
none, from the magic bytes, cross-checked against the media type), streaming
it through Python's ``tarfile`` in stream mode, turning each member into an
``Entry`` with raw byte names and xattrs, and checking, once the layer has been
read to its end, that the compressed bytes match the descriptor digest and
size and the uncompressed bytes match the config's ``diff_id``.

Nothing is buffered beyond what ``tarfile`` and the decompressors hold; a
regular file's data is read by the consumer from ``Entry.data`` before asking
for the next entry.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import tarfile
import urllib.parse
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

import zstandard
from isal import igzip_threaded  # ISA-L inflate, 2-3x zlib's, on a thread of its own
from isal.isal_zlib import error as _IsalError

from rafs.errors import ImageError, MediaTypeError
from rafs.oci import LAYER_TYPES

from .errors import BadTarError, LayerDigestError

log = logging.getLogger(__name__)

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_READ_SIZE = 1 << 20
_TAR_BUFSIZE = 64 << 10  # tarfile copies its buffer's tail on every header read: keep it small

# Entry.kind values
FILE, DIR, SYMLINK, HARDLINK, CHAR, BLOCK, FIFO = (
    "file", "dir", "symlink", "hardlink", "char", "block", "fifo")

_KINDS = {
    tarfile.DIRTYPE: DIR,
    tarfile.SYMTYPE: SYMLINK,
    tarfile.LNKTYPE: HARDLINK,
    tarfile.CHRTYPE: CHAR,
    tarfile.BLKTYPE: BLOCK,
    tarfile.FIFOTYPE: FIFO,
}


@dataclass(slots=True)
class Entry:
    """One tar member, names and xattrs as raw bytes."""

    kind: str
    name: bytes  # as stored: may be absolute, contain "." or "..": layers.py normalises
    mode: int = 0o644  # permission bits only (0o7777)
    uid: int = 0
    gid: int = 0
    mtime: int = 0
    mtime_nsec: int = 0
    size: int = 0
    linkname: bytes = b""  # symlink target or hardlink target path
    rdev: int = 0
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    data: BinaryIO | None = None  # regular files; valid until the next entry is requested


def _b(s: str) -> bytes:
    return s.encode("utf-8", "surrogateescape")


class _Reader:
    """Reads a stream, feeding a sha256 and a byte counter; can peek at the start."""

    def __init__(self, raw: BinaryIO, what: str, on_read: Callable[[int], None] | None = None,
                 io_error: bool = False) -> None:
        self._raw = raw
        self._what = what
        self._on_read = on_read
        self._io_error = io_error  # OSError from raw reads is an I/O problem, not a bad tar
        self._pending = b""
        self.sha256 = hashlib.sha256()
        self.count = 0

    def _raw_read(self, n: int) -> bytes:
        try:
            return self._raw.read(n)
        except OSError as e:
            if self._io_error:
                raise ImageError(f"{self._what}: read failed: {e.strerror or e}") from None
            raise

    def peek(self, n: int) -> bytes:
        while len(self._pending) < n:
            more = self._raw_read(n - len(self._pending))
            if not more:
                break
            self._pending += more
        return self._pending[:n]

    def read(self, n: int = -1) -> bytes:
        if self._pending:
            data = self._pending if n < 0 else self._pending[:n]
            self._pending = self._pending[len(data):]
        else:
            data = self._raw_read(_READ_SIZE if n is None or n < 0 else n)
        if data:
            self.sha256.update(data)
            self.count += len(data)
            if self._on_read is not None:
                self._on_read(len(data))
        return data

    def readinto(self, b: bytearray | memoryview) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        """Close a decompressor this reader wraps (the stored stream is its owner's)."""
        if not isinstance(self._raw, _Reader):
            close = getattr(self._raw, "close", None)
            if close is not None:
                close()

    def drain(self) -> None:
        while self.read(_READ_SIZE):
            pass

    def digest(self) -> str:
        return "sha256:" + self.sha256.hexdigest()


class _TarInfo(tarfile.TarInfo):
    """Records why ``tarfile`` stopped, since it reports several kinds of
    damage (truncation, garbage after the first member) as a clean end."""

    @classmethod
    def fromtarfile(cls, tf: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tf)
        except tarfile.HeaderError as e:
            tf._rafs_stop = e  # type: ignore[attr-defined]
            raise


def detect_compression(media_type: str | None, head: bytes, what: str) -> str:
    """'gzip', 'zstd' or 'none' from the magic bytes; the media type must be a layer type."""
    announced = None
    if media_type is not None:
        announced = LAYER_TYPES.get(media_type)
        if announced is None:
            raise MediaTypeError(f"{what}: not a layer media type: {media_type}")
    if head.startswith(GZIP_MAGIC):
        found = "gzip"
    elif head.startswith(ZSTD_MAGIC):
        found = "zstd"
    elif head.startswith((b"BZh", b"\xfd7zXZ\x00")):
        raise BadTarError(f"{what}: bzip2/xz compressed layers are not supported")
    else:
        found = "none"
    if announced is not None and announced != found:
        # Docker archives and some registries label plain tars as gzip and back.
        log.warning("%s: media type %s announces %s but the data is %s; using %s",
                    what, media_type, announced, found, found)
    return found


def _parse_time(value: str) -> tuple[int, int]:
    """A PAX time ("1700000000.123456789") as (seconds, nanoseconds), exact."""
    neg = value.startswith("-")
    whole, _, frac = value.lstrip("+-").partition(".")
    try:
        sec = int(whole or "0")
        nsec = int((frac + "000000000")[:9]) if frac else 0
    except ValueError:
        return 0, 0
    if neg:  # before 1970: clamp, EROFS stores unsigned times
        return 0, 0
    return sec, nsec


def _xattrs(pax: dict[str, str], what: str) -> dict[bytes, bytes]:
    out: dict[bytes, bytes] = {}
    for key, value in pax.items():
        if key.startswith("SCHILY.xattr."):
            out[_b(key[len("SCHILY.xattr."):])] = _b(value)
        elif key.startswith("LIBARCHIVE.xattr."):
            try:
                name = urllib.parse.unquote_to_bytes(key[len("LIBARCHIVE.xattr."):])
                data = base64.b64decode(value + "=" * (-len(value) % 4))
            except ValueError:
                raise BadTarError(f"{what}: bad LIBARCHIVE.xattr header {key!r}") from None
            out[name] = data
    return out


_ID_MAX = 2**32 - 1  # uid, gid: 32 bits in Linux and in EROFS's extended inode
_MAJOR_MAX, _MINOR_MAX = 0xFFF, 0xFFFFF  # the kernel's 32-bit dev_t (EROFS stores it so)


def _bounded(value: int, limit: int, field: str, m: tarfile.TarInfo, what: str) -> int:
    """A numeric header field (base-256 fields can be negative or huge) within 0..limit."""
    if not 0 <= value <= limit:
        raise BadTarError(f"{what}: {m.name!r}: {field} {value} is not in 0..{limit}")
    return value


def to_entry(m: tarfile.TarInfo, what: str) -> Entry:
    """Convert a ``TarInfo`` to an ``Entry`` (without data)."""
    if m.isreg():
        kind = FILE
    else:
        kind = _KINDS.get(m.type)
        if kind is None:
            raise BadTarError(f"{what}: {m.name!r}: unsupported tar entry type {m.type!r}")
    pax = m.pax_headers
    if "mtime" in pax:
        mtime, nsec = _parse_time(pax["mtime"])
    else:
        mtime, nsec = max(int(m.mtime), 0), 0
    return Entry(
        kind=kind,
        name=_b(m.name),
        mode=m.mode & 0o7777,
        uid=_bounded(m.uid, _ID_MAX, "uid", m, what),
        gid=_bounded(m.gid, _ID_MAX, "gid", m, what),
        mtime=mtime,
        mtime_nsec=nsec,
        size=m.size if kind == FILE else 0,
        linkname=_b(m.linkname) if kind in (SYMLINK, HARDLINK) else b"",
        rdev=os.makedev(_bounded(m.devmajor, _MAJOR_MAX, "device major", m, what),
                        _bounded(m.devminor, _MINOR_MAX, "device minor", m, what))
        if kind in (CHAR, BLOCK) else 0,
        xattrs=_xattrs(pax, what) if pax else {},
    )


_STREAM_ERRORS = (tarfile.TarError, EOFError, zlib.error, _IsalError, zstandard.ZstdError,
                  OSError)


class _EntryData:
    """A member's data; stream damage found while reading it is a BadTarError."""

    def __init__(self, stream: LayerStream, f: BinaryIO, name: bytes) -> None:
        self._stream = stream
        self._f = f
        self._name = name

    def read(self, n: int = -1) -> bytes:
        try:
            return self._f.read(n)
        except _STREAM_ERRORS as e:
            raise self._stream.fail(e, self._name) from None

    def readinto(self, b: bytearray | memoryview) -> int:
        try:
            return self._f.readinto(b)  # type: ignore[attr-defined]
        except _STREAM_ERRORS as e:
            raise self._stream.fail(e, self._name) from None


class LayerStream:
    """One layer, read once from ``raw``, as ``Entry`` objects.

    ``digest``/``size`` describe the stored (possibly compressed) bytes and
    ``diff_id`` the uncompressed tar; each given one is checked when the
    stream has been read to its end (LayerDigestError). ``on_read`` is called
    with the number of stored bytes consumed, for progress reporting.
    """

    def __init__(
        self,
        raw: BinaryIO,
        *,
        what: str,
        media_type: str | None = None,
        digest: str | None = None,
        size: int | None = None,
        diff_id: str | None = None,
        on_read: Callable[[int], None] | None = None,
    ) -> None:
        self.what = what
        self.media_type = media_type
        self.digest = digest
        self.size = size
        self.diff_id = diff_id
        self._stored = _Reader(raw, what, on_read, io_error=True)
        self._plain: _Reader | None = None
        self._head = b""
        self.compression: str | None = None

    @property
    def uncompressed_size(self) -> int:
        return self._plain.count if self._plain is not None else 0

    def _open(self) -> _Reader:
        self._head = self._stored.peek(18)  # magic, and a zstd frame header
        self.compression = detect_compression(self.media_type, self._head, self.what)
        source: BinaryIO
        if self.compression == "gzip":
            source = igzip_threaded.open(self._stored, "rb")  # type: ignore[assignment]
        elif self.compression == "zstd":
            source = zstandard.ZstdDecompressor().stream_reader(
                self._stored, read_size=_READ_SIZE, read_across_frames=True, closefd=False)
        else:
            source = self._stored  # type: ignore[assignment]
        return _Reader(source, self.what)

    def entries(self) -> Iterator[Entry]:
        """Yield every entry; after the last one, verify digests and sizes."""
        try:
            self._plain = plain = self._open()
            if plain.peek(1):
                with tarfile.open(fileobj=plain, mode="r|", bufsize=_TAR_BUFSIZE,
                                  encoding="utf-8", errors="surrogateescape",
                                  tarinfo=_TarInfo) as tf:  # type: ignore[call-overload]
                    yield from self._members(tf)
            else:
                self._check_empty()  # an empty stream is an empty layer, if really complete
            plain.drain()
            self._stored.drain()
        except _STREAM_ERRORS as e:
            self._blame_digest(e)
            raise BadTarError(f"{self.what}: not a valid tar stream: {e}") from None
        finally:
            if self._plain is not None:
                self._plain.close()  # stops the decompression thread on every path
        self._verify()

    def _members(self, tf: tarfile.TarFile) -> Iterator[Entry]:
        while True:
            m = tf.next()
            if m is None:
                stop = getattr(tf, "_rafs_stop", None)
                if not isinstance(stop, tarfile.EOFHeaderError):
                    raise tarfile.ReadError(
                        f"archive ends without an end-of-archive block ({stop or 'no header'})"
                        f" at offset {tf.offset}")
                return
            tf.members.clear()  # stream mode keeps every TarInfo otherwise
            entry = to_entry(m, self.what)
            if entry.kind == FILE:
                entry.data = _EntryData(self, tf.extractfile(m), entry.name)  # type: ignore[arg-type]
            yield entry

    def _check_empty(self) -> None:
        """zstd's stream reader reports a frame cut short as a clean end: make sure a
        zstd layer that gave no bytes at all really holds an empty frame."""
        if self.compression != "zstd":
            return  # plain: nothing to cut; gzip: the decoder checks its trailer
        try:
            size = zstandard.get_frame_parameters(self._head).content_size
        except zstandard.ZstdError:
            size = -1
        if size != 0:
            raise EOFError("the zstd stream ends before its first frame does")

    def fail(self, cause: BaseException, name: bytes) -> BadTarError:
        """The error to raise when reading a member's data failed."""
        self._blame_digest(cause)
        return BadTarError(f"{self.what}: {os.fsdecode(name)!r}: cannot read data: {cause}")

    def _blame_digest(self, cause: BaseException) -> None:
        """If the stored bytes do not match their digest, that is the real error."""
        if self.digest is None:
            return
        try:
            self._stored.drain()
        except (ImageError, OSError):
            return
        if self._stored.digest() != self.digest:
            raise LayerDigestError(
                f"{self.what}: content is {self._stored.digest()}, descriptor says {self.digest}"
            ) from cause

    def _verify(self) -> None:
        if self.size is not None and self._stored.count != self.size:
            raise LayerDigestError(
                f"{self.what}: read {self._stored.count} bytes, descriptor says {self.size}")
        if self.digest is not None and self._stored.digest() != self.digest:
            raise LayerDigestError(
                f"{self.what}: content is {self._stored.digest()}, descriptor says {self.digest}")
        plain = self._plain
        assert plain is not None
        if self.diff_id is not None and plain.digest() != self.diff_id:
            raise LayerDigestError(
                f"{self.what}: uncompressed content is {plain.digest()}, "
                f"config diff_id says {self.diff_id}")
        log.debug("%s: verified (%s, %d stored bytes, %d uncompressed)", self.what,
                  self.compression, self._stored.count, plain.count)
