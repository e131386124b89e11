"""Warm sequential reads of one large file: kernel mode, fuse mode and local disk, one run.

    python -m bench.warmread [--work DIR] [--size-mib N] [--rounds N] [--warmup N]
                             [--out results/warmread.json]

What is measured: ``read(2)`` in 1 MiB blocks of a 1 GiB file (half random,
half zeros per 128 KiB, ``bench.tools.big_file_tar``) with the chunk cache
full (every chunk fetched and verified once before the first round) and the
**page cache dropped before every read** (``drop_caches``: the EROFS/FUSE page
cache, the cache's data files and the local copy all come from disk), so the
figure is "warm chunk cache, cold page cache", the same for every contender.
Contenders, each mounted once for the whole run:

- ``kernel``: kernel mode as ``rafs mount --mode kernel`` does it (EROFS reads
  its blob files buffered: one synchronous 1 MiB FUSE request at a time);
- ``kernel-directio``: the same with ``RAFS_EROFS_DIRECT_IO=1`` (EROFS mounted
  with ``directio``: asynchronous requests, the next in flight while the reader
  copies), for comparison;
- ``fuse``: fuse mode;
- ``local``: the same bytes as a plain file on the same disk.

Rounds are interleaved (every contender once per round, the order rotated each
round so none always follows a drop of a larger cache), the first ``--warmup``
rounds are discarded, and the figures are medians with their range, plus the
daemon's CPU (user + system, all threads) per GiB and the load average before
and after: on this shared 2-core host a daemon-served read slows down with
other jobs' load while local disk (DMA) hardly does. Needs root.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from bench.modes import big_file_image, cpu_seconds, daemon_pid
from bench.tools import drop_caches, mounted, read_file

MB = 1e6
CONTENDERS = ("kernel", "kernel-directio", "fuse", "local")
SETTLE_S = 0.3  # after a drop: let the flush of the drop's own work finish


def measure(work: Path, size: int, rounds: int, warmup: int) -> dict[str, Any]:
    ref, local = big_file_image(work, size)
    cache = work / f"big{size}" / "cache"
    with ExitStack() as stack:
        roots: dict[str, Path] = {}
        for name, mode, env in (("kernel", "kernel", "0"), ("kernel-directio", "kernel", "1"),
                                ("fuse", "fuse", "0")):
            os.environ["RAFS_EROFS_DIRECT_IO"] = env  # read by the daemon at its mount
            try:
                roots[name] = stack.enter_context(mounted(
                    ref, work / f"mnt-{name}", cache, "--mode", mode, "--no-prefetch"))
            finally:
                del os.environ["RAFS_EROFS_DIRECT_IO"]
        roots["local"] = local
        pids = {name: daemon_pid(root) for name, root in roots.items() if name != "local"}
        for root in roots.values():  # fill the chunk cache (and check the bytes are there)
            if read_file(root / "big.bin") != size:
                raise SystemExit(f"bench.warmread: short read of {root / 'big.bin'}")
        mb_s: dict[str, list[float]] = {name: [] for name in CONTENDERS}
        cpu: dict[str, list[float]] = {name: [] for name in pids}
        load_before = os.getloadavg()[0]
        for r in range(warmup + rounds):
            order = CONTENDERS[r % len(CONTENDERS):] + CONTENDERS[:r % len(CONTENDERS)]
            for name in order:
                drop_caches()
                time.sleep(SETTLE_S)
                cpu0 = cpu_seconds(pids[name]) if name in pids else 0.0
                start = time.perf_counter()
                n = read_file(roots[name] / "big.bin")
                elapsed = time.perf_counter() - start
                if r < warmup:
                    continue
                mb_s[name].append(n / MB / elapsed)
                if name in pids:
                    cpu[name].append((cpu_seconds(pids[name]) - cpu0) * (1 << 30) / n)
        load_after = os.getloadavg()[0]
    out: dict[str, Any] = {"size_mb": size / MB, "rounds": rounds, "warmup": warmup,
                           "load_before": load_before, "load_after": load_after,
                           "cores": os.cpu_count()}
    for name in CONTENDERS:
        out[name] = {"mb_s": statistics.median(mb_s[name]), "samples": mb_s[name]}
        if name in cpu:
            out[name]["cpu_s_per_gib"] = statistics.median(cpu[name])
            out[name]["cpu_samples"] = cpu[name]
    return out


def markdown(r: dict[str, Any]) -> str:
    local = r["local"]["mb_s"]
    lines = [f"Sequential read of {r['size_mb']:.0f} MB, chunk cache warm, page cache dropped "
             f"before each read; median of {r['rounds']} interleaved rounds "
             f"({r['warmup']} discarded); load {r['load_before']:.1f} before, "
             f"{r['load_after']:.1f} after, {r['cores']} cores.", "",
             "| | MB/s (median) | range | of local disk | daemon CPU per GiB |",
             "|---|---|---|---|---|"]
    for name in CONTENDERS:
        v = r[name]
        cpu = f"{v['cpu_s_per_gib']:.2f} s" if "cpu_s_per_gib" in v else "—"
        lines.append(f"| {name} | {v['mb_s']:,.0f} | {min(v['samples']):,.0f}–"
                     f"{max(v['samples']):,.0f} | {v['mb_s'] / local:.0%} | {cpu} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/var/tmp/rafs-bench-modes"))
    ap.add_argument("--out", type=Path, default=Path("results/warmread.json"))
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--warmup", type=int, default=1)
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.warmup < 0:
        ap.error("--rounds must be at least 1 and --warmup at least 0")
    args.work.mkdir(parents=True, exist_ok=True)
    results = measure(args.work, args.size_mib << 20, args.rounds, args.warmup)
    results["time"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
