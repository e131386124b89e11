"""The eager tree (``runtime.unpack``) on disk: the layer model's decisions, made real.

The rules themselves are tested on the lazy tree (test_convert_layers) and
compared across every tree by the property test; here are the things only a
real directory can get wrong: directory metadata that later entries would
disturb, hardlinks across layers, and a refusal that must leave no half tree
behind in ``rafs run``'s rootfs cache.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from converter.convert import ConvertOptions, convert
from converter.errors import BadTarError
from runtime.image import resolve_image
from runtime.unpack import ensure_rootfs, unpack_into
from tests.helpers.ocibuild import Entry, build_oci_image, dir_entry, file_entry

pytestmark = [pytest.mark.root]


def _unpack(tmp_path: Path, layers: list[list[Entry]]) -> Path:
    build_oci_image(tmp_path / "src", "t", layers)
    root = tmp_path / "root"
    root.mkdir()
    unpack_into(resolve_image(f"oci:{tmp_path / 'src'}:t"), root)
    return root


def test_directory_metadata_is_the_last_entry_s_and_survives_later_children(
        tmp_path: Path) -> None:
    root = _unpack(tmp_path, [
        [dir_entry("./", mode=0o750, mtime=5), dir_entry("ro", mode=0o500, uid=9, mtime=100),
         file_entry("ro/a", b"a", mtime=7)],
        [file_entry("ro/b", b"b"), dir_entry("g", mode=0o2775, gid=50, mtime=200),
         file_entry("g/implied/f", b"f")],
    ])
    ro = os.lstat(root / "ro")
    assert (stat.S_IMODE(ro.st_mode), ro.st_uid, ro.st_mtime) == (0o500, 9, 100)
    assert sorted(os.listdir(root / "ro")) == ["a", "b"]
    assert os.lstat(root / "ro/a").st_mtime == 7
    implied = os.lstat(root / "g/implied")
    assert (stat.S_IMODE(implied.st_mode), implied.st_gid, implied.st_mtime) == (0o2755, 50, 0)
    top = os.lstat(root)
    assert (stat.S_IMODE(top.st_mode), top.st_mtime) == (0o750, 5)


def test_a_hardlink_into_a_lower_layer_is_one_inode(tmp_path: Path) -> None:
    root = _unpack(tmp_path, [[file_entry("bin/busybox", b"\x7fELF", mode=0o755)],
                              [Entry("bin/sh", "hardlink", linkname="bin/busybox"),
                               file_entry("bin/.wh.busybox")]])
    assert sorted(os.listdir(root / "bin")) == ["sh"]  # the whiteout only hid the lower name
    layers = [[file_entry("a", b"1")], [Entry("b", "hardlink", linkname="a")]]
    root = _unpack(tmp_path / "two", layers)
    assert os.lstat(root / "a").st_ino == os.lstat(root / "b").st_ino
    assert os.lstat(root / "a").st_nlink == 2


def test_a_parent_that_is_a_file_is_refused_as_the_converter_refuses_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    layers = [[file_entry("etc", b"not a directory")], [file_entry("etc/passwd", b"root")]]
    build_oci_image(tmp_path / "src", "t", layers)
    src = f"oci:{tmp_path / 'src'}:t"
    with pytest.raises(BadTarError, match="is not a directory"):
        convert(src, f"oci:{tmp_path / 'rafs'}:t", ConvertOptions(progress=False))
    monkeypatch.setenv("RAFS_ROOT", str(tmp_path / "rafs-root"))
    with pytest.raises(BadTarError, match="is not a directory"):
        ensure_rootfs(resolve_image(src))
    (cached,) = (tmp_path / "rafs-root" / "rootfs").iterdir()
    assert os.listdir(cached) == [".lock"]  # no half tree that could pass for done
