"""The converted image holds exactly what umoci unpacks from the source image.

The RAFS side is read without FUSE: the bootstrap (rafs.bootstrap) gives the
tree and metadata, file contents are rebuilt from the blobs through the chunk
table and verified by rafs.codec. The reference side is ``umoci raw unpack``
walked by tests.helpers.treecmp. Both become the same record shape and must
match field by field.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest

from converter.convert import ConvertOptions, convert
from rafs import image as rafs_image
from rafs.bootstrap import Bootstrap
from rafs.codec import decode_chunk
from tests.helpers.edgecases import LAYERS
from tests.helpers.ocibuild import build_oci_image
from tests.helpers.treecmp import FIELDS, IGNORED_XATTRS, walk_tree
from tests.helpers.umoci import umoci_unpack

pytestmark = [pytest.mark.root]

_KIND = {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink",
         stat.S_IFCHR: "chardev", stat.S_IFBLK: "blockdev", stat.S_IFIFO: "fifo",
         stat.S_IFSOCK: "socket"}


def rafs_records(ref: str) -> dict[bytes, dict[str, object]]:
    """treecmp-style records for every path of a converted image, from its bootstrap."""
    img = rafs_image.open_local_image(ref)
    boot = Bootstrap.from_bytes(img.bootstrap)
    blob_files = [img.layout.blob_path(b.digest) for b in boot.blobs]
    records: dict[bytes, dict[str, object]] = {}
    by_nid: dict[int, list[bytes]] = {}
    for path, ino in boot.walk():
        rel = b"." if path == b"/" else path.lstrip(b"/")
        kind = _KIND[stat.S_IFMT(ino.mode)]
        rec: dict[str, object] = {
            "type": kind, "mode": ino.mode, "uid": ino.uid, "gid": ino.gid,
            "mtime": ino.mtime, "nlink": ino.nlink,
            "xattrs": {k.decode(): v for k, v in sorted(boot.xattrs(ino).items())
                       if k.decode() not in IGNORED_XATTRS},
        }
        if kind in ("file", "symlink"):
            rec["size"] = ino.size
        if kind == "symlink":
            rec["target"] = bytes(boot.readlink(ino))
        if kind in ("chardev", "blockdev"):
            rec["rdev"] = (os.major(ino.rdev), os.minor(ino.rdev))
        if kind == "file":
            rec["sha256"] = _content_sha256(boot, ino, blob_files)
            if ino.nlink > 1:
                by_nid.setdefault(ino.nid, []).append(rel)
        records[rel] = rec
    for group in by_nid.values():
        for rel in group:
            records[rel]["hardlinks"] = sorted(group)
    return records


def _content_sha256(boot: Bootstrap, ino: object, blob_files: list[Path]) -> str:
    h = hashlib.sha256()
    size = ino.size  # type: ignore[attr-defined]
    done = 0
    for ref in boot.file_chunks(ino):  # type: ignore[arg-type]
        n = min(boot.chunk_size, size - done)
        if ref is None:
            h.update(bytes(n))
        else:
            c = boot.chunk(ref)
            with open(blob_files[c.blob_index], "rb") as f:
                f.seek(c.compressed_offset)
                data = decode_chunk(c, f.read(c.compressed_size))
            assert len(data) == n
            h.update(data)
        done += n
    assert done == size
    return h.hexdigest()


def assert_same_as_umoci(tmp_path: Path, layout: Path, tag: str,
                         options: ConvertOptions | None = None) -> None:
    dst = f"oci:{tmp_path / 'rafs'}:{tag}"
    convert(f"oci:{layout}:{tag}", dst, options or ConvertOptions(progress=False))
    ours = rafs_records(dst)
    ref = walk_tree(umoci_unpack(layout, tag, tmp_path / "umoci"))
    ours.pop(b".")  # the rootfs directory itself is umoci's, not the image's
    ref.pop(b".")
    diffs = []
    for rel in sorted(ours.keys() | ref.keys()):
        if rel not in ours or rel not in ref:
            diffs.append(f"{rel!r}: only in {'rafs' if rel in ours else 'umoci'}")
            continue
        for name in ("mode", *FIELDS):
            if ours[rel].get(name) != ref[rel].get(name):
                diffs.append(f"{rel!r}: {name}: rafs {ours[rel].get(name)!r} "
                             f"!= umoci {ref[rel].get(name)!r}")
    assert not diffs, "\n".join(diffs[:50])


def test_synthetic_image_matches_umoci(tmp_path: Path) -> None:
    build_oci_image(tmp_path / "src", "t", LAYERS, compression=["gzip", "zstd", "none"])
    assert_same_as_umoci(tmp_path, tmp_path / "src", "t", ConvertOptions(
        chunk_size=64 << 10, progress=False, prefetch=[b"/bin/sh", b"/usr", b"/holes"]))


def test_debian_image_matches_umoci(tmp_path: Path,
                                    debian_numpy_image: tuple[Path, str]) -> None:
    layout, tag = debian_numpy_image
    assert_same_as_umoci(tmp_path, layout, tag)
