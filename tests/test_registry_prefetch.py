"""Prefetch from an access trace, end to end through the real registry.

A workload (`python3 -c 'import numpy'` in a chroot on the mount) is traced by
the daemon; `rafs trace` prints the files (or with --ranges the byte ranges) it
read in first-access order; the image converted with that list and mounted
with --prefetch fetches its start-up set in the background, in a few large
Range requests, and the workload then reads only from the cache. Requests are
counted in the registry's own access log.
"""

from __future__ import annotations

import itertools
import math
import subprocess
import time
from pathlib import Path

import pytest

from fused.fetcher import PREFETCH_MERGE
from rafs.bootstrap import Bootstrap
from rafs.image import open_image
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


def _max_requests(boot: Bootstrap) -> int:
    """N: the start-up set's requests as the fetcher plans them, at most: per blob, one
    per PREFETCH_MERGE bytes of its start-up chunks plus one per stretch they fill."""
    spans: dict[int, list[tuple[int, int]]] = {}
    for i in boot.prefetch_chunks():
        c = boot.chunk(i)
        spans.setdefault(c.blob_index, []).append((c.compressed_offset, c.compressed_size))
    n = 0
    for s in spans.values():
        s.sort()
        stretches = 1 + sum(b[0] - (a[0] + a[1]) > 128 << 10 for a, b in itertools.pairwise(s))
        n += stretches + math.ceil(sum(size for _, size in s) / PREFETCH_MERGE)
    return n


@pytest.fixture(scope="module")
def traced(registry, rafs_numpy_ref: str, tmp_path_factory: pytest.TempPathFactory
           ) -> dict[str, object]:
    """The workload run once on the lazy image: both forms of its trace, and its stats."""
    tmp = tmp_path_factory.mktemp("traced")
    with mounted(rafs_numpy_ref, tmp / "m", tmp / "c") as mnt:
        _workload(mnt)
        paths = run(rafs_cmd("trace", mnt), timeout=60)
        ranges = run(rafs_cmd("trace", "--ranges", mnt), timeout=60)
        cold = read_stats(mnt)["stats"]
    assert paths.returncode == 0 and ranges.returncode == 0, paths.stderr + ranges.stderr
    return {"paths": paths.stdout, "ranges": ranges.stdout, "cold": cold, "tmp": tmp}


@pytest.mark.parametrize("form", ["paths", "ranges"])
def test_a_traced_workload_is_served_from_prefetch(
    registry, debian_numpy_image, traced, form: str, tmp_path: Path
):
    listing_text = traced[form]
    assert isinstance(listing_text, str)
    lines = listing_text.splitlines()
    assert any("/dist-packages/numpy/" in line for line in lines), lines[:20]
    assert any("/libpython3" in line or "/python3" in line for line in lines)
    if form == "ranges":
        assert all(line.split(" ", 2)[0].isdigit() for line in lines)
    listing = tmp_path / "prefetch.txt"
    listing.write_text(listing_text)

    src, tag = debian_numpy_image
    optimized = registry.ref("rafs/debian", f"numpy-opt-{form}")
    res = run(rafs_cmd("convert", f"oci:{src}:{tag}", optimized, "--no-progress",
                       "--prefetch-list", listing), timeout=600)
    assert res.returncode == 0, res.stderr
    with open_image(optimized) as image:
        boot = Bootstrap.from_bytes(image.bootstrap)
        blob_digests = {d.digest for d in image.manifest.layers[:-1]}
    assert boot.prefetch_ranges  # the start-up set is recorded as chunk ranges

    registry.mark()
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
    # The start-up set came in a handful of large requests, not one per file.
    data_gets = [r for r in registry.blob_gets()
                 if r.path.rsplit("/", 1)[-1] in blob_digests]
    limit = _max_requests(boot)
    assert 0 < len(data_gets) <= limit, (len(data_gets), limit)
    assert after["requests"]["prefetch"] == len(data_gets)
    cold = traced["cold"]
    assert isinstance(cold, dict)
    assert cold["requests"]["ondemand"] > len(data_gets)
