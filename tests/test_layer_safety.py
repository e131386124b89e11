"""Hostile layers: nothing is ever written, linked or removed outside the target.

Each case is a real image whose layers try to escape: ``..`` and absolute
names, hardlinks to host files, writes, whiteouts and opaque whiteouts
through symlinks that point outside, a symlinked root, a directory swapped
for a symlink between layers, a file or link over a symlink to a host file.
Both trees built from ``converter.layermodel`` must either refuse the image
with one clean error (a ``RafsError``) or keep every change inside the root:
``rafs convert`` and the eager unpack of ``rafs run`` (which writes a real
directory). A directory outside the root, with a file in it, is the bait; it
must be exactly as it was afterwards.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from converter.convert import ConvertOptions, convert
from converter.errors import ConvertError
from rafs.errors import RafsError
from runtime.image import resolve_image
from runtime.unpack import unpack_into
from tests.helpers.ocibuild import (
    Entry,
    build_oci_image,
    dir_entry,
    file_entry,
    opaque_whiteout,
    symlink_entry,
)
from tests.helpers.treecmp import walk_tree

REFUSED = None
Layers = list[list[Entry]]
# name -> (layers given the bait directory, what the unpacked root holds, or REFUSED)
CASES: dict[str, Callable[[str], tuple[Layers, dict[str, bytes] | None]]] = {
    "dot-dot name": lambda o: ([[file_entry("../evil", b"x")]], REFUSED),
    "dot-dot in the middle": lambda o: ([[file_entry("a/../../evil", b"x")]], REFUSED),
    "absolute name": lambda o: ([[file_entry(o + "/evil", b"x")]], REFUSED),
    "double-slash name": lambda o: ([[file_entry("/" + o + "/evil", b"x")]], REFUSED),
    "hardlink up": lambda o: ([[Entry("h", "hardlink", linkname="../bait")]], REFUSED),
    "hardlink to a host file": lambda o: ([[Entry("h", "hardlink", linkname=o + "/bait")]],
                                          REFUSED),
    "hardlink through a symlink out": lambda o: (
        [[symlink_entry("esc", o), Entry("h", "hardlink", linkname="esc/bait")]], REFUSED),
    "write through an absolute symlink": lambda o: (
        [[symlink_entry("esc", o)], [file_entry("esc/owned", b"x")]],
        {o.lstrip("/") + "/owned": b"x"}),
    "write through a climbing symlink": lambda o: (
        [[symlink_entry("up", "../../../../../.."), file_entry("up/owned", b"x")]],
        {"owned": b"x"}),
    "write through a chain of symlinks": lambda o: (
        [[symlink_entry("a", "b"), symlink_entry("b", o)], [file_entry("a/owned", b"x")]],
        {o.lstrip("/") + "/owned": b"x"}),
    "whiteout through a symlink out": lambda o: (
        [[symlink_entry("esc", o)], [file_entry("esc/.wh.bait")]], {}),
    "opaque whiteout through a symlink out": lambda o: (
        [[symlink_entry("esc", o)], [opaque_whiteout("esc")]], {}),
    "whiteout of dot-dot": lambda o: ([[file_entry(".wh..."), file_entry("x")]], REFUSED),
    "whiteout above the root": lambda o: ([[file_entry("../.wh.bait")]], REFUSED),
    "root entry as a symlink": lambda o: ([[Entry("./", "symlink", linkname=o)]], REFUSED),
    "directory swapped for a symlink": lambda o: (
        [[dir_entry("d")], [symlink_entry("d", o)], [file_entry("d/owned", b"x")]],
        {o.lstrip("/") + "/owned": b"x"}),
    "write through a hardlinked symlink": lambda o: (
        [[symlink_entry("esc", o), Entry("h", "hardlink", linkname="esc")],
         [file_entry("h/owned", b"x")]], {o.lstrip("/") + "/owned": b"x"}),
    "file over a symlink to a host file": lambda o: (
        [[symlink_entry("esc", o + "/bait")], [file_entry("esc", b"mine")]], {"esc": b"mine"}),
    "hardlink over a symlink to a host file": lambda o: (
        [[file_entry("a", b"mine"), symlink_entry("esc", o + "/bait")],
         [Entry("esc", "hardlink", linkname="a")]], {"esc": b"mine"}),
    "symlink loop as a parent": lambda o: (
        [[symlink_entry("l", "l"), file_entry("l/x", b"x")]], REFUSED),
    "a name too long": lambda o: ([[file_entry("d/" + "n" * 256, b"")]], REFUSED),
}


@pytest.fixture
def bait(tmp_path: Path) -> Path:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "bait").write_bytes(b"host data")
    return outside


def _image(tmp_path: Path, case: str, bait: Path) -> tuple[str, dict[str, bytes] | None]:
    layers, expected = CASES[case](str(bait))
    build_oci_image(tmp_path / "src", "t", layers, compression="none")
    return f"oci:{tmp_path / 'src'}:t", expected


@pytest.mark.root
@pytest.mark.parametrize("case", sorted(CASES))
def test_the_eager_unpack_stays_inside_the_root(tmp_path: Path, bait: Path, case: str) -> None:
    src, expected = _image(tmp_path, case, bait)
    before = _outside_the_root(tmp_path)
    root = tmp_path / "root"
    root.mkdir()
    if expected is REFUSED:
        with pytest.raises(RafsError):
            unpack_into(resolve_image(src), root)
    else:
        unpack_into(resolve_image(src), root)
        for name, data in expected.items():
            assert (root / name).read_bytes() == data
    assert _outside_the_root(tmp_path) == before
    assert (bait / "bait").read_bytes() == b"host data"


def _outside_the_root(tmp_path: Path) -> dict[bytes, object]:
    """Everything in the test's directory but the unpack root (and the directory itself,
    whose mtime the root's creation changes)."""
    return {p: r for p, r in walk_tree(tmp_path).items()
            if p not in (b".", b"root") and not p.startswith(b"root/")}


@pytest.mark.parametrize("case", sorted(CASES))
def test_convert_refuses_what_the_unpack_refuses(tmp_path: Path, bait: Path, case: str) -> None:
    src, expected = _image(tmp_path, case, bait)
    dst = f"oci:{tmp_path / 'rafs'}:t"
    if expected is REFUSED:
        with pytest.raises(ConvertError):
            convert(src, dst, ConvertOptions(progress=False))
        assert not (tmp_path / "rafs").exists()
    else:
        convert(src, dst, ConvertOptions(progress=False))
    assert sorted(os.listdir(bait)) == ["bait"]
    assert (bait / "bait").read_bytes() == b"host data"
