"""Prefetch from an access trace, end to end through the real registry.

A workload (`python3 -c 'import numpy'` in a chroot on the mount) is traced by
the daemon; `rafs trace` prints the files in first-access order; the image
converted with that list and mounted with --prefetch fetches them in the
background, in few large Range requests, and the workload then reads only
from the cache.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers.mounts import mounted, rafs_cmd, read_stats
from tests.helpers.procs import run

pytestmark = [pytest.mark.fuse, pytest.mark.root]  # a chroot on the mount

WORKLOAD = ["python3", "-c", "import numpy"]


def _workload(mnt: Path) -> None:
    res = subprocess.run(["chroot", str(mnt), *WORKLOAD], capture_output=True, text=True,
                         check=False, timeout=300)
    assert res.returncode == 0, res.stderr


def _wait_prefetch(mnt: Path, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        stats = read_stats(mnt)["stats"]
        if stats["prefetch"]["state"] != "running":
            return stats
        assert time.monotonic() < deadline, f"prefetch still running: {stats['prefetch']}"
        time.sleep(0.2)


def test_a_traced_workload_is_served_from_prefetch(
    registry, rafs_numpy_ref, debian_numpy_image, tmp_path
):
    with mounted(rafs_numpy_ref, tmp_path / "m1", tmp_path / "c1") as mnt:
        _workload(mnt)
        res = run(rafs_cmd("trace", mnt), timeout=60)
        assert res.returncode == 0, res.stderr
        cold = read_stats(mnt)["stats"]
    trace = res.stdout.splitlines()
    assert any("/dist-packages/numpy/" in line for line in trace), trace[:20]
    assert any("/libpython3" in line or "/python3" in line for line in trace)
    listing = tmp_path / "prefetch.txt"
    listing.write_text(res.stdout)

    src, tag = debian_numpy_image
    optimized = registry.ref("rafs/debian", "numpy-opt")
    res = run(rafs_cmd("convert", f"oci:{src}:{tag}", optimized, "--no-progress",
                       "--prefetch-list", listing), timeout=600)
    assert res.returncode == 0, res.stderr

    with mounted(optimized, tmp_path / "m2", tmp_path / "c2", extra_args=["--prefetch"]) as mnt:
        prefetched = _wait_prefetch(mnt)
        assert prefetched["prefetch"]["state"] == "done"
        assert prefetched["prefetch"]["fetched"] > 0
        _workload(mnt)
        after = read_stats(mnt)["stats"]
    # Every read of the workload hit the cache: no on-demand fetch at all.
    assert after["requests"]["ondemand"] == 0, after
    assert after["cache_misses"] == 0
    assert after["cache_hits"] > 0
    # The startup set came in a handful of large requests, not one per file.
    assert after["requests"]["prefetch"] <= 3, after["requests"]
    assert cold["requests"]["ondemand"] > after["requests"]["prefetch"]
