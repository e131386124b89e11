"""Mutate images the way a malicious or buggy builder would, then re-seal their digests.

Owns: the mutators (``mutate_bootstrap``, ``mutate_manifest``, ``mutate_config``,
``mutate_tar``), the map of a bootstrap's integer fields they aim at
(``bootstrap_fields``), and the resealing that makes the trust chain hold
again for the mutated bytes (``Layout``: a per-case OCI layout sharing the
seed's blobs by hardlink, with a new bootstrap layer + uncompressed-digest
annotation, manifest and index entry; or a new source layer, ``diff_ids``,
config, manifest and index entry for converter input).

Every mutator takes a ``random.Random`` and returns ``(bytes, description)``;
the description is one line a human can replay from (``seed`` + ``case``).
Bootstrap mutations are bit flips, integer fields set to edge values (0, 1,
-1, max, huge, off by one, another field's value), truncation, extension,
random bytes, splices of one structure over another and swaps of two fields
of a kind. The field map comes from parsing the seed bootstrap with
``rafs.bootstrap`` (this helper knows the format, like ``images``).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import random
import shutil
import struct
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import zstandard

from rafs import erofs, section
from rafs.bootstrap import Bootstrap
from rafs.oci import (
    ANNOTATION_RAFS_BOOTSTRAP,
    ANNOTATION_RAFS_BOOTSTRAP_DIGEST,
    MEDIA_TYPE_RAFS_BOOTSTRAP,
)

__all__ = [
    "Field",
    "Layout",
    "bootstrap_fields",
    "mutate_bootstrap",
    "mutate_config",
    "mutate_manifest",
    "mutate_tar",
]

REF_NAME = "org.opencontainers.image.ref.name"
_FMT = {1: "<B", 2: "<H", 4: "<I", 8: "<Q"}


@dataclass(frozen=True, slots=True)
class Field:
    """An integer field of a bootstrap: where, how wide, and what it is."""

    kind: str  # e.g. "inode.size", "dirent.nid", "chunk.compressed_offset"
    offset: int
    width: int
    label: str  # e.g. "nid 37"


def bootstrap_fields(data: bytes) -> list[Field]:
    """Every integer field the readers interpret, found by parsing a valid bootstrap."""
    boot = Bootstrap.from_bytes(data)
    out: list[Field] = []

    def add(kind: str, offset: int, width: int, label: str = "") -> None:
        out.append(Field(kind, offset, width, label))

    for name, off, width in (("version", 8, 2), ("flags", 10, 2), ("chunk_size", 12, 4),
                             ("blob_off", 16, 8), ("blob_count", 24, 4), ("chunk_off", 32, 8),
                             ("chunk_count", 40, 4), ("prefetch_off", 48, 8),
                             ("prefetch_count", 56, 4)):
        add("header." + name, off, width)
    sb = erofs.SUPER_OFFSET
    for name, off, width in (("checksum", 4, 4), ("feature_compat", 8, 4), ("blkszbits", 12, 1),
                             ("extslots", 13, 1), ("root_nid", 14, 2), ("inos", 16, 8),
                             ("build_time", 24, 8), ("build_time_nsec", 32, 4),
                             ("blocks", 36, 4), ("meta_blkaddr", 40, 4), ("xattr_blkaddr", 44, 4),
                             ("feature_incompat", 80, 4), ("u1", 84, 2),
                             ("extra_devices", 86, 2), ("devt_slotoff", 88, 2),
                             ("dirblkbits", 90, 1), ("xattr_prefix_count", 91, 1),
                             ("packed_nid", 96, 8)):
        add("super." + name, sb + off, width)
    devt = boot.sb.devt_slotoff * erofs.DEVICE_SLOT.size
    hdr = boot.header
    for k in range(len(boot.blobs)):
        add("device.blocks", devt + k * 128 + 64, 4, f"device {k + 1}")
        add("device.mapped_blkaddr", devt + k * 128 + 68, 4, f"device {k + 1}")
        rec = hdr.blob_off + k * section.BLOB_RECORD.size
        for name, off, width in (("compressed_size", 32, 8), ("uncompressed_size", 40, 8),
                                 ("chunk_start", 48, 4), ("chunk_count", 52, 4)):
            add("blob." + name, rec + off, width, f"blob {k}")
    for i in range(hdr.chunk_count):
        rec = hdr.chunk_off + i * section.CHUNK_RECORD.size
        for name, off, width in (("blob", 0, 4), ("flags", 4, 4), ("compressed_offset", 8, 8),
                                 ("compressed_size", 16, 4), ("uncompressed_offset", 20, 8),
                                 ("uncompressed_size", 28, 4), ("sha256", 32, 8),
                                 ("xxh3", 64, 8)):
            add("chunk." + name, rec + off, width, f"chunk {i}")
    for i in range(hdr.prefetch_count):
        add("prefetch.nid", hdr.prefetch_off + 8 * i, 8, f"prefetch {i}")
    seen: set[int] = set()
    for _path, ino in boot.walk():
        if ino.nid in seen:
            continue
        seen.add(ino.nid)
        off = boot.inode_offset(ino.nid)
        label = f"nid {ino.nid}"
        extended = ino.tail_off - ino.xattr_size - off == erofs.INODE_EXTENDED_FMT.size
        add("inode.format", off, 2, label)
        add("inode.xattr_icount", off + 2, 2, label)
        add("inode.mode", off + 4, 2, label)
        if extended:
            for name, o, w in (("i_nb", 6, 2), ("size", 8, 8), ("i_u", 16, 4), ("uid", 24, 4),
                               ("mtime", 32, 8), ("mtime_nsec", 40, 4), ("nlink", 44, 4),
                               ("reserved2", 48, 8)):
                add("inode." + name, off + o, w, label)
        else:
            for name, o, w in (("nlink", 6, 2), ("size", 8, 4), ("mtime_delta", 12, 4),
                               ("i_u", 16, 4), ("uid", 24, 2), ("reserved", 28, 4)):
                add("inode." + name, off + o, w, label)
        if ino.xattr_size:
            add("xattr.name_filter", ino.xattr_off, 4, label)
            add("xattr.shared_count", ino.xattr_off + 4, 1, label)
            pos = ino.xattr_off + erofs.XATTR_IBODY_HEADER.size
            end = ino.xattr_off + ino.xattr_size
            while pos + 4 <= end:
                name_len, _index, value_size = erofs.XATTR_ENTRY.unpack_from(boot.buf, pos)
                add("xattr.name_len", pos, 1, label)
                add("xattr.name_index", pos + 1, 1, label)
                add("xattr.value_size", pos + 2, 2, label)
                stop = pos + 4 + name_len + value_size
                pos = stop + (-stop % 4)
        if ino.layout == erofs.LAYOUT_CHUNK_BASED:
            start = (ino.tail_off + 7) & ~7
            for k in range(-(-ino.size // boot.chunk_size)):
                add("chunkindex.advise", start + 8 * k, 2, f"{label} chunk {k}")
                add("chunkindex.device", start + 8 * k + 2, 2, f"{label} chunk {k}")
                add("chunkindex.blkaddr", start + 8 * k + 4, 4, f"{label} chunk {k}")
        if ino.is_dir:
            inline = ino.layout == erofs.LAYOUT_FLAT_INLINE
            base = ino.tail_off if inline else ino.i_u * erofs.BLOCK_SIZE
            for block in range(0, ino.size, erofs.BLOCK_SIZE):
                at = base + block
                count = struct.unpack_from("<H", boot.buf, at + 8)[0] // erofs.DIRENT.size
                for j in range(count):
                    d = at + j * erofs.DIRENT.size
                    add("dirent.nid", d, 8, f"{label} dirent {j}")
                    add("dirent.nameoff", d + 8, 2, f"{label} dirent {j}")
                    add("dirent.file_type", d + 10, 1, f"{label} dirent {j}")
    boot.close()
    return out


# -- bootstrap mutations ----------------------------------------------------------


def _edge_values(rng: random.Random, value: int, width: int, others: list[int]) -> int:
    top = (1 << (8 * width)) - 1
    choices = [0, 1, 2, top, top - 1, 1 << (8 * width - 1), (1 << (8 * width - 1)) - 1,
               (value + 1) & top, (value - 1) & top, value ^ 1, (value * 2) & top, value // 2,
               (value + 4096) & top, (value - 4096) & top, 4095, 4096, 0xFFFF & top,
               rng.randrange(top + 1)]
    if others:
        choices += [rng.choice(others)] * 4
    return rng.choice(choices) & top


def _set(buf: bytearray, f: Field, value: int) -> None:
    struct.pack_into(_FMT[f.width], buf, f.offset, value)


def _get(buf: bytes | bytearray, f: Field) -> int:
    return struct.unpack_from(_FMT[f.width], buf, f.offset)[0]


def _field_edge(buf: bytearray, rng: random.Random, fields: list[Field]) -> str:
    f = rng.choice(fields)
    old = _get(buf, f)
    same = [_get(buf, g) for g in fields if g.kind == f.kind and g.offset != f.offset]
    new = _edge_values(rng, old, f.width, same)
    _set(buf, f, new)
    return f"{f.kind} ({f.label or 'at ' + hex(f.offset)}) {old:#x} -> {new:#x}"


def _swap_fields(buf: bytearray, rng: random.Random, fields: list[Field]) -> str:
    f = rng.choice(fields)
    same = [g for g in fields if g.kind == f.kind and g.offset != f.offset]
    if not same:
        return _field_edge(buf, rng, fields)
    g = rng.choice(same)
    a, b = _get(buf, f), _get(buf, g)
    _set(buf, f, b)
    _set(buf, g, a)
    return f"swap {f.kind} of {f.label} and {g.label}"


def _bitflip(buf: bytearray, rng: random.Random, _fields: list[Field]) -> str:
    flips = []
    for _ in range(rng.randint(1, 8)):
        pos = rng.randrange(len(buf))
        bit = rng.randrange(8)
        buf[pos] ^= 1 << bit
        flips.append(f"{pos:#x}.{bit}")
    return "flip bits " + ",".join(flips)


def _random_bytes(buf: bytearray, rng: random.Random, _fields: list[Field]) -> str:
    n = rng.choice([1, 2, 4, 8, 16, 64, 256])
    pos = rng.randrange(len(buf))
    buf[pos:pos + n] = rng.randbytes(min(n, len(buf) - pos))
    return f"random {n} bytes at {pos:#x}"


def _splice(buf: bytearray, rng: random.Random, fields: list[Field]) -> str:
    """Copy one structure over another of the same kind (an inode, a dirent, a record)."""
    f = rng.choice(fields)
    same = [g for g in fields if g.kind == f.kind and g.offset != f.offset]
    n = rng.choice([8, 12, 32, 64, 72, 128])
    if not same:
        src, dst = rng.randrange(len(buf)), rng.randrange(len(buf))
    else:
        src, dst = f.offset, rng.choice(same).offset
    piece = bytes(buf[src:src + n])
    buf[dst:dst + len(piece)] = piece
    return f"splice {len(piece)} bytes {src:#x} -> {dst:#x} ({f.kind})"


_MUTATORS: list[tuple[float, Callable[[bytearray, random.Random, list[Field]], str]]] = [
    (35, _field_edge), (15, _bitflip), (10, _random_bytes), (12, _splice), (10, _swap_fields),
]


def mutate_bootstrap(data: bytes, rng: random.Random, fields: list[Field]) -> tuple[bytes, str]:
    """One mutated copy of the bootstrap ``data``, and what was done to it."""
    roll = rng.random() * 100
    if roll < 8:  # truncation, biased to structure boundaries
        cut = rng.choice([rng.randrange(len(data)), len(data) - 1, len(data) - 8,
                          len(data) - 72, erofs.SUPER_OFFSET + 64, 4096,
                          rng.choice(fields).offset])
        cut = max(0, min(len(data) - 1, cut))
        return data[:cut], f"truncate to {cut} of {len(data)} bytes"
    if roll < 13:
        extra = rng.choice([bytes(rng.choice([1, 8, 72, 4096])),
                            rng.randbytes(rng.choice([1, 7, 100, 5000]))])
        return data + extra, f"extend by {len(extra)} bytes"
    buf = bytearray(data)
    steps = 1 if rng.random() < 0.85 else rng.randint(2, 4)
    weights = [w for w, _ in _MUTATORS]
    done = [rng.choices(_MUTATORS, weights)[0][1](buf, rng, fields) for _ in range(steps)]
    return bytes(buf), "; ".join(done)


# -- manifest and config mutations --------------------------------------------------


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _json_damage(raw: bytes, rng: random.Random) -> tuple[bytes, str]:
    kind = rng.randrange(6)
    if kind == 0:
        cut = rng.randrange(len(raw))
        return raw[:cut], f"truncate JSON to {cut} bytes"
    if kind == 1:
        pos = rng.randrange(len(raw))
        return raw[:pos] + bytes([raw[pos] ^ (1 << rng.randrange(8))]) + raw[pos + 1:], \
            f"flip a bit of JSON byte {pos}"
    if kind == 2:
        depth = rng.choice([100, 5000, 100_000])
        return b"[" * depth + b"]" * depth, f"JSON nested {depth} deep"
    if kind == 3:
        return raw.replace(b"{", b'{"schemaVersion": 2, ', 1), "duplicate key"
    if kind == 4:
        return b"\xff\xfe" + raw, "not UTF-8"
    return json.dumps([1e400, -0.0, 10 ** 400]).encode(), "JSON with huge numbers"


def _tweak(value: object, rng: random.Random, digests: list[str]) -> object:
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return rng.choice([0, -1, 1, value + 1, value - 1, 2 ** 63, 2 ** 64, 10 ** 30, "12"])
    if isinstance(value, str):
        return rng.choice(["", "x" * 5000, value + "x", value[:-1], *digests,
                           "sha256:" + "0" * 64, "sha512:" + "a" * 128, "../../etc/passwd",
                           "application/vnd.oci.image.layer.v1.tar+gzip", "\udcff" * 3])
    if isinstance(value, list):
        if value and rng.random() < 0.5:
            i = rng.randrange(len(value))
            return rng.choice([value[:i] + value[i + 1:], [*value, value[i]], value[::-1],
                               [*value[:i], None, *value[i + 1:]]])
        return rng.choice([[], None, {}, "layers"])
    if isinstance(value, dict):
        return rng.choice([{}, None, [], "x"])
    return rng.choice([0, "x", None, [], {}])


def _json_paths(obj: object, prefix: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    paths = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            paths += _json_paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            paths += _json_paths(v, (*prefix, i))
    return paths


def _structured(raw: bytes, rng: random.Random, digests: list[str]) -> tuple[bytes, str]:
    obj = json.loads(raw)
    paths = _json_paths(obj)[1:]
    path = rng.choice(paths)
    parent: object = obj
    for key in path[:-1]:
        parent = parent[key]  # type: ignore[index]
    key = path[-1]
    if isinstance(parent, dict) and rng.random() < 0.25:
        del parent[key]  # type: ignore[arg-type]
        what = "delete"
    else:
        parent[key] = _tweak(parent[key], rng, digests)  # type: ignore[index]
        what = "set"
    return json.dumps(obj).encode(), f"{what} {'/'.join(map(str, path))}"


def mutate_manifest(raw: bytes, rng: random.Random, digests: list[str]) -> tuple[bytes, str]:
    """A mutated manifest (structured edits mostly, raw damage sometimes)."""
    if rng.random() < 0.2:
        return _json_damage(raw, rng)
    return _structured(raw, rng, digests)


def mutate_config(raw: bytes, rng: random.Random, digests: list[str]) -> tuple[bytes, str]:
    """A mutated image config (the converter reads ``rootfs.diff_ids`` and runtime fields)."""
    if rng.random() < 0.2:
        return _json_damage(raw, rng)
    return _structured(raw, rng, digests)


# -- tar mutations (converter input) ------------------------------------------------


def _reseal_tar_header(buf: bytearray, at: int) -> None:
    """Recompute the checksum of the 512-byte tar header at ``at`` (so parsers go deeper)."""
    header = buf[at:at + 512]
    header[148:156] = b" " * 8
    buf[at + 148:at + 156] = b"%06o\0 " % sum(header)


def _tar_headers(data: bytes) -> list[int]:
    """Offsets of every member's header block (a PAX member's extended header first)."""
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        return [info.offset for info in tar]


def mutate_tar(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """A mutated uncompressed layer tar (header fields resealed with a valid checksum)."""
    headers = _tar_headers(data)
    buf = bytearray(data)
    roll = rng.random()
    if roll < 0.15:
        cut = rng.randrange(len(buf))
        return bytes(buf[:cut]), f"truncate tar to {cut}"
    if roll < 0.25:
        pos = rng.randrange(len(buf))
        buf[pos] ^= 1 << rng.randrange(8)
        return bytes(buf), f"flip a bit at {pos}"
    at = rng.choice(headers)
    field, (off, width) = rng.choice(list({
        "name": (0, 100), "mode": (100, 8), "uid": (108, 8), "size": (124, 12),
        "mtime": (136, 12), "typeflag": (156, 1), "linkname": (157, 100), "magic": (257, 6),
        "devmajor": (329, 8), "devminor": (337, 8), "prefix": (345, 155),
    }.items()))
    value = rng.choice([
        b"", b"0" * (width - 1), b"7" * (width - 1), b"\xff" * width, b"../" * 30,
        b"/etc/passwd", b"%o" % rng.randrange(8 ** min(width - 1, 11)), rng.randbytes(width),
        b"1", b"2", b"5", b"L", b"K", b"x", b"g", b"S", b"\x80" + bytes(width - 1),
    ])[:width]
    buf[at + off:at + off + width] = value.ljust(width, b"\0")
    _reseal_tar_header(buf, at)
    return bytes(buf), f"tar header at {at}: {field} := {value[:20]!r}"


# -- resealing ------------------------------------------------------------------------


class Layout:
    """A per-case OCI layout: the seed's blobs hardlinked in, new blobs and index written.

    ``reseal_bootstrap`` and ``reseal_manifest`` (RAFS images) and
    ``reseal_source`` (converter input) make the trust chain hold for mutated
    bytes: every digest that vouches for them is recomputed, up to the index.
    """

    def __init__(self, seed: Path, path: Path) -> None:
        self.seed, self.path = seed, path
        blobs = path / "blobs" / "sha256"
        blobs.mkdir(parents=True)
        for p in (seed / "blobs" / "sha256").iterdir():
            os.link(p, blobs / p.name)
        shutil.copyfile(seed / "oci-layout", path / "oci-layout")

    def put(self, data: bytes) -> str:
        digest = _digest(data)
        path = self.path / "blobs" / "sha256" / digest[7:]
        if not path.exists():
            path.write_bytes(data)
        return digest

    def read(self, digest: str) -> bytes:
        return (self.path / "blobs" / "sha256" / digest[7:]).read_bytes()

    def _index(self, manifest: bytes, media_type: str, tag: str) -> str:
        digest = self.put(manifest)
        index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                 "manifests": [{"mediaType": media_type, "digest": digest,
                                "size": len(manifest), "annotations": {REF_NAME: tag}}]}
        (self.path / "index.json").write_text(json.dumps(index))
        return f"oci:{self.path}:{tag}"

    def reseal_manifest(self, manifest: bytes, tag: str = "fuzz",
                        media_type: str = "application/vnd.oci.image.manifest.v1+json") -> str:
        """Point ``tag`` at these manifest bytes, whatever they are; the image reference."""
        return self._index(manifest, media_type, tag)

    def reseal_bootstrap(self, manifest: dict[str, object], bootstrap: bytes,
                         tag: str = "fuzz") -> str:
        """A copy of ``manifest`` whose bootstrap layer holds ``bootstrap``, sealed."""
        packed = zstandard.ZstdCompressor(level=1).compress(bootstrap)
        m = json.loads(json.dumps(manifest))
        layers = m["layers"]
        layers[-1] = {
            "mediaType": MEDIA_TYPE_RAFS_BOOTSTRAP, "digest": self.put(packed),
            "size": len(packed),
            "annotations": {ANNOTATION_RAFS_BOOTSTRAP: "true",
                            ANNOTATION_RAFS_BOOTSTRAP_DIGEST: _digest(bootstrap)},
        }
        return self._index(json.dumps(m).encode(), m["mediaType"], tag)

    def reseal_source(self, manifest: dict[str, object], config: dict[str, object] | bytes,
                      layer: int | None = None, tar: bytes | None = None,
                      tag: str = "fuzz") -> str:
        """A source image with layer ``layer`` replaced by ``tar`` (gzip) and ``config``
        (its ``diff_ids`` updated for the new layer when it is a dict), sealed."""
        m = json.loads(json.dumps(manifest))
        if layer is not None and tar is not None:
            packed = gzip.compress(tar, compresslevel=1, mtime=0)
            m["layers"][layer] = {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                                  "digest": self.put(packed), "size": len(packed)}
            if isinstance(config, dict):
                config = json.loads(json.dumps(config))
                config["rootfs"]["diff_ids"][layer] = _digest(tar)  # type: ignore[index]
        raw = config if isinstance(config, bytes) else json.dumps(config).encode()
        m["config"] = {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": self.put(raw), "size": len(raw)}
        return self._index(json.dumps(m).encode(), m["mediaType"], tag)
