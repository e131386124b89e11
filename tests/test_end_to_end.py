"""Convert real and synthetic images with the CLI, then check the result every way.

For each image: `rafs check` passes; fsck.erofs accepts the bootstrap; the kernel
mounts it (blobs written out uncompressed as extra devices); and a FUSE mount by
the daemon shows the tree that `umoci unpack` of the source gives, field by
field: type, mode, uid, gid, size, mtime, nlink, hardlink groups, rdev, symlink
target, xattrs and content.
"""

from __future__ import annotations

import subprocess

import pytest

from tests.helpers.edgecases import LAYERS
from tests.helpers.images import write_flat_blobs
from tests.helpers.kernel import erofs_mounted
from tests.helpers.mounts import mounted, rafs_cmd
from tests.helpers.ocibuild import build_oci_image
from tests.helpers.procs import run
from tests.helpers.treecmp import compare_trees
from tests.helpers.umoci import umoci_unpack


@pytest.fixture(params=["synthetic", "debian"], scope="module")
def converted(request, tmp_path_factory):
    """(source layout, tag, converted ref, umoci rootfs, work dir) for each image."""
    work = tmp_path_factory.mktemp(request.param)
    if request.param == "synthetic":
        src, tag = work / "src", "edge"
        build_oci_image(src, tag, LAYERS, compression=["gzip", "zstd", "none"])
        extra = ["--chunk-size", "64K"]
    else:
        src, tag = request.getfixturevalue("debian_image")
        extra = []
    ref = f"oci:{work / 'rafs'}:{tag}"
    res = run(rafs_cmd("convert", f"oci:{src}:{tag}", ref, "--no-progress", *extra),
              timeout=600)
    assert res.returncode == 0, res.stderr
    rootfs = umoci_unpack(src, tag, work / "umoci")
    return ref, rootfs, work


def test_rafs_check_verifies_the_image(converted):
    ref, _rootfs, _work = converted
    res = run(rafs_cmd("check", ref), timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("ok:")


def test_fsck_erofs_accepts_the_bootstrap(converted):
    ref, _rootfs, work = converted
    boot, flats = write_flat_blobs(ref, work / "flat")
    res = subprocess.run(["fsck.erofs", *(f"--device={f}" for f in flats), str(boot)],
                         capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr + res.stdout


def test_the_kernel_mounts_the_bootstrap_as_umoci_unpacks_the_source(converted, tmp_path):
    ref, rootfs, work = converted
    boot, flats = write_flat_blobs(ref, work / "flat")
    with erofs_mounted(boot, tmp_path / "kmnt", flats) as mnt:
        assert compare_trees(rootfs, mnt, ignore={b"."}) == []


def test_the_fuse_mount_shows_what_umoci_unpacks(converted, tmp_path):
    ref, rootfs, _work = converted
    with mounted(ref, tmp_path / "mnt", tmp_path / "cache") as mnt:
        assert compare_trees(rootfs, mnt, ignore={b"."}) == []
