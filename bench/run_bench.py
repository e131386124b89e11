"""Container start benchmark: command to the numpy version printed, cold, local.

    python -m bench.run_bench [--work DIR] [--runs 3] [--out results/run_bench.json]

For the Debian python3-numpy image, side by side in each round (the order
alternates between rounds):

- ``lazy``:  ``rafs run`` of the RAFS conversion (empty chunk cache, new daemon);
- ``eager``: ``rafs run`` of the plain OCI image (no unpacked rootfs yet: full
  read, decompression and unpack before the container starts).

Both read the image from a local OCI layout. Before every run the runtime
root (chunk cache, unpacked rootfs) is new and the page cache is dropped. The
time is from starting ``rafs run`` to the version line appearing on its
stdout; the lazy runs also report the bytes the daemon fetched. Figures are
medians of ``--runs`` rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import corpus
from bench.tools import REPO, drop_caches

CMD = ["python3", "-c", "import numpy; print(numpy.__version__)"]


def _rafs_env(root: Path, run_dir: Path) -> dict[str, str]:
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "RAFS_ROOT": str(root), "RAFS_RUN_DIR": str(run_dir),
            "PYTHONPATH": pythonpath}


def _rafs(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "runtime.cli", *args], env=env, text=True,
                          capture_output=True, check=True)


def time_run(image: str, work: Path, lazy: bool) -> dict[str, float]:
    """One cold ``rafs run``; seconds to the version line (and bytes fetched if lazy)."""
    root = Path(tempfile.mkdtemp(prefix="root-", dir=work))
    run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=work))
    env = _rafs_env(root, run_dir)
    argv = [sys.executable, "-m", "runtime.cli", "run", "--rm",
            *(["--keep-mounted"] if lazy else []), image, *CMD]
    drop_caches()
    try:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        printed = time.perf_counter() - start
        _, err = proc.communicate(timeout=600)
        if proc.returncode != 0 or not line.strip()[:1].isdigit():
            raise SystemExit(f"rafs run {image} failed ({proc.returncode}): {err.strip()}")
        result = {"seconds": printed, "exit_seconds": time.perf_counter() - start}
        if lazy:
            for mnt in (run_dir / "images").glob("*/mnt"):
                reply = json.loads(_rafs(env, "stats", str(mnt)).stdout)
                result["fetched_bytes"] = reply["stats"]["backend_bytes"]
                _rafs(env, "umount", str(mnt))
        return result
    finally:
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(run_dir, ignore_errors=True)


def _image_bytes(layout: Path, tag: str) -> int:
    from rafs.oci import OCILayout

    return sum(d.size for d in OCILayout(layout).resolve(tag).layers)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, help="scratch directory (default: a temp dir)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "results/run_bench.json")
    args = parser.parse_args(argv)

    layout, tag = corpus.debian_numpy_image()
    work = args.work or Path(tempfile.mkdtemp(prefix="rafs-run-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    rafs_layout = work / "rafs"
    if not (rafs_layout / "index.json").exists():
        from converter.convert import convert

        convert(f"oci:{layout}:{tag}", f"oci:{rafs_layout}:rafs")
    images = {"lazy": f"oci:{rafs_layout}:rafs", "eager": f"oci:{layout}:{tag}"}
    runs: dict[str, list[dict[str, float]]] = {"lazy": [], "eager": []}
    for i in range(args.runs):
        order = ("lazy", "eager") if i % 2 == 0 else ("eager", "lazy")
        for kind in order:
            r = time_run(images[kind], work, lazy=kind == "lazy")
            runs[kind].append(r)
            print(f"round {i + 1} {kind:5}: {r['seconds']:.2f} s to the version line",
                  file=sys.stderr)

    summary = {
        kind: {"median_seconds": statistics.median(r["seconds"] for r in rs),
               "runs": rs}
        for kind, rs in runs.items()
    }
    summary["lazy"]["median_fetched_bytes"] = statistics.median(
        r["fetched_bytes"] for r in runs["lazy"])
    summary["image"] = {"ref": images["eager"], "compressed_bytes": _image_bytes(layout, tag),
                        "rafs_bytes": _image_bytes(rafs_layout, "rafs")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2))
    lazy, eager = summary["lazy"], summary["eager"]
    print(f"rafs run, RAFS image (lazy):  {lazy['median_seconds']:.2f} s  "
          f"(fetched {lazy['median_fetched_bytes'] / 1e6:.1f} MB of "
          f"{summary['image']['rafs_bytes'] / 1e6:.1f} MB)")
    print(f"rafs run, plain OCI (eager): {eager['median_seconds']:.2f} s  "
          f"(pulls and unpacks {summary['image']['compressed_bytes'] / 1e6:.1f} MB of layers)")
    print(f"median of {args.runs}; results in {args.out}")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
