"""The test helpers prove themselves against real tools (tarfile -> umoci/skopeo -> lstat).

If these fail, every comparison test built on the helpers is meaningless.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
import zstandard

from tests.helpers.ocibuild import (
    MEDIA_TYPES,
    Entry,
    ImageConfig,
    build_docker_archive,
    build_oci_image,
    dir_entry,
    file_entry,
    layer_tar,
    opaque_whiteout,
    symlink_entry,
    whiteout,
)
from tests.helpers.procs import CommandTimeout, assert_clean_error, run
from tests.helpers.treecmp import compare_trees, walk_tree
from tests.helpers.umoci import umoci_unpack

pytestmark = [pytest.mark.root]

MTIME = 1_600_000_000
LONG_DIR = "long-" + "d" * 120  # one component, 125 bytes: needs a PAX path record
LONG_NAME = f"{LONG_DIR}/{'f' * 150}.txt"
NON_UTF8 = b"caf\xe9"
BIG = os.urandom(3 * 1024 * 1024 + 17)


def _layers() -> list[list[Entry]]:
    lower = [
        dir_entry("etc", mtime=MTIME),
        file_entry(
            "etc/hello",
            b"hello\n",
            uid=1000,
            gid=1001,
            mtime=MTIME,
            xattrs={"user.greeting": b"hi", "trusted.blob": b"\x00\xff\x01"},
        ),
        file_entry("etc/gone", b"removed by the upper layer\n", mtime=MTIME),
        dir_entry("bin", mtime=MTIME),
        file_entry("bin/tool", b"#!/bin/sh\necho tool\n", mode=0o4755, mtime=MTIME),
        Entry("bin/tool-link", "hardlink", linkname="bin/tool"),
        symlink_entry("bin/sh", "tool", mtime=MTIME),
        dir_entry("tmp", mode=0o1777, mtime=MTIME),
        dir_entry("srv", mode=0o2775, gid=50, mtime=MTIME),
        dir_entry("dev", mtime=MTIME),
        Entry("dev/null2", "chardev", mode=0o666, devmajor=1, devminor=3, mtime=MTIME),
        Entry("dev/loopx", "blockdev", mode=0o660, devmajor=7, devminor=200, mtime=MTIME),
        dir_entry("run", mtime=MTIME),
        Entry("run/fifo", "fifo", mode=0o600, mtime=MTIME),
        dir_entry("opq", mtime=MTIME),
        file_entry("opq/a", b"a", mtime=MTIME),
        file_entry("opq/b", b"b", mtime=MTIME),
        dir_entry(LONG_DIR, mtime=MTIME),
        file_entry(LONG_NAME, b"long\n", mtime=MTIME),
        file_entry(NON_UTF8, b"latin-1 name\n", mtime=MTIME),
        file_entry("naïve.txt", b"utf-8 name\n", mtime=MTIME),
    ]
    middle = [
        whiteout("etc/gone"),
        file_entry(
            "etc/hello",
            b"hello again\n",
            uid=1000,
            gid=1001,
            mtime=MTIME + 1,
            xattrs={"user.greeting": b"hello"},
        ),
        dir_entry("opq", mtime=MTIME),
        opaque_whiteout("opq"),
        file_entry("opq/c", b"c", mtime=MTIME),
        file_entry("bigid", b"", uid=3_000_000, gid=3_000_001, mtime=MTIME),
    ]
    upper = [file_entry("data.bin", BIG, mode=0o600, mtime=MTIME + 2)]
    return [lower, middle, upper]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[bytes, dict]]:
    """A 3-layer image (gzip, zstd, none) of every entry kind, unpacked by umoci."""
    base = tmp_path_factory.mktemp("synthetic")
    layout = base / "layout"
    build_oci_image(layout, "v1", _layers(), compression=["gzip", "zstd", "none"])
    rootfs = umoci_unpack(layout, "v1", base / "rootfs")
    return layout, walk_tree(rootfs)


# ---------------------------------------------------------------------------------------
# ocibuild: the layout itself


def test_layout_has_index_manifest_config_and_blobs(synthetic: tuple[Path, dict]) -> None:
    layout, _ = synthetic
    assert json.loads((layout / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    index = json.loads((layout / "index.json").read_text())
    (desc,) = index["manifests"]
    assert desc["annotations"]["org.opencontainers.image.ref.name"] == "v1"
    manifest = json.loads(_blob(layout, desc["digest"]))
    assert manifest["schemaVersion"] == 2
    assert manifest["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert [lay["mediaType"] for lay in manifest["layers"]] == [
        MEDIA_TYPES["gzip"],
        MEDIA_TYPES["zstd"],
        MEDIA_TYPES["none"],
    ]
    config = json.loads(_blob(layout, manifest["config"]["digest"]))
    assert (config["architecture"], config["os"]) == ("amd64", "linux")
    assert set(config["config"]) >= {"Env", "Cmd", "WorkingDir", "Entrypoint", "User", "Labels"}
    assert len(config["history"]) == 3
    raw = [
        gzip.decompress(_blob(layout, manifest["layers"][0]["digest"])),
        zstandard.ZstdDecompressor()
        .decompressobj()
        .decompress(_blob(layout, manifest["layers"][1]["digest"])),
        _blob(layout, manifest["layers"][2]["digest"]),
    ]
    assert config["rootfs"]["diff_ids"] == ["sha256:" + hashlib.sha256(r).hexdigest() for r in raw]
    for d in [desc, manifest["config"], *manifest["layers"]]:
        assert len(_blob(layout, d["digest"])) == d["size"]


def test_second_tag_is_appended_and_retag_replaces(tmp_path: Path) -> None:
    layers = [[file_entry("x", b"1")]]
    build_oci_image(tmp_path, "a", layers)
    build_oci_image(tmp_path, "b", layers, config=ImageConfig(cmd=["/bin/true"]))
    build_oci_image(tmp_path, "a", [[file_entry("x", b"2")]])
    refs = [
        m["annotations"]["org.opencontainers.image.ref.name"]
        for m in json.loads((tmp_path / "index.json").read_text())["manifests"]
    ]
    assert sorted(refs) == ["a", "b"]
    rootfs = umoci_unpack(tmp_path, "a", tmp_path / "rootfs-a")
    assert (rootfs / "x").read_bytes() == b"2"


def test_layer_tar_keeps_raw_non_utf8_names_and_xattrs() -> None:
    tar = layer_tar([file_entry(NON_UTF8, b"z", xattrs={"user.k": b"\xff\x00"})])
    import io

    with tarfile.open(fileobj=io.BytesIO(tar), encoding="utf-8", errors="surrogateescape") as tf:
        (member,) = tf.getmembers()
    assert os.fsencode(member.name) == NON_UTF8
    assert member.pax_headers["SCHILY.xattr.user.k"].encode("utf-8", "surrogateescape") == (
        b"\xff\x00"
    )


# ---------------------------------------------------------------------------------------
# umoci + walk_tree: what a runtime sees


def test_unpacked_tree_has_every_entry_kind(synthetic: tuple[Path, dict]) -> None:
    _, t = synthetic
    assert t[b"."]["type"] == "dir"
    assert t[b"etc"]["type"] == "dir" and t[b"etc/hello"]["type"] == "file"
    assert t[b"bin/sh"]["type"] == "symlink" and t[b"bin/sh"]["target"] == b"tool"
    assert t[b"bin/sh"]["size"] == len(b"tool")
    assert t[b"bin/sh"]["mtime"] == MTIME and t[b"etc"]["mtime"] == MTIME
    assert t[b"dev/null2"]["type"] == "chardev" and t[b"dev/null2"]["rdev"] == (1, 3)
    assert t[b"dev/loopx"]["type"] == "blockdev" and t[b"dev/loopx"]["rdev"] == (7, 200)
    assert t[b"run/fifo"]["type"] == "fifo"
    assert stat.S_IMODE(t[b"run/fifo"]["mode"]) == 0o600


def test_unpacked_modes_keep_setuid_setgid_sticky(synthetic: tuple[Path, dict]) -> None:
    _, t = synthetic
    assert t[b"bin/tool"]["mode"] == stat.S_IFREG | 0o4755
    assert t[b"tmp"]["mode"] == stat.S_IFDIR | 0o1777
    assert t[b"srv"]["mode"] == stat.S_IFDIR | 0o2775
    assert t[b"srv"]["gid"] == 50


def test_unpacked_hardlinks_form_one_group(synthetic: tuple[Path, dict]) -> None:
    _, t = synthetic
    group = [b"bin/tool", b"bin/tool-link"]
    assert t[b"bin/tool"]["hardlinks"] == group
    assert t[b"bin/tool-link"]["hardlinks"] == group
    assert t[b"bin/tool"]["nlink"] == 2
    assert "hardlinks" not in t[b"etc/hello"]


def test_unpacked_xattrs_owner_and_content(synthetic: tuple[Path, dict]) -> None:
    _, t = synthetic
    hello = t[b"etc/hello"]
    assert hello["xattrs"] == {"user.greeting": b"hello"}  # upper layer replaced the file
    assert (hello["uid"], hello["gid"]) == (1000, 1001)
    assert hello["sha256"] == hashlib.sha256(b"hello again\n").hexdigest()
    assert hello["size"] == len(b"hello again\n")
    assert hello["mtime"] == MTIME + 1
    assert (t[b"bigid"]["uid"], t[b"bigid"]["gid"]) == (3_000_000, 3_000_001)
    assert t[b"data.bin"]["sha256"] == hashlib.sha256(BIG).hexdigest()
    assert t[b"data.bin"]["mtime"] == MTIME + 2


def test_unpacked_names_long_utf8_and_non_utf8(synthetic: tuple[Path, dict]) -> None:
    _, t = synthetic
    assert LONG_NAME.encode() in t
    assert NON_UTF8 in t and t[NON_UTF8]["sha256"] == hashlib.sha256(b"latin-1 name\n").hexdigest()
    assert "naïve.txt".encode() in t


def test_unpacked_whiteouts_applied(synthetic: tuple[Path, dict]) -> None:
    _, t = synthetic
    assert b"etc/gone" not in t
    assert b"opq/c" in t and b"opq/a" not in t and b"opq/b" not in t
    assert not [p for p in t if b".wh." in p]


def test_unpacked_directory_nlink_counts_subdirectories(synthetic: tuple[Path, dict]) -> None:
    _, t = synthetic
    subdirs = sum(1 for p, r in t.items() if r["type"] == "dir" and p != b"." and b"/" not in p)
    assert t[b"."]["nlink"] == 2 + subdirs
    assert t[b"etc"]["nlink"] == 2


def test_xattr_on_first_layer_file_survives(tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    build_oci_image(layout, "t", [[file_entry("f", b"x", xattrs={"trusted.k": b"\x00v"})]])
    t = walk_tree(umoci_unpack(layout, "t", tmp_path / "rootfs"))
    assert t[b"f"]["xattrs"] == {"trusted.k": b"\x00v"}


def test_docker_archive_matches_oci_layout_through_skopeo(tmp_path: Path) -> None:
    layers = [
        [dir_entry("etc"), file_entry("etc/a", b"a\n", uid=5), symlink_entry("l", "etc/a")],
        [whiteout("etc/a"), file_entry("etc/b", b"b\n", mode=0o600)],
    ]
    archive = tmp_path / "image.tar"
    build_docker_archive(archive, layers, repo_tag="example/app:1")
    with tarfile.open(archive) as tf:
        (entry,) = json.load(tf.extractfile("manifest.json"))  # type: ignore[arg-type]
        config = json.load(tf.extractfile(entry["Config"]))  # type: ignore[arg-type]
        layer_digests = [
            "sha256:" + hashlib.sha256(tf.extractfile(p).read()).hexdigest()  # type: ignore[union-attr]
            for p in entry["Layers"]
        ]
    assert entry["RepoTags"] == ["example/app:1"]
    assert config["rootfs"]["diff_ids"] == layer_digests

    run(
        ["skopeo", "copy", f"docker-archive:{archive}", f"oci:{tmp_path / 'via-skopeo'}:x"],
        check=True,
        timeout=120,
    )
    build_oci_image(tmp_path / "direct", "x", layers)
    a = umoci_unpack(tmp_path / "via-skopeo", "x", tmp_path / "a")
    b = umoci_unpack(tmp_path / "direct", "x", tmp_path / "b")
    assert compare_trees(a, b, ignore={b"."}) == []  # the root dir is umoci's own
    assert b"etc/b" in walk_tree(a) and b"etc/a" not in walk_tree(a)


# ---------------------------------------------------------------------------------------
# compare_trees: it must see every kind of difference


def _make_tree(root: Path) -> None:
    (root / "d/sub").mkdir(parents=True)
    (root / "d/file").write_bytes(b"0123456789")
    os.setxattr(root / "d/file", "user.tag", b"one")
    os.link(root / "d/file", root / "d/file-link")
    os.symlink("file", root / "d/sym")
    os.mkfifo(root / "fifo")
    os.mknod(root / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    (root / "plain").write_bytes(b"plain")
    for rel in walk_tree(root):
        os.utime(os.path.join(os.fsencode(root), rel), (MTIME, MTIME), follow_symlinks=False)


def _same_mtime(p: Path, change: Callable[[], None]) -> None:
    st = os.lstat(p)
    change()
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def _flip_byte(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[3] ^= 0x01
    with open(p, "r+b") as f:
        f.write(data)


MUTATIONS: dict[str, tuple[Callable[[Path], None], list[str]]] = {
    "mode": (lambda r: os.chmod(r / "plain", 0o600), ["plain: mode 0o100644 != 0o100600"]),
    "byte": (
        lambda r: _same_mtime(r / "plain", lambda: _flip_byte(r / "plain")),
        ["plain: sha256 "],
    ),
    "missing": (lambda r: _same_mtime(r, (r / "plain").unlink), ["plain: only in "]),
    "extra": (
        lambda r: _same_mtime(r, lambda: (r / "new").write_bytes(b"")),
        ["new: only in "],
    ),
    "xattr": (
        lambda r: os.setxattr(r / "d/file", "user.tag", b"two"),
        ["d/file: xattrs ", "d/file-link: xattrs "],
    ),
    "owner": (lambda r: os.chown(r / "plain", 1, 2), ["plain: uid 0 != 1", "plain: gid 0 != 2"]),
    "mtime": (lambda r: os.utime(r / "plain", (1, 1)), ["plain: mtime "]),
    "symlink target": (
        lambda r: _same_mtime(
            r / "d", lambda: (os.unlink(r / "d/sym"), os.symlink("fil", r / "d/sym"))
        ),
        ["d/sym: size 4 != 3", "d/sym: mtime ", "d/sym: target b'file' != b'fil'"],
    ),
    "hardlink broken": (
        lambda r: _same_mtime(
            r / "d",
            lambda: (os.unlink(r / "d/file-link"), shutil.copy2(r / "d/file", r / "d/file-link")),
        ),
        [
            "d/file: nlink 2 != 1",
            "d/file: hardlinks ",
            "d/file-link: nlink 2 != 1",
            "d/file-link: hardlinks ",
        ],
    ),
    "device": (
        lambda r: _same_mtime(
            r,
            lambda: (
                os.unlink(r / "null"),
                os.mknod(r / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 5)),
            ),
        ),
        ["null: mtime ", "null: rdev (1, 3) != (1, 5)"],
    ),
    "dir nlink": (
        lambda r: _same_mtime(r / "d", lambda: (r / "d/sub2").mkdir()),
        ["d: nlink 3 != 4", "d/sub2: only in "],
    ),
}


@pytest.fixture
def twin_trees(tmp_path: Path) -> tuple[Path, Path]:
    a, b = tmp_path / "a", tmp_path / "b"
    for root in (a, b):
        root.mkdir()
        _make_tree(root)
    return a, b


def test_compare_trees_finds_identical_trees_identical(twin_trees: tuple[Path, Path]) -> None:
    a, b = twin_trees
    assert compare_trees(a, b) == []


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_compare_trees_reports_each_difference(
    twin_trees: tuple[Path, Path], mutation: str
) -> None:
    a, b = twin_trees
    change, expected = MUTATIONS[mutation]
    change(b)
    diffs = compare_trees(a, b)
    assert len(diffs) == len(expected), diffs
    for line, prefix in zip(sorted(diffs), sorted(expected), strict=True):
        assert line.startswith(prefix), diffs


def test_compare_trees_ignore_paths_and_fields(twin_trees: tuple[Path, Path]) -> None:
    a, b = twin_trees
    os.utime(b / "plain", (1, 1))
    _same_mtime(b / "d", lambda: (b / "d/sub/x").write_bytes(b"x"))
    assert compare_trees(a, b, ignore={b"d/sub"}, ignore_fields={"mtime"}) == []
    assert compare_trees(a, b, ignore={b"d/sub"}) == [f"plain: mtime {MTIME} != 1"]


def test_walk_tree_reports_non_utf8_names_as_bytes(tmp_path: Path) -> None:
    (tmp_path / os.fsdecode(NON_UTF8)).write_bytes(b"")
    assert set(walk_tree(tmp_path)) == {b".", NON_UTF8}
    other = tmp_path.parent / "empty"
    other.mkdir()
    assert compare_trees(tmp_path, other, ignore={b"."}) == [f"caf\\xe9: only in {tmp_path}"]


# ---------------------------------------------------------------------------------------
# procs


def _result(rc: int, stderr: str) -> subprocess.CompletedProcess[str]:
    return subprocess.CompletedProcess(["rafs"], rc, "", stderr)


def test_assert_clean_error_accepts_one_rafs_error_line() -> None:
    assert assert_clean_error(_result(1, "rafs: error: no such image\n")) == (
        "rafs: error: no such image"
    )


@pytest.mark.parametrize(
    "rc, stderr",
    [
        (0, "rafs: error: but it succeeded\n"),
        (1, "Traceback (most recent call last):\n  boom\nrafs: error: x\n"),
        (1, "rafs: error: one\nrafs: error: two\n"),
        (1, "error: no prefix\n"),
        (1, ""),
    ],
)
def test_assert_clean_error_rejects_unclean_failures(rc: int, stderr: str) -> None:
    with pytest.raises(AssertionError):
        assert_clean_error(_result(rc, stderr))


def test_run_kills_the_process_group_on_timeout() -> None:
    with pytest.raises(CommandTimeout):
        run(["sh", "-c", "sleep 30 & sleep 30"], timeout=0.5)


def test_run_passes_input_and_env() -> None:
    r = run(
        [sys.executable, "-c", "import os,sys; print(os.environ['X'] + sys.stdin.read())"],
        input="b",
        env={"X": "a"},
        check=True,
    )
    assert r.stdout == "ab\n"


# ---------------------------------------------------------------------------------------
# The Debian reference image


def test_debian_image_has_two_gzip_layers_and_python3(
    debian_image: tuple[Path, str], tmp_path: Path
) -> None:
    layout, tag = debian_image
    index = json.loads((layout / "index.json").read_text())
    (desc,) = [
        m
        for m in index["manifests"]
        if m["annotations"]["org.opencontainers.image.ref.name"] == tag
    ]
    manifest = json.loads(_blob(layout, desc["digest"]))
    assert [lay["mediaType"] for lay in manifest["layers"]] == [MEDIA_TYPES["gzip"]] * 2
    config = json.loads(_blob(layout, manifest["config"]["digest"]))
    assert config["config"]["Cmd"] == ["python3"]
    rootfs = umoci_unpack(layout, tag, tmp_path / "rootfs")
    python = rootfs / "usr/bin/python3"
    assert python.is_symlink() and (rootfs / "usr/bin" / os.readlink(python)).is_file()
    assert not list((rootfs / "var/lib/apt/lists").glob("*_Packages"))
    assert not (rootfs / "usr/sbin/policy-rc.d").exists()
    assert not _mounts_below(layout.parent)


def _mounts_below(path: Path) -> list[str]:
    base = str(path.resolve())
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    return [p for p in points if p == base or p.startswith(base + "/")]


def _blob(layout: Path, digest: str) -> bytes:
    algo, _, hexdigest = digest.partition(":")
    return (layout / "blobs" / algo / hexdigest).read_bytes()
