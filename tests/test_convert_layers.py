"""Layer application: OCI whiteouts, replacement, hardlinks, paths, and damaged layers.

Each test builds real tar streams with ``tarfile`` (via tests.helpers.ocibuild),
reads them through ``LayerStream`` and applies them with ``LayerApplier`` onto
one tree, exactly as ``rafs convert`` does, then looks at the resulting tree.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import stat
import tarfile
from pathlib import Path

import pytest
import zstandard

from converter.chunker import ChunkStore
from converter.errors import (
    BadTarError,
    ConvertError,
    LayerDigestError,
    LinkTargetError,
    UnsafePathError,
)
from converter.layers import LayerApplier, new_root
from converter.tarstream import LayerStream
from rafs.codec import decode_chunk
from rafs.errors import MediaTypeError
from rafs.model import Node
from tests.helpers.ocibuild import (
    MEDIA_TYPES,
    Entry,
    dir_entry,
    file_entry,
    layer_tar,
    opaque_whiteout,
    symlink_entry,
    whiteout,
)

CHUNK = 64 << 10


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Image:
    """A tree built from layers, with a way to read file contents back."""

    def __init__(self, tmp_path: Path, chunk_size: int = CHUNK, workers: int = 2) -> None:
        self.root = new_root()
        self.store = ChunkStore(tmp_path, chunk_size, "zstd", 3, workers)

    def apply(self, entries: list[Entry] | bytes, compression: str = "gzip",
              **stream_kw: object) -> None:
        tar = entries if isinstance(entries, bytes) else layer_tar(entries)
        stored = _compress(tar, compression)
        kw: dict[str, object] = {"media_type": MEDIA_TYPES[compression],
                                 "digest": _sha(stored), "size": len(stored),
                                 "diff_id": _sha(tar)}
        kw.update(stream_kw)
        writer = self.store.begin_layer("test layer")
        applier = LayerApplier(self.root, writer, "test layer")
        stream = LayerStream(io.BytesIO(stored), what="test layer", **kw)  # type: ignore[arg-type]
        for entry in stream.entries():
            applier.apply(entry)
        writer.finish()

    def node(self, path: str) -> Node | None:
        node = self.root
        for part in path.encode().split(b"/"):
            if not part:
                continue
            if node.children is None or part not in node.children:
                return None
            node = node.children[part]
        return node

    def names(self, path: str = "") -> list[str]:
        node = self.node(path)
        assert node is not None and node.children is not None
        return sorted(os.fsdecode(n) for n in node.children)

    def read(self, path: str) -> bytes:
        node = self.node(path)
        assert node is not None and node.is_reg
        out = bytearray()
        for i, ref in enumerate(node.chunks):
            if ref is None:
                out += bytes(min(self.store.chunk_size, node.size - i * self.store.chunk_size))
                continue
            chunk = self.store.chunks[ref]
            with open(self.store.blob_files[chunk.blob_index], "rb") as f:
                f.seek(chunk.compressed_offset)
                out += decode_chunk(chunk, f.read(chunk.compressed_size))
        assert len(out) == node.size
        return bytes(out)

    def close(self) -> None:
        self.store.close()


def _compress(tar: bytes, compression: str) -> bytes:
    if compression == "gzip":
        return gzip.compress(tar, mtime=0)
    if compression == "zstd":
        return zstandard.ZstdCompressor().compress(tar)
    return tar


@pytest.fixture
def image(tmp_path: Path):
    img = Image(tmp_path)
    yield img
    img.close()


# -- whiteouts ----------------------------------------------------------------


def test_whiteout_removes_lower_file(image: Image) -> None:
    image.apply([dir_entry("etc"), file_entry("etc/a", b"a"), file_entry("etc/b", b"b")])
    image.apply([whiteout("etc/a")])
    assert image.names("etc") == ["b"]


def test_whiteout_removes_lower_directory_and_its_subtree(image: Image) -> None:
    image.apply([dir_entry("d"), dir_entry("d/sub"), file_entry("d/sub/f", b"x"),
                 file_entry("keep", b"k")])
    image.apply([whiteout("d")])
    assert image.names() == ["keep"]


def test_whiteout_does_not_hide_entries_of_its_own_layer(image: Image) -> None:
    image.apply([file_entry("a", b"old")])
    # The new "a" comes first, the whiteout after it: the spec says a whiteout
    # only applies to lower layers, so the new file stays.
    image.apply([file_entry("a", b"new"), whiteout("a")])
    assert image.read("a") == b"new"


def test_whiteout_then_recreate_in_same_layer(image: Image) -> None:
    image.apply([dir_entry("d"), file_entry("d/old", b"1")])
    image.apply([whiteout("d"), dir_entry("d"), file_entry("d/new", b"2")])
    assert image.names("d") == ["new"]


def test_whiteout_of_missing_path_is_ignored(image: Image) -> None:
    image.apply([file_entry("a", b"a")])
    image.apply([whiteout("nothing"), whiteout("no/such/dir/x")])
    assert image.names() == ["a"]
    assert image.node("no") is None  # a whiteout does not create parents


def test_opaque_directory_drops_lower_children_keeps_same_layer_entries(image: Image) -> None:
    image.apply([dir_entry("d"), file_entry("d/lower1", b"1"), dir_entry("d/lowerdir"),
                 file_entry("d/lowerdir/x", b"x"), file_entry("outside", b"o")])
    image.apply([
        dir_entry("d", mode=0o700),
        file_entry("d/before", b"b"),  # same layer, before the marker
        opaque_whiteout("d"),
        file_entry("d/after", b"a"),  # same layer, after the marker
    ])
    assert image.names("d") == ["after", "before"]
    assert image.names() == ["d", "outside"]
    d = image.node("d")
    assert d is not None and stat.S_IMODE(d.mode) == 0o700


def test_opaque_keeps_same_layer_subdirectories_but_drops_their_lower_content(
        image: Image) -> None:
    image.apply([dir_entry("d"), dir_entry("d/sub"), file_entry("d/sub/lower", b"l")])
    image.apply([opaque_whiteout("d"), dir_entry("d/sub"), file_entry("d/sub/upper", b"u")])
    assert image.names("d") == ["sub"]
    assert image.names("d/sub") == ["upper"]


def test_aufs_metadata_whiteouts_are_skipped(image: Image) -> None:
    image.apply([file_entry("a", b"a")])
    image.apply([Entry(".wh..wh.plnk", "dir"), Entry(".wh..wh.aufs", "file")])
    assert image.names() == ["a"]


# -- replacement --------------------------------------------------------------


def test_file_replaced_by_directory(image: Image) -> None:
    image.apply([file_entry("x", b"file")])
    image.apply([dir_entry("x"), file_entry("x/inner", b"i")])
    x = image.node("x")
    assert x is not None and x.is_dir
    assert image.names("x") == ["inner"]


def test_directory_replaced_by_file(image: Image) -> None:
    image.apply([dir_entry("x"), file_entry("x/inner", b"i")])
    image.apply([file_entry("x", b"now a file")])
    assert image.read("x") == b"now a file"


def test_directory_over_directory_keeps_children_takes_metadata(image: Image) -> None:
    image.apply([dir_entry("d", mode=0o755, uid=1, mtime=100, xattrs={"user.a": b"1"}),
                 file_entry("d/f", b"f")])
    image.apply([dir_entry("d", mode=0o1777, uid=2, gid=3, mtime=200)])
    d = image.node("d")
    assert d is not None
    assert image.names("d") == ["f"]
    assert (stat.S_IMODE(d.mode), d.uid, d.gid, d.mtime, d.xattrs) == (0o1777, 2, 3, 200, {})


def test_later_file_replaces_earlier_in_same_layer(image: Image) -> None:
    image.apply([file_entry("a", b"one"), file_entry("a", b"two")])
    assert image.read("a") == b"two"


def test_symlink_replaces_file(image: Image) -> None:
    image.apply([file_entry("a", b"one")])
    image.apply([symlink_entry("a", "/target")])
    a = image.node("a")
    assert a is not None and stat.S_ISLNK(a.mode) and a.target == b"/target"


@pytest.mark.parametrize("mode", [0o644, 0o600, 0o755, 0o777])
def test_a_symlink_is_0777_whatever_its_header_says(image: Image, mode: int) -> None:
    image.apply([symlink_entry("l", "/usr/lib/libz.so.1", mode=mode, uid=3)])
    node = image.node("l")
    assert node is not None and (node.mode, node.uid) == (stat.S_IFLNK | 0o777, 3)


# -- hardlinks ----------------------------------------------------------------


def test_hardlink_into_lower_layer_shares_the_node(image: Image) -> None:
    image.apply([dir_entry("bin"), file_entry("bin/busybox", b"\x7fELF" * 1000, mode=0o755)])
    image.apply([Entry("bin/sh", "hardlink", linkname="bin/busybox")])
    assert image.node("bin/sh") is image.node("bin/busybox")
    assert image.read("bin/sh") == b"\x7fELF" * 1000


def test_hardlink_survives_whiteout_of_its_target(image: Image) -> None:
    image.apply([file_entry("a", b"content" * 100), Entry("b", "hardlink", linkname="a")])
    image.apply([whiteout("a")])
    assert image.names() == ["b"]
    assert image.read("b") == b"content" * 100


def test_hardlink_keeps_old_inode_when_target_is_replaced(image: Image) -> None:
    image.apply([file_entry("a", b"old"), Entry("b", "hardlink", linkname="a")])
    image.apply([file_entry("a", b"new")])
    assert image.read("a") == b"new"
    assert image.read("b") == b"old"


def test_hardlink_to_missing_target_is_rejected(image: Image) -> None:
    with pytest.raises(LinkTargetError, match="does not exist"):
        image.apply([Entry("b", "hardlink", linkname="missing")])


def test_hardlink_to_directory_is_rejected(image: Image) -> None:
    with pytest.raises(LinkTargetError, match="is a directory"):
        image.apply([dir_entry("d"), Entry("b", "hardlink", linkname="d")])


def test_hardlink_with_absolute_linkname_is_rejected(image: Image) -> None:
    with pytest.raises(UnsafePathError, match="absolute"):
        image.apply([file_entry("a", b"x"), Entry("b", "hardlink", linkname="/a")])


# -- paths --------------------------------------------------------------------


def test_implied_parents_are_root_owned_0755_mtime_0(image: Image) -> None:
    image.apply([file_entry("a/b/c/file", b"f", uid=7, mtime=12345)])
    for path in ("a", "a/b", "a/b/c"):
        node = image.node(path)
        assert node is not None and node.is_dir
        assert (node.mode, node.uid, node.gid, node.mtime) == (stat.S_IFDIR | 0o755, 0, 0, 0)
    f = image.node("a/b/c/file")
    assert f is not None and (f.uid, f.mtime) == (7, 12345)


def test_implied_parent_takes_metadata_of_a_later_entry(image: Image) -> None:
    image.apply([file_entry("a/file", b"f"), dir_entry("a", mode=0o711, uid=5, mtime=99)])
    a = image.node("a")
    assert a is not None and (a.mode, a.uid, a.mtime) == (stat.S_IFDIR | 0o711, 5, 99)
    assert image.names("a") == ["file"]


@pytest.mark.parametrize("name", ["../evil", "a/../../evil", "./../evil", "/../evil"])
def test_dotdot_escape_is_rejected(image: Image, name: str) -> None:
    with pytest.raises(UnsafePathError, match=r"escapes the image root|absolute"):
        image.apply([file_entry(name, b"x")])


def test_hardlink_dotdot_escape_is_rejected(image: Image) -> None:
    with pytest.raises(UnsafePathError):
        image.apply([file_entry("a", b"x"), Entry("b", "hardlink", linkname="../a")])


def test_dotdot_inside_the_root_is_normalised(image: Image) -> None:
    image.apply([file_entry("a/../b", b"x"), file_entry("./c/./d", b"y")])
    assert image.names() == ["b", "c"]  # lexical, as umoci CleanPath: no "a" appears
    assert image.read("c/d") == b"y"


@pytest.mark.parametrize("name", ["/etc/passwd", "/", "//etc"])
def test_absolute_names_are_rejected(image: Image, name: str) -> None:
    with pytest.raises(UnsafePathError, match="absolute"):
        image.apply([file_entry(name, b"root:x:0:0")])


def test_root_entry_sets_root_metadata(image: Image) -> None:
    image.apply([dir_entry("./", mode=0o750, uid=3, mtime=77), file_entry("f", b"")])
    assert (image.root.mode, image.root.uid, image.root.mtime) == (stat.S_IFDIR | 0o750, 3, 77)


def test_root_cannot_become_a_file(image: Image) -> None:
    with pytest.raises(UnsafePathError, match="root"):
        image.apply([file_entry("./", b"")])


def test_symlinked_parent_directory_is_followed_inside_the_root(image: Image) -> None:
    image.apply([dir_entry("usr"), dir_entry("usr/lib"), symlink_entry("lib", "usr/lib"),
                 symlink_entry("abs", "/usr/lib"), symlink_entry("up", "../../usr")])
    image.apply([file_entry("lib/libc.so", b"c"), file_entry("abs/libm.so", b"m"),
                 file_entry("up/lib/libz.so", b"z")])
    assert image.names("usr/lib") == ["libc.so", "libm.so", "libz.so"]
    lib = image.node("lib")
    assert lib is not None and stat.S_ISLNK(lib.mode)


def test_parent_that_is_a_file_is_rejected(image: Image) -> None:
    image.apply([file_entry("f", b"x")])
    with pytest.raises(BadTarError, match="not a directory"):
        image.apply([file_entry("f/child", b"y")])


def test_symlink_loop_in_parent_is_rejected(image: Image) -> None:
    image.apply([symlink_entry("loop", "loop")])
    with pytest.raises(BadTarError, match="symbolic links"):
        image.apply([file_entry("loop/x", b"y")])


def test_component_longer_than_255_bytes_is_rejected(image: Image) -> None:
    with pytest.raises(BadTarError, match="longer than 255"):
        image.apply([file_entry("d/" + "n" * 256, b"")])


# -- metadata -----------------------------------------------------------------


def test_long_and_non_utf8_names_and_binary_xattrs(image: Image) -> None:
    long_name = "deep/" + "x" * 200 + "/" + "y" * 250
    raw_name = b"latin1-\xe9t\xe9"
    image.apply([
        file_entry(long_name, b"long"),
        file_entry(raw_name, b"raw"),
        file_entry("caps", b"", xattrs={"security.capability": b"\x01\x00\x00\x02\xff\x00",
                                         "user.bin": b"\x00\xff\xfe"}),
    ])
    assert image.read(long_name) == b"long"
    node = image.node("caps")
    assert node is not None
    assert node.xattrs == {b"security.capability": b"\x01\x00\x00\x02\xff\x00",
                           b"user.bin": b"\x00\xff\xfe"}
    assert raw_name in (image.root.children or {})


def test_overlay_xattrs_are_dropped(image: Image) -> None:
    image.apply([dir_entry("d", xattrs={"trusted.overlay.opaque": b"y", "user.k": b"v"})])
    d = image.node("d")
    assert d is not None and d.xattrs == {b"user.k": b"v"}


def test_host_xattrs_and_user_xattrs_where_linux_refuses_them_are_dropped(
        image: Image) -> None:
    image.apply([file_entry("f", b"", xattrs={"security.selinux": b"system_u:object_r:x",
                                              "user.k": b"v", "security.capability": b"c"}),
                 symlink_entry("l", "f", xattrs={"user.k": b"v", "trusted.t": b"t"})])
    f, link = image.node("f"), image.node("l")
    assert f is not None and f.xattrs == {b"user.k": b"v", b"security.capability": b"c"}
    assert link is not None and link.xattrs == {b"trusted.t": b"t"}


def test_implied_directories_below_a_setgid_directory_inherit_it(image: Image) -> None:
    image.apply([dir_entry("g", mode=0o2775, gid=50), file_entry("g/a/b/f", b"", gid=7)])
    for path in ("g/a", "g/a/b"):
        node = image.node(path)
        assert node is not None and (node.mode, node.gid) == (stat.S_IFDIR | 0o2755, 50)


def test_devices_fifos_and_nanosecond_mtimes(image: Image) -> None:
    image.apply([
        Entry("dev/null", "chardev", mode=0o666, devmajor=1, devminor=3),
        Entry("dev/sda", "blockdev", mode=0o660, devmajor=8, devminor=0),
        Entry("run/fifo", "fifo", mode=0o600),
        file_entry("t", b"", pax={"mtime": "1700000000.123456789"}),
    ])
    null, sda, fifo, t = (image.node(p) for p in ("dev/null", "dev/sda", "run/fifo", "t"))
    assert null is not None and null.mode == stat.S_IFCHR | 0o666
    assert null.rdev == os.makedev(1, 3)
    assert sda is not None and sda.mode == stat.S_IFBLK | 0o660 and sda.rdev == os.makedev(8, 0)
    assert fifo is not None and fifo.mode == stat.S_IFIFO | 0o600
    assert t is not None and (t.mtime, t.mtime_nsec) == (1700000000, 123456789)


def test_setuid_bits_and_ids_are_kept(image: Image) -> None:
    image.apply([file_entry("su", b"x", mode=0o4755, uid=100000, gid=65534)])
    su = image.node("su")
    assert su is not None and (su.mode, su.uid, su.gid) == (stat.S_IFREG | 0o4755, 100000, 65534)


# -- streams: compression, damage, digests ------------------------------------


@pytest.mark.parametrize("compression", ["gzip", "zstd", "none"])
def test_every_compression_reads_the_same(image: Image, compression: str) -> None:
    data = os.urandom(200_000)
    image.apply([file_entry("f", data)], compression=compression)
    assert image.read("f") == data


def test_magic_bytes_win_over_a_wrong_media_type(image: Image) -> None:
    image.apply([file_entry("f", b"x")], compression="gzip", media_type=MEDIA_TYPES["none"])
    assert image.read("f") == b"x"


def test_non_layer_media_type_is_rejected(image: Image) -> None:
    with pytest.raises(MediaTypeError):
        image.apply([file_entry("f", b"x")], media_type="application/json")


def test_empty_stream_is_an_empty_layer(image: Image) -> None:
    image.apply(b"", compression="none")
    assert image.names() == []


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_compressed_empty_stream_is_an_empty_layer(image: Image, compression: str) -> None:
    image.apply(b"", compression=compression)
    assert image.names() == []


def test_garbage_is_rejected(image: Image) -> None:
    garbage = os.urandom(4096)
    with pytest.raises(BadTarError):
        image.apply(garbage, compression="none")


def test_garbage_after_first_member_is_rejected(image: Image) -> None:
    tar = layer_tar([file_entry("a", b"a" * 100)])
    damaged = tar[:1024] + os.urandom(512) + tar[1536:]
    with pytest.raises(ConvertError):
        image.apply(damaged, compression="none", diff_id=None)


@pytest.mark.parametrize("cut", [700, 1024, 1536, 50_000])
def test_truncated_tar_is_rejected(image: Image, cut: int) -> None:
    tar = layer_tar([file_entry("a", b"a" * 100), file_entry("b", os.urandom(100_000))])
    with pytest.raises(BadTarError):
        # No diff_id to compare with: the tar reader itself must notice.
        image.apply(tar[:cut], compression="none", diff_id=None)


def test_truncated_gzip_is_rejected(image: Image) -> None:
    stored = gzip.compress(layer_tar([file_entry("b", os.urandom(100_000))]))
    with pytest.raises(BadTarError):
        image.apply(stored[: len(stored) // 2], compression="none", media_type=MEDIA_TYPES["gzip"],
                    diff_id=None)


def test_corrupt_blob_is_reported_as_digest_mismatch(image: Image) -> None:
    tar = layer_tar([file_entry("b", os.urandom(100_000))])
    stored = bytearray(gzip.compress(tar))
    digest = _sha(bytes(stored))
    stored[len(stored) // 2] ^= 0xFF
    with pytest.raises(LayerDigestError, match="descriptor says"):
        image.apply(bytes(stored), compression="none", media_type=MEDIA_TYPES["gzip"],
                    digest=digest, diff_id=_sha(tar))


def test_stored_digest_mismatch_is_rejected(image: Image) -> None:
    with pytest.raises(LayerDigestError, match="descriptor says"):
        image.apply([file_entry("a", b"a")], digest="sha256:" + "0" * 64)


def test_stored_size_mismatch_is_rejected(image: Image) -> None:
    with pytest.raises(LayerDigestError, match="bytes"):
        image.apply([file_entry("a", b"a")], size=3)


def test_diff_id_mismatch_is_rejected(image: Image) -> None:
    with pytest.raises(LayerDigestError, match="diff_id"):
        image.apply([file_entry("a", b"a")], diff_id="sha256:" + "1" * 64)


def test_unsupported_entry_type_is_rejected(image: Image) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        info = tarfile.TarInfo("vol")
        info.type = b"V"  # a GNU volume header
        tf.addfile(info)
    with pytest.raises(BadTarError, match="unsupported tar entry type"):
        image.apply(buf.getvalue(), compression="none")


def test_truncated_zstd_is_rejected(image: Image) -> None:
    stored = zstandard.ZstdCompressor().compress(layer_tar([file_entry("b", os.urandom(100_000))]))
    with pytest.raises(BadTarError):
        image.apply(stored[: len(stored) // 2], compression="none",
                    media_type=MEDIA_TYPES["zstd"], diff_id=None)


def test_gzip_layers_and_truncated_gzip(image: Image) -> None:
    data = os.urandom(100_000)
    image.apply([file_entry("f", data)], compression="gzip")
    assert image.read("f") == data
    stored = gzip.compress(layer_tar([file_entry("b", data)]))
    for cut in (5000, len(stored) - 8, len(stored) // 2):
        with pytest.raises(BadTarError):
            image.apply(stored[:cut], compression="none", media_type=MEDIA_TYPES["gzip"],
                        diff_id=None)


def test_hardlink_target_reached_through_the_replaced_path_is_missing(image: Image) -> None:
    # As containerd and umoci: the link's path is removed before the target is looked up.
    image.apply([dir_entry("real"), file_entry("real/f", b"x"), symlink_entry("s", "real")])
    with pytest.raises(LinkTargetError, match="does not exist"):
        image.apply([Entry("s", "hardlink", linkname="s/f")])


def test_hardlink_to_itself_or_below_itself_is_rejected(image: Image) -> None:
    # An unpacker removes the path before linking, so such targets no longer exist.
    image.apply([file_entry("a", b"x")])
    with pytest.raises(LinkTargetError, match="does not exist"):
        image.apply([Entry("a", "hardlink", linkname="a")])
    image.apply([dir_entry("d"), file_entry("d/f", b"y")])
    with pytest.raises(LinkTargetError, match="does not exist"):
        image.apply([Entry("d", "hardlink", linkname="d/f")])


@pytest.mark.parametrize("fmt", ["gnu", "posix"])
def test_gnu_tar_sparse_files(image: Image, tmp_path: Path, fmt: str) -> None:
    import subprocess

    src = tmp_path / "sparse"
    with open(src, "wb") as f:
        f.truncate(3 * CHUNK + 100)
        f.seek(CHUNK + 10)
        f.write(b"island")
    tar = tmp_path / "layer.tar"
    subprocess.run(["tar", f"--format={fmt}", "--sparse", "-C", str(tmp_path), "-cf", str(tar),
                    "sparse"], check=True)
    image.apply(tar.read_bytes(), compression="none")
    assert image.read("sparse") == src.read_bytes()
    node = image.node("sparse")
    assert node is not None and node.chunks[0] is None and node.chunks[2] is None
