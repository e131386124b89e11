"""Foundation benchmarks: conversion, output size, mount time, tree walk, sequential read.

    python -m bench.foundation [--work DIR] [--out results/foundation.json] [--quick]
                               [--only convert|mount|walk|read ...]

Every comparison is measured side by side in the same run. Figures:

- conversion throughput (MB/s of uncompressed layer input) and output size
  against the gzip OCI layers, for the Debian python3 image;
- `rafs mount` time for images of 10k and 100k files (command to ready), in
  kernel and fuse mode: first mount, with the bootstrap's validation stamp,
  and with the stamp removed (what the validator costs a mount), plus the
  validator and fsck.erofs alone;
- `find` + `stat` walk of the mounted Debian image against the same tree
  unpacked on local disk by umoci, page cache dropped before each;
- sequential read of a 1 GiB file: cold (local backend, empty chunk cache),
  warm (chunk cache full, page cache dropped) and from local disk.
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench import corpus
from bench.tools import (
    big_file_tar,
    drop_caches,
    many_files_tar,
    mounted,
    oci_layout_of_tar,
    rafs,
    read_file,
    stat_tree,
    stats,
    timer,
)

MB = 1e6
PARTS = ("convert", "mount", "walk", "read")


def uncompressed_size(layout: Path, tag: str) -> tuple[int, int]:
    """(gzip bytes, uncompressed bytes) of an image's layers."""
    index = json.loads((layout / "index.json").read_text())
    desc = next(m for m in index["manifests"]
                if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag)
    manifest = json.loads((layout / "blobs" / "sha256" / desc["digest"][7:]).read_bytes())
    packed = raw = 0
    for layer in manifest["layers"]:
        path = layout / "blobs" / "sha256" / layer["digest"][7:]
        packed += layer["size"]
        with gzip.open(path) as f:
            while block := f.read(1 << 22):
                raw += len(block)
    return packed, raw


def output_size(layout: Path, tag: str) -> int:
    out = json.loads(rafs("inspect", f"oci:{layout}:{tag}", "--json").stdout)
    return sum(int(layer["size"]) for layer in out["layers"])


def bench_convert(work: Path, src: Path, tag: str) -> dict[str, float]:
    packed, raw = uncompressed_size(src, tag)
    dst = work / "converted"
    shutil.rmtree(dst, ignore_errors=True)
    with timer() as t:
        rafs("convert", f"oci:{src}:{tag}", f"oci:{dst}:{tag}")
    out = output_size(dst, tag)
    return {"input_uncompressed_mb": raw / MB, "input_gzip_mb": packed / MB,
            "seconds": t[0], "throughput_mb_s": raw / MB / t[0],
            "output_mb": out / MB, "output_vs_gzip": out / packed}


def bench_mount(work: Path, counts: list[int],
                modes: tuple[str, ...] = ("kernel", "fuse")) -> dict[str, dict[str, object]]:
    """Mount time per image size and mode, and what the bootstrap validator costs in it.

    Per mode: the first mount (empty cache: fetch, verify, validate, in kernel
    mode ``fsck.erofs`` too, then stamp), three mounts that find the stamp
    (``stamped``), and three with the stamp removed before each (``unstamped``:
    the bootstrap cached but validated again). In process: ``rafs.validate``
    alone and ``fsck.erofs`` alone on the same bootstrap, medians of 3.
    """
    from rafs.fsck import fsck_erofs
    from rafs.image import open_local_image
    from rafs.validate import validate

    results: dict[str, dict[str, object]] = {}
    for count in counts:
        d = work / f"files{count}"
        if not (d / "rafs" / "index.json").exists():
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir(parents=True)
            many_files_tar(d / "layer.tar", count)
            oci_layout_of_tar(d / "oci", "v1", d / "layer.tar")
            rafs("convert", f"oci:{d / 'oci'}:v1", f"oci:{d / 'rafs'}:v1")
        image = f"oci:{d / 'rafs'}:v1"
        boot = open_local_image(image).bootstrap
        entry: dict[str, object] = {"bootstrap_bytes": len(boot)}
        samples = []
        for _ in range(3):
            with timer() as t:
                validate(boot)
            samples.append(t[0])
        entry["validate_s_median"] = sorted(samples)[1]
        path = d / "bootstrap"
        path.write_bytes(boot)
        samples = []
        for _ in range(3):
            with timer() as t:
                fsck_erofs(path, 1)
            samples.append(t[0])
        entry["fsck_erofs_s_median"] = sorted(samples)[1]
        for mode in modes:
            cache = d / f"cache-{mode}"
            shutil.rmtree(cache, ignore_errors=True)
            wall: dict[str, list[float]] = {"first": [], "stamped": [], "unstamped": []}
            ready: dict[str, list[float]] = {"first": [], "stamped": [], "unstamped": []}
            for kind in ("first", "stamped", "stamped", "stamped",
                         "unstamped", "unstamped", "unstamped"):
                if kind == "unstamped":
                    for stamp in (cache / "bootstraps").glob("*/.*.validated"):
                        stamp.unlink()
                start = time.perf_counter()
                with mounted(image, d / "mnt", cache, "--mode", mode) as mnt:
                    wall[kind].append(time.perf_counter() - start)
                    ready[kind].append(float(stats(mnt)["ready_seconds"]))  # type: ignore[arg-type]
            entry[mode] = {
                "daemon_first_s": ready["first"][0],
                "daemon_stamped_s_median": sorted(ready["stamped"])[1],
                "daemon_unstamped_s_median": sorted(ready["unstamped"])[1],
                "mount_s_median": sorted(wall["stamped"])[1],
                "wall_samples": wall, "daemon_samples": ready,
            }
        results[str(count)] = entry
    return results


def bench_walk(work: Path, src: Path, tag: str) -> dict[str, float]:
    ref = work / "unpacked"
    if not (ref / "rootfs").exists():
        shutil.rmtree(ref, ignore_errors=True)
        subprocess.run(["umoci", "unpack", "--image", f"{src}:{tag}", str(ref)], check=True,
                       capture_output=True)
    cache = work / "walk-cache"
    shutil.rmtree(cache, ignore_errors=True)
    with mounted(f"oci:{work / 'converted'}:{tag}", work / "walk-mnt", cache) as mnt:
        drop_caches()
        with timer() as tm:
            n_mnt = stat_tree(mnt)
        with timer() as tm_warm:
            stat_tree(mnt)
    drop_caches()
    with timer() as td:
        n_disk = stat_tree(ref / "rootfs")
    with timer() as td_warm:
        stat_tree(ref / "rootfs")
    return {"entries": n_mnt, "entries_disk": n_disk, "rafs_s": tm[0], "disk_s": td[0],
            "ratio_cold": tm[0] / td[0], "rafs_warm_s": tm_warm[0], "disk_warm_s": td_warm[0],
            "ratio_warm": tm_warm[0] / td_warm[0]}


def bench_read(work: Path, size: int) -> dict[str, float]:
    d = work / f"big{size}"
    if not (d / "rafs" / "index.json").exists():
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        big_file_tar(d / "layer.tar", size)
        oci_layout_of_tar(d / "oci", "v1", d / "layer.tar")
        rafs("convert", f"oci:{d / 'oci'}:v1", f"oci:{d / 'rafs'}:v1")
        with open(d / "layer.tar", "rb") as f:  # the same bytes as a plain local file
            import tarfile
            with tarfile.open(fileobj=f) as tar:
                tar.extract("big.bin", d / "local", filter="data")
    cache = d / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    out: dict[str, float] = {"size_mb": size / MB}
    with mounted(f"oci:{d / 'rafs'}:v1", d / "mnt", cache) as mnt:
        drop_caches()
        with timer() as cold:
            read_file(mnt / "big.bin")
        drop_caches()
        with timer() as warm:
            read_file(mnt / "big.bin")
        out["stats"] = stats(mnt)["stats"]  # type: ignore[assignment]
    drop_caches()
    with timer() as local:
        read_file(d / "local" / "big.bin")
    out.update({"cold_mb_s": size / MB / cold[0], "warm_mb_s": size / MB / warm[0],
                "local_mb_s": size / MB / local[0], "warm_vs_local": local[0] / warm[0]})
    return out


def markdown(r: dict) -> str:
    lines = [
        "| Figure | rafs | compared with | ratio |",
        "|---|---|---|---|",
    ]
    if "convert" in r:
        c = r["convert"]
        lines += [
            f"| Conversion throughput ({c['input_uncompressed_mb']:.0f} MB uncompressed) | "
            f"{c['throughput_mb_s']:.0f} MB/s | — | — |",
            f"| Output size | {c['output_mb']:.1f} MB | gzip layers {c['input_gzip_mb']:.1f} MB"
            f" | {c['output_vs_gzip']:.3f}× |",
        ]
    m = r.get("mount", {})
    for count, v in m.items():
        for mode in ("kernel", "fuse"):
            if mode not in v:
                continue
            x = v[mode]
            lines.append(
                f"| Mount, {int(count):,} files, {mode} mode: daemon start to ready, bootstrap "
                f"stamped (unstamped: validated again; first mount; CLI wall) | "
                f"{x['daemon_stamped_s_median'] * 1000:.0f} ms "
                f"({x['daemon_unstamped_s_median'] * 1000:.0f} ms; "
                f"{x['daemon_first_s'] * 1000:.0f} ms; {x['mount_s_median'] * 1000:.0f} ms)"
                " | — | — |")
        lines.append(f"| Validator on that bootstrap ({v['bootstrap_bytes'] / MB:.1f} MB), in "
                     f"process; fsck.erofs | {v['validate_s_median'] * 1000:.0f} ms; "
                     f"{v['fsck_erofs_s_median'] * 1000:.0f} ms | — | — |")
    if "walk" in r:
        w = r["walk"]
        lines += [
            f"| find+stat walk, cold ({w['entries']} entries) | {w['rafs_s']:.2f} s | local disk "
            f"{w['disk_s']:.2f} s | {w['ratio_cold']:.2f}× |",
            f"| find+stat walk, warm | {w['rafs_warm_s']:.3f} s | local disk "
            f"{w['disk_warm_s']:.3f} s | {w['ratio_warm']:.2f}× |",
        ]
    if "read" in r:
        rd = r["read"]
        lines += [
            f"| Sequential read {rd['size_mb']:.0f} MB, cold (local backend) | "
            f"{rd['cold_mb_s']:.0f} MB/s | local disk {rd['local_mb_s']:.0f} MB/s | "
            f"{rd['cold_mb_s'] / rd['local_mb_s']:.2f}× |",
            f"| Sequential read, warm (chunk cache, page cache dropped) | "
            f"{rd['warm_mb_s']:.0f} MB/s | local disk {rd['local_mb_s']:.0f} MB/s | "
            f"{rd['warm_vs_local']:.2f}× |",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/var/tmp/rafs-bench"))
    ap.add_argument("--out", type=Path, default=Path("results/foundation.json"))
    ap.add_argument("--quick", action="store_true", help="10k files and 256 MiB only")
    ap.add_argument("--only", choices=PARTS, action="append",
                    help="run only this part (repeatable; default: all)")
    args = ap.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    parts = args.only or list(PARTS)
    results: dict[str, object] = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if "convert" in parts or "walk" in parts:  # the walk mounts the converted image
        src, tag = corpus.debian_python_image()
        print("convert ...", file=sys.stderr)
        results["convert"] = bench_convert(args.work, src, tag)
    if "mount" in parts:
        print("mount ...", file=sys.stderr)
        results["mount"] = bench_mount(args.work, [10_000] if args.quick else [10_000, 100_000])
    if "walk" in parts:
        print("walk ...", file=sys.stderr)
        results["walk"] = bench_walk(args.work, src, tag)
    if "read" in parts:
        print("read ...", file=sys.stderr)
        results["read"] = bench_read(args.work, (256 if args.quick else 1024) << 20)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
