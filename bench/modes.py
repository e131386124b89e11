"""Kernel mode against fuse mode (and local disk), measured side by side in one run.

    python -m bench.modes [--work DIR] [--out results/modes.json] [--size-mib N] [--repeat N]

Figures (every one warm, the median of ``--repeat`` runs, modes interleaved):

- ``find`` + ``stat`` of every entry of the Debian python3 image (``find MNT
  -printf`` with inode, mode, links, owner, size and mtime, so every entry is
  lstat'ed): kernel, fuse, and the same tree unpacked by umoci on local disk;
  the caches are warmed by one walk first;
- ``chroot MNT python3 -c 'import numpy'`` on the numpy image: kernel, fuse
  (after one cold run that fills the chunk cache);
- sequential read of a 1 GiB file (half random, half zeros per 128 KiB): the
  chunk cache full, the page cache dropped before each run: kernel, fuse,
  local disk (``bench.warmread`` measures this one alone, in more rounds, with
  both EROFS read variants);
- FUSE requests the daemon answered during each measured run (the daemon's
  ``fuse_requests`` counter), per mode;
- the daemon's CPU time (user + system, all its threads) during each measured
  run: what a mode costs whatever else the host runs. On a shared host the
  throughput of a daemon-served read falls with the load while local disk's
  (DMA, no daemon) hardly does, so the load average before and after is
  recorded too.

Prints a Markdown table and writes the JSON to ``--out``. Needs root (mounts,
chroot, dropping caches) and a kernel with file-backed EROFS for kernel mode.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import corpus
from bench.tools import (
    big_file_tar,
    drop_caches,
    mounted,
    oci_layout_of_tar,
    rafs,
    read_file,
    stats,
)

MODES = ("kernel", "fuse")
MB = 1e6
FIND_FORMAT = "%i %m %n %U %G %s %T@\n"


def fuse_requests(mnt: Path) -> int:
    return int(stats(mnt)["stats"]["fuse_requests"])  # type: ignore[index]


def daemon_pid(mnt: Path) -> int:
    return int(stats(mnt)["pid"])  # type: ignore[arg-type]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of every thread of process ``pid`` so far."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # a worker thread that ended meanwhile
            continue
        total += int(fields[11]) + int(fields[12])
    return total / tick


def converted(work: Path, src: Path, tag: str, name: str) -> str:
    dst = work / name
    if not (dst / "index.json").exists():
        shutil.rmtree(dst, ignore_errors=True)
        rafs("convert", "--no-progress", f"oci:{src}:{tag}", f"oci:{dst}:{tag}")
    return f"oci:{dst}:{tag}"


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(
    images: dict[str, str], work: Path, cache: Path, repeat: int,
    warm: Callable[[Path], object], run: Callable[[Path], object], drop: bool = False,
    local: Path | None = None,
) -> dict[str, Any]:
    """Median seconds and FUSE requests per run of ``run`` in each mode (and on ``local``)."""
    samples: dict[str, list[float]] = {m: [] for m in MODES}
    requests: dict[str, list[int]] = {m: [] for m in MODES}
    cpu: dict[str, list[float]] = {m: [] for m in MODES}
    mounts: dict[str, Path] = {}
    with mounted(images["kernel"], work / "mnt-kernel", cache, "--mode", "kernel",
                 "--no-prefetch") as km, \
         mounted(images["fuse"], work / "mnt-fuse", cache, "--mode", "fuse",
                 "--no-prefetch") as fm:
        mounts = {"kernel": km, "fuse": fm}
        pids = {mode: daemon_pid(mnt) for mode, mnt in mounts.items()}
        for mode in MODES:
            warm(mounts[mode])
        if local is not None:
            samples["local"] = []
            warm(local)
        for _ in range(repeat):
            for mode in MODES:
                if drop:
                    drop_caches()
                before, cpu0 = fuse_requests(mounts[mode]), cpu_seconds(pids[mode])
                samples[mode].append(timed(lambda m=mode: run(mounts[m])))
                cpu[mode].append(cpu_seconds(pids[mode]) - cpu0)
                requests[mode].append(fuse_requests(mounts[mode]) - before)
            if local is not None:
                if drop:
                    drop_caches()
                samples["local"].append(timed(lambda: run(local)))
    out: dict[str, Any] = {}
    for key, values in samples.items():
        out[key] = {"median_s": statistics.median(values), "samples": values}
        if key in requests:
            out[key]["fuse_requests"] = int(statistics.median(requests[key]))
            out[key]["fuse_request_samples"] = requests[key]
            out[key]["daemon_cpu_s"] = statistics.median(cpu[key])
            out[key]["daemon_cpu_samples"] = cpu[key]
    return out


def bench_walk(work: Path, repeat: int) -> dict[str, Any]:
    src, tag = corpus.debian_python_image()
    ref = converted(work, src, tag, "debian-rafs")
    unpacked = work / "debian-unpacked"
    if not (unpacked / "rootfs").exists():
        shutil.rmtree(unpacked, ignore_errors=True)
        subprocess.run(["umoci", "unpack", "--image", f"{src}:{tag}", str(unpacked)],
                       check=True, capture_output=True)

    def walk(root: Path) -> int:
        res = subprocess.run(["find", str(root), "-printf", FIND_FORMAT], check=True,
                             capture_output=True)
        return res.stdout.count(b"\n")

    out = measure({"kernel": ref, "fuse": ref}, work, work / "cache-walk", repeat, walk, walk,
                  local=unpacked / "rootfs")
    out["entries"] = walk(unpacked / "rootfs")
    return out


def bench_numpy(work: Path, repeat: int) -> dict[str, Any]:
    src, tag = corpus.debian_numpy_image()
    ref = converted(work, src, tag, "numpy-rafs")

    def numpy(root: Path) -> None:
        subprocess.run(["chroot", str(root), "python3", "-c", "import numpy"], check=True,
                       capture_output=True)

    cache = work / "cache-numpy"
    shutil.rmtree(cache, ignore_errors=True)  # the first (cold) run fills it
    return measure({"kernel": ref, "fuse": ref}, work, cache, repeat, numpy, numpy)


def big_file_image(work: Path, size: int) -> tuple[str, Path]:
    """A RAFS image of one ``size``-byte file ``big.bin`` (built once under ``work``), and
    a directory holding the same bytes as a plain local file."""
    d = work / f"big{size}"
    if not (d / "rafs" / "index.json").exists():
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        big_file_tar(d / "layer.tar", size)
        oci_layout_of_tar(d / "oci", "v1", d / "layer.tar")
        rafs("convert", "--no-progress", f"oci:{d / 'oci'}:v1", f"oci:{d / 'rafs'}:v1")
        with tarfile.open(d / "layer.tar") as tar:  # the same bytes as a plain local file
            tar.extract("big.bin", d / "local", filter="data")
        (d / "layer.tar").unlink()
    return f"oci:{d / 'rafs'}:v1", d / "local"


def bench_read(work: Path, size: int, repeat: int) -> dict[str, Any]:
    ref, local = big_file_image(work, size)
    d = local.parent

    def read(root: Path) -> int:
        return read_file(root / "big.bin")

    out = measure({"kernel": ref, "fuse": ref}, d, d / "cache", repeat, read, read, drop=True,
                  local=local)
    for value in out.values():
        value["mb_s"] = size / MB / value["median_s"]
    out["size_mb"] = size / MB
    return out


def markdown(r: dict[str, Any]) -> str:
    w, n, rd = r["walk"], r["numpy"], r["read"]
    k, f, loc = "kernel", "fuse", "local"
    lines = [
        "| Figure (warm, median) | kernel | fuse | local disk | kernel / local |",
        "|---|---|---|---|---|",
        f"| find + stat, {w['entries']:,} entries | {w[k]['median_s'] * 1000:.0f} ms | "
        f"{w[f]['median_s'] * 1000:.0f} ms | {w[loc]['median_s'] * 1000:.0f} ms | "
        f"{w[k]['median_s'] / w[loc]['median_s']:.2f}× |",
        f"| `import numpy` in chroot | {n[k]['median_s'] * 1000:.0f} ms | "
        f"{n[f]['median_s'] * 1000:.0f} ms | — | — |",
        f"| sequential read, {rd['size_mb']:.0f} MB (page cache dropped) | "
        f"{rd[k]['mb_s']:.0f} MB/s | {rd[f]['mb_s']:.0f} MB/s | {rd[loc]['mb_s']:.0f} MB/s | "
        f"{rd[k]['mb_s'] / rd[loc]['mb_s']:.2f}× |",
        "",
        "| FUSE requests per run | kernel | fuse |",
        "|---|---|---|",
        f"| find + stat | {w[k]['fuse_requests']:,} | {w[f]['fuse_requests']:,} |",
        f"| `import numpy` | {n[k]['fuse_requests']:,} | {n[f]['fuse_requests']:,} |",
        f"| sequential read | {rd[k]['fuse_requests']:,} | {rd[f]['fuse_requests']:,} |",
        "",
        f"Daemon CPU per sequential read: kernel {rd[k]['daemon_cpu_s']:.2f} s, fuse "
        f"{rd[f]['daemon_cpu_s']:.2f} s; load average {r['load_before']:.1f} before, "
        f"{r['load_after']:.1f} after (cores: {os.cpu_count()}).",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/var/tmp/rafs-bench-modes"))
    ap.add_argument("--out", type=Path, default=Path("results/modes.json"))
    ap.add_argument("--size-mib", type=int, default=1024, help="size of the read file")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                               "load_before": os.getloadavg()[0]}
    print("find + stat ...", file=sys.stderr)
    results["walk"] = bench_walk(args.work, args.repeat)
    print("import numpy ...", file=sys.stderr)
    results["numpy"] = bench_numpy(args.work, args.repeat)
    print("sequential read ...", file=sys.stderr)
    results["read"] = bench_read(args.work, args.size_mib << 20, args.repeat)
    results["load_after"] = os.getloadavg()[0]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
