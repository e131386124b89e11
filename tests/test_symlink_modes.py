"""A symlink is 0777 (``lrwxrwxrwx``) whatever mode its tar header stores.

Linux symlinks have no permission bits of their own: every Linux filesystem,
and umoci's unpack, show 0777. The image here stores an absolute symlink, a
dangling one and a versioned library link with mode 0644 (as some image
builders do); the fuse mount, the kernel EROFS mount, the eager unpack of
``rafs run`` and umoci must all show ``S_IFLNK | 0777`` for each, with their
targets intact.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from converter.convert import ConvertOptions, convert
from runtime.image import resolve_image
from runtime.unpack import unpack_into
from tests.helpers.mounts import mounted
from tests.helpers.ocibuild import build_oci_image, dir_entry, file_entry, symlink_entry
from tests.helpers.umoci import umoci_unpack

pytestmark = [pytest.mark.fuse, pytest.mark.kernel]

LINKS = {
    "etc/localtime": b"/usr/share/zoneinfo/UTC",  # absolute (and dangling here)
    "usr/lib/libgone.so": b"libgone.so.1",  # dangling
    "usr/lib/libz.so.1": b"libz.so.1.2.13",  # versioned library link
}


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("symlinks") / "src"
    build_oci_image(src, "t", [[
        dir_entry("etc"), dir_entry("usr"), dir_entry("usr/lib"),
        file_entry("usr/lib/libz.so.1.2.13", b"\x7fELF" * 2000, mode=0o755),
        *(symlink_entry(name, target, mode=0o644) for name, target in LINKS.items()),
    ]])
    return src


def _assert_0777(root: Path) -> None:
    for name, target in LINKS.items():
        st = os.lstat(root / name)
        assert st.st_mode == stat.S_IFLNK | 0o777, f"{name}: {st.st_mode:o}"
        assert os.readlink(os.fsencode(root / name)) == target


@pytest.mark.parametrize("mode", ["fuse", "kernel"])
def test_a_mount_shows_symlinks_0777(source: Path, tmp_path: Path, mode: str) -> None:
    ref = f"oci:{tmp_path / 'rafs'}:t"
    convert(f"oci:{source}:t", ref, ConvertOptions(progress=False))
    with mounted(ref, tmp_path / "mnt", tmp_path / "cache", mode=mode) as mnt:
        _assert_0777(mnt)
        assert (mnt / "usr/lib/libz.so.1").read_bytes() == b"\x7fELF" * 2000


def test_the_eager_unpack_and_umoci_show_symlinks_0777(source: Path, tmp_path: Path) -> None:
    (tmp_path / "eager").mkdir()
    unpack_into(resolve_image(f"oci:{source}:t"), tmp_path / "eager")
    _assert_0777(tmp_path / "eager")
    _assert_0777(umoci_unpack(source, "t", tmp_path / "umoci"))
