"""What verified cache reads cost: the warm sequential read of a 1 GiB file, this checkout
against another (``--baseline``, e.g. an export of main), samples alternated.

    python -m bench.cacheread --baseline DIR [--size-mib 1024] [--repeat 5]
                              [--modes fuse,kernel] [--work DIR] [--out results/cacheread.json]

Each side mounts the same converted image (one file, half random and half zeros per
128 KiB, as ``bench.foundation`` and ``bench.modes`` read) with its own daemon (its
own code: ``python -m runtime.cli`` run from that tree) on its own chunk cache,
reads it once to fill the cache, then per sample drops the page cache and reads the
whole file; baseline and this checkout alternate sample by sample, so load on the
machine hits both alike. Also measured in this process, with no FUSE: the cost per
128 KiB of ``ChunkCache.read`` (pread + the 64 KiB-block xxh3 check) against a bare
``os.pread`` of the same bytes from the same warm data file.

Prints a Markdown table and writes JSON. Needs root (mounts, dropping caches).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.tools import REPO, big_file_tar, drop_caches, oci_layout_of_tar, read_file

MB = 1e6


def _rafs(tree: Path, *args: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    subprocess.run([sys.executable, "-m", "runtime.cli", *args], cwd=tree, env=env,
                   check=True, capture_output=True, text=True)


def image(work: Path, size: int) -> str:
    d = work / f"big{size}"
    if not (d / "rafs" / "index.json").exists():
        d.mkdir(parents=True, exist_ok=True)
        big_file_tar(d / "layer.tar", size)
        oci_layout_of_tar(d / "oci", "v1", d / "layer.tar")
        _rafs(REPO, "convert", "--no-progress", f"oci:{d / 'oci'}:v1", f"oci:{d / 'rafs'}:v1")
        (d / "layer.tar").unlink()
    return f"oci:{d / 'rafs'}:v1"


def in_process(work: Path, ref: str, size: int) -> dict[str, float]:
    """µs per 128 KiB: verified ``ChunkCache.read`` against a bare pread."""
    import trio
    import zstandard

    from fused.backend import LocalBackend
    from fused.cache import ChunkCache
    from fused.fetcher import Fetcher
    from fused.vfs import Vfs
    from rafs.bootstrap import Bootstrap
    from rafs.oci import OCILayout, bootstrap_descriptor

    layout = Path(ref.removeprefix("oci:").rsplit(":", 1)[0])
    oci = OCILayout(layout)
    desc = bootstrap_descriptor(oci.resolve("v1"))
    raw = zstandard.ZstdDecompressor().decompress(oci.blob_path(desc.digest).read_bytes(),
                                                  max_output_size=1 << 30)
    boot = Bootstrap.from_bytes(raw)
    cache_dir = work / "inproc-cache"

    async def main() -> dict[str, float]:
        cache = ChunkCache(cache_dir, boot.blobs, boot.chunk)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(cache.run)
                fetcher = Fetcher(cache, LocalBackend(layout))
                async with fetcher.running():
                    vfs = Vfs(boot, fetcher)
                    attr = vfs.lookup(1, b"big.bin")
                    assert attr is not None
                    for pos in range(0, attr.size, 1 << 20):  # fill and check every chunk
                        await vfs.read(attr.ino, pos, 1 << 20)
                    node = boot.inode(vfs.nid(attr.ino))
                    table = [i for i in boot.file_chunks(node) if i is not None]
                    fd = cache.blob_file(0).data_fd
                    step = 128 << 10
                    jobs = [(i, off) for i in table
                            for off in range(0, cache.chunk(i).uncompressed_size, step)]
                    best: dict[str, float] = {}
                    for _ in range(3):
                        t = time.perf_counter()
                        for i, off in jobs:
                            os.pread(fd, step, cache.chunk(i).uncompressed_offset + off)
                        bare = time.perf_counter() - t
                        t = time.perf_counter()
                        for i, off in jobs:
                            assert cache.read(i, off, step) is not None
                        verified = time.perf_counter() - t
                        best["pread_us"] = min(best.get("pread_us", 1e9), bare / len(jobs) * 1e6)
                        best["verified_us"] = min(best.get("verified_us", 1e9),
                                                  verified / len(jobs) * 1e6)
                    best["reads"] = len(jobs)
                nursery.cancel_scope.cancel()
            return best
        finally:
            cache.close()

    return trio.run(main)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", type=Path, required=True, help="another rafs tree")
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--modes", default="fuse,kernel")
    ap.add_argument("--work", type=Path, default=Path("/var/tmp/rafs-bench-cacheread"))
    ap.add_argument("--out", type=Path, default=Path("results/cacheread.json"))
    args = ap.parse_args(argv)
    size = args.size_mib << 20
    args.work.mkdir(parents=True, exist_ok=True)
    ref = image(args.work, size)
    sides = {"baseline": args.baseline.resolve(), "this": REPO}
    result: dict[str, Any] = {"size_mb": size / MB, "repeat": args.repeat,
                              "baseline": str(sides["baseline"]), "modes": {}}
    for mode in [m for m in args.modes.split(",") if m]:
        mounts = {}
        try:
            for side, tree in sides.items():
                mnt = args.work / f"mnt-{mode}-{side}"
                mnt.mkdir(exist_ok=True)
                cache = args.work / f"cache-{side}"
                _rafs(tree, "mount", ref, str(mnt), "--cache-dir", str(cache), "--mode", mode)
                mounts[side] = mnt
                read_file(mnt / "big.bin")  # fill this side's chunk cache
            runs: dict[str, list[float]] = {side: [] for side in sides}
            for k in range(args.repeat):
                order = list(sides) if k % 2 == 0 else list(reversed(sides))
                for side in order:
                    drop_caches()
                    t = time.perf_counter()
                    read_file(mounts[side] / "big.bin")
                    runs[side].append(size / MB / (time.perf_counter() - t))
        finally:
            for side, mnt in mounts.items():
                subprocess.run([sys.executable, "-m", "runtime.cli", "umount", str(mnt)],
                               cwd=sides[side], env={**os.environ, "PYTHONPATH": str(sides[side])},
                               capture_output=True, check=False)
        result["modes"][mode] = {side: {"median_mb_s": statistics.median(v), "runs": v}
                                 for side, v in runs.items()}
    result["in_process"] = in_process(args.work, ref, size)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"| warm sequential read, {size / MB:.0f} MB, page cache dropped (median of "
          f"{args.repeat}, alternated) | baseline | this checkout | ratio |")
    print("|---|---|---|---|")
    for mode, r in result["modes"].items():
        b, t = r["baseline"]["median_mb_s"], r["this"]["median_mb_s"]
        print(f"| {mode} mode | {b:,.0f} MB/s | {t:,.0f} MB/s | {t / b:.2f}× |")
    ip = result["in_process"]
    print(f"\nin process, per 128 KiB read of a warm data file: pread {ip['pread_us']:.1f} µs, "
          f"verified ChunkCache.read {ip['verified_us']:.1f} µs "
          f"(+{ip['verified_us'] - ip['pread_us']:.1f} µs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
