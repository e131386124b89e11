"""containerd cold start: overlayfs snapshotter + ``ctr pull`` against rafs + ``ctr-remote rpull``.

    python -m bench.containerd [--runs 3] [--out results/containerd.json]

Time from command to the numpy version printed, for the Debian python3-numpy
image served by a local ``docker-registry``:

- ``overlayfs``: ``ctr image pull`` (containerd's overlayfs snapshotter: full
  download and unpack) then ``ctr run --rm IMAGE python3 -c 'import numpy...'``;
- ``rafs``: the same image converted to RAFS, ``ctr-remote image rpull
  --snapshotter rafs`` (nothing downloaded) then ``ctr run --rm --snapshotter
  rafs`` (chunks fetched as they are read).

Every run is cold: a fresh containerd (empty content store and snapshots) and
a fresh snapshotter root (empty rafs chunk cache). The two modes alternate,
``--runs`` times each; medians are reported side by side, with the bytes the
rafs daemon fetched. The registry is local, so the figures show the cost of
moving and unpacking bytes on this machine, not of a network.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from bench import corpus
from bench.containerd_env import (
    RAFS_FSTYPES,
    containerd_daemon,
    mounts_under,
    rafs_cmd,
    run,
    snapshotter_process,
    unmount_under,
)
from bench.registry import RegistryServer

NUMPY = ["python3", "-c", "import numpy; print(numpy.__version__)"]
MODES = ("overlayfs", "rafs")


def _one(base: Path, mode: str, image: str) -> dict[str, float]:
    """One cold run in fresh directories under ``base``."""
    sock = base / "snapshotter.sock"
    try:
        with snapshotter_process(sock, base / "snroot", base / "snapshotter.log"), \
                containerd_daemon(base / "containerd", sock, namespace="bench") as cd:
            t0 = time.perf_counter()
            if mode == "rafs":
                cd.ctr_remote("image", "rpull", "--plain-http", "--snapshotter", "rafs", image)
            else:
                cd.ctr("image", "pull", "--plain-http", image)
            t1 = time.perf_counter()
            snap = ["--snapshotter", "rafs"] if mode == "rafs" else []
            res = cd.ctr("run", "--rm", *snap, image, "numpy", *NUMPY)
            t2 = time.perf_counter()
            out: dict[str, float] = {"pull_s": t1 - t0, "run_s": t2 - t1, "total_s": t2 - t0}
            version = res.stdout.strip()
            if not version or not version[0].isdigit():
                raise RuntimeError(f"unexpected output from the container: {res.stdout!r}")
            if mode == "rafs":
                mps = [mp for mp, fs in mounts_under(base / "snroot") if fs in RAFS_FSTYPES]
                reply = json.loads(run(rafs_cmd("stats", mps[0]), check=True).stdout)
                out["fetched_bytes"] = reply["stats"]["backend_bytes"]
            return out
    finally:
        unmount_under(base)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("results/containerd.json"))
    args = ap.parse_args(argv)

    from converter.convert import ConvertOptions, convert
    from rafs.oci import parse_image_ref
    from rafs.registry import RegistryClient

    work = Path(tempfile.mkdtemp(prefix="rafs-bench-containerd-"))
    os.environ["RAFS_RUN_DIR"] = str(work / "run")  # the daemons' sockets, kept private
    try:
        with RegistryServer() as reg:
            src, tag = corpus.debian_numpy_image(corpus.default_cache_dir())
            plain = reg.ref("bench/numpy", "plain")
            subprocess.run(["skopeo", "copy", "--dest-tls-verify=false", f"oci:{src}:{tag}",
                            plain], check=True, capture_output=True)
            lazy = reg.ref("bench/numpy", "rafs")
            convert(f"oci:{src}:{tag}", lazy, ConvertOptions(progress=False))
            sizes = {}
            for mode, ref in (("overlayfs", plain), ("rafs", lazy)):
                image = parse_image_ref(ref)
                with RegistryClient.for_ref(image) as rc:
                    sizes[mode] = sum(d.size for d in rc.resolve(image).layers)
            images = {"overlayfs": plain.removeprefix("docker://"),
                      "rafs": lazy.removeprefix("docker://")}
            runs: dict[str, list[dict[str, float]]] = {m: [] for m in MODES}
            for i in range(args.runs):
                for mode in MODES:
                    base = work / f"{mode}-{i}"
                    base.mkdir()
                    r = _one(base, mode, images[mode])
                    runs[mode].append(r)
                    print(f"run {i + 1} {mode:9} pull {r['pull_s']:6.2f}s  run {r['run_s']:6.2f}s"
                          f"  total {r['total_s']:6.2f}s", flush=True)
                    shutil.rmtree(base, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    summary = {}
    for mode in MODES:
        med = {k: statistics.median(r[k] for r in runs[mode]) for k in runs[mode][0]}
        summary[mode] = {"median": med, "runs": runs[mode], "image_layer_bytes": sizes[mode]}
    print()
    print(f"{'':10} {'pull':>8} {'run':>8} {'total':>8}  layer bytes in registry / fetched")
    for mode in MODES:
        med = summary[mode]["median"]
        fetched = (f" / {med['fetched_bytes'] / 1e6:.1f} MB" if "fetched_bytes" in med else
                   " / all")
        print(f"{mode:10} {med['pull_s']:7.2f}s {med['run_s']:7.2f}s {med['total_s']:7.2f}s"
              f"  {sizes[mode] / 1e6:.1f} MB{fetched}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nmedian of {args.runs} cold runs each; JSON in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
