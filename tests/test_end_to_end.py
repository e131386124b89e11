"""Convert real and synthetic images with the CLI, then check the result every way.

For each image: `rafs check` passes; fsck.erofs accepts the bootstrap; the kernel
mounts it (blobs written out uncompressed as extra devices); and a FUSE mount by
the daemon, and a kernel-mode mount (EROFS over the daemon's blob filesystem),
show the tree that `umoci unpack` of the source gives, field by field: type,
mode, uid, gid, size, mtime, nlink, hardlink groups, rdev, symlink target,
xattrs and content. Reading one small file in kernel mode fetches no more than
one amplified backend read.
"""

from __future__ import annotations

import subprocess

import pytest

from tests.helpers.edgecases import LAYERS
from tests.helpers.images import write_flat_blobs
from tests.helpers.kernel import erofs_mounted
from tests.helpers.mounts import mounted, rafs_cmd, read_stats
from tests.helpers.ocibuild import build_oci_image
from tests.helpers.procs import run
from tests.helpers.treecmp import compare_trees
from tests.helpers.umoci import umoci_unpack

pytestmark = [pytest.mark.fuse]


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


def test_the_kernel_mode_mount_shows_what_umoci_unpacks(converted, tmp_path):
    ref, rootfs, _work = converted
    with mounted(ref, tmp_path / "mnt", tmp_path / "cache", mode="kernel") as mnt:
        assert compare_trees(rootfs, mnt, ignore={b"."}) == []
        reply = read_stats(mnt)
    assert reply["mode"] == "kernel"
    s = reply["stats"]
    assert s["errors"] == 0 and s["digest_failures"] == 0  # type: ignore[index]
    # Metadata never left the kernel: the blob filesystem saw only blob reads
    # and the EROFS driver opening its devices.
    ops = s["fuse_requests_by_op"]  # type: ignore[index]
    assert ops["read"] > 0 and set(ops) <= {"lookup", "getattr", "open", "read", "forget"}


def test_reading_one_small_file_in_kernel_mode_fetches_one_amplified_range(converted, tmp_path):
    ref, rootfs, _work = converted
    small = min((p for p in rootfs.rglob("*") if p.is_file() and not p.is_symlink()
                 and 0 < p.stat().st_size <= 4096), key=lambda p: p.as_posix())
    with mounted(ref, tmp_path / "mnt", tmp_path / "cache", mode="kernel",
                 extra_args=["--no-prefetch"]) as mnt:
        assert (mnt / small.relative_to(rootfs)).read_bytes() == small.read_bytes()
        s = read_stats(mnt)["stats"]
    assert s["backend_requests"] == 1  # type: ignore[index]
    assert 0 < s["backend_bytes"] <= 1 << 20  # type: ignore[index,operator]
