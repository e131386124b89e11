"""Container start benchmark: command to the numpy version printed, cold, local.

    python -m bench.run_bench [--source registry|oci] [--work DIR] [--runs 3]
                              [--out results/run_bench.json]

For the Debian python3-numpy image, side by side in each round (the order
alternates between rounds):

- ``lazy``:  ``rafs run`` of the RAFS conversion (empty chunk cache, new daemon);
- ``eager``: ``rafs run`` of the plain OCI image (no unpacked rootfs yet: full
  read, decompression and unpack before the container starts).

Both read the image from a local registry (Debian's ``docker-registry`` on
127.0.0.1, ``bench.registry``; the plain image pushed by skopeo, the RAFS
image by ``rafs convert``), or with ``--source oci`` from local OCI layouts.
Before every run the runtime root (chunk cache, unpacked rootfs) is new and
the page cache is dropped. The
time is from starting ``rafs run`` to the version line appearing on its
stdout; the lazy runs also report the bytes the daemon fetched. Figures are
medians of ``--runs`` rounds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
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


def _unmount(env: dict[str, str], mnt: Path, pid: int) -> None:
    """`rafs umount`; a daemon that outlives a failed unmount gets SIGTERM."""
    res = subprocess.run([sys.executable, "-m", "runtime.cli", "umount", str(mnt)], env=env,
                         text=True, capture_output=True, check=False)
    if res.returncode == 0:
        return
    print(f"warning: {res.stderr.strip()}", file=sys.stderr)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)


def time_run(image: str, work: Path, lazy: bool, mode: str = "auto") -> dict[str, float]:
    """One cold ``rafs run``; seconds to the version line (and bytes fetched if lazy)."""
    root = Path(tempfile.mkdtemp(prefix="root-", dir=work))
    run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=work))
    env = _rafs_env(root, run_dir)
    argv = [sys.executable, "-m", "runtime.cli", "run", "--rm",
            *(["--keep-mounted", "--mode", mode] if lazy else []), image, *CMD]
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
                _unmount(env, mnt, reply["pid"])
        return result
    finally:
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(run_dir, ignore_errors=True)


def _image_bytes(ref: str) -> int:
    from runtime.image import resolve_image

    return sum(d.size for d in resolve_image(ref).manifest.layers)


def _images(source: str, work: Path, stack: contextlib.ExitStack) -> dict[str, str]:
    """{"lazy": RAFS image ref, "eager": plain image ref}."""
    from converter.convert import convert

    layout, tag = corpus.debian_numpy_image()
    if source == "oci":
        rafs_layout = work / "rafs"
        if not (rafs_layout / "index.json").exists():
            convert(f"oci:{layout}:{tag}", f"oci:{rafs_layout}:rafs")
        return {"lazy": f"oci:{rafs_layout}:rafs", "eager": f"oci:{layout}:{tag}"}
    from bench.registry import RegistryServer

    server = stack.enter_context(RegistryServer(storage=work / "registry"))
    plain, lazy = server.ref("bench/numpy", "plain"), server.ref("bench/numpy", "rafs")
    subprocess.run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false",
                    f"oci:{layout}:{tag}", plain], check=True)
    convert(plain, lazy)
    return {"lazy": lazy, "eager": plain}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", choices=("registry", "oci"), default="registry",
                        help="where the images are read from (default: a local registry)")
    parser.add_argument("--mode", choices=("auto", "fuse", "kernel"), default="auto",
                        help="mount mode of the lazy runs (default auto)")
    parser.add_argument("--work", type=Path, help="scratch directory (default: a temp dir)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "results/run_bench.json")
    args = parser.parse_args(argv)

    work = args.work or Path(tempfile.mkdtemp(prefix="rafs-run-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict[str, float]]] = {"lazy": [], "eager": []}
    with contextlib.ExitStack() as stack:
        images = _images(args.source, work, stack)
        for i in range(args.runs):
            order = ("lazy", "eager") if i % 2 == 0 else ("eager", "lazy")
            for kind in order:
                r = time_run(images[kind], work, lazy=kind == "lazy", mode=args.mode)
                runs[kind].append(r)
                print(f"round {i + 1} {kind:5}: {r['seconds']:.2f} s to the version line",
                      file=sys.stderr)
        sizes = {"compressed_bytes": _image_bytes(images["eager"]),
                 "rafs_bytes": _image_bytes(images["lazy"])}

    summary = {
        kind: {"median_seconds": statistics.median(r["seconds"] for r in rs),
               "runs": rs}
        for kind, rs in runs.items()
    }
    summary["lazy"]["median_fetched_bytes"] = statistics.median(
        r["fetched_bytes"] for r in runs["lazy"])
    summary["image"] = {"source": args.source, "mode": args.mode, "plain": images["eager"],
                        "rafs": images["lazy"], **sizes}
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
