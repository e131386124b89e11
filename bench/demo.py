"""`make demo`: a real Debian image through a real registry into a lazily started container.

    python -m bench.demo [--work DIR] [--keep]

Builds (or reuses) Debian bookworm + python3 + python3-numpy, starts a local
``docker-registry``, converts the image straight into it as RAFS and pushes
the plain OCI image next to it, then times `rafs run` of each on an empty
cache: the RAFS image starts lazily, the plain one is pulled and unpacked
first. Prints each step's time and how many bytes the lazy start really
fetched against the size of the image.

Everything it makes (runtime root, run directory, registry storage: ~500 MB)
lives in ``--work`` (default ``/var/tmp/rafs-demo``) and is removed at the
end, mounts first, unless ``--keep``; ``make clean`` removes a kept one. A
failing step is one ``demo: error: ...`` line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench import corpus
from bench.registry import RegistryServer
from bench.tools import REPO, drop_caches, timer

WORKLOAD = ["python3", "-c", "import numpy; print('numpy', numpy.__version__)"]


DEFAULT_WORK = Path("/var/tmp/rafs-demo")


class DemoError(Exception):
    """A step of the demo failed; the message is one line."""


def _rafs(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "runtime.cli", *args], cwd=REPO, env=env,
                          text=True, capture_output=True)
    if proc.returncode != 0:
        said = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        raise DemoError(f"rafs {args[0]} failed: {said}")
    return proc


def _cleanup(env: dict[str, str], work: Path) -> None:
    """Unmount what the demo left mounted (its images' shared mounts), then remove it."""
    for mnt in sorted((work / "run" / "images").glob("*/mnt")):
        if os.path.ismount(mnt):
            subprocess.run([sys.executable, "-m", "runtime.cli", "umount", str(mnt)],
                           cwd=REPO, env=env, capture_output=True)
    if left := _mounts_under(work):
        print(f"demo: {left[0]} is still mounted: {work} is left in place", file=sys.stderr)
        return
    shutil.rmtree(work, ignore_errors=True)


def _mounts_under(path: Path) -> list[str]:
    prefix = str(path.resolve()) + "/"
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    return [p for p in points if p.startswith(prefix)]


def _run(env: dict[str, str], image: str, *flags: str) -> tuple[float, str]:
    """`rafs run` on a cold page cache: (seconds to the container's output, output)."""
    drop_caches()
    start = time.perf_counter()
    out = _rafs(env, "run", "--rm", *flags, image, *WORKLOAD).stdout.strip()
    return time.perf_counter() - start, out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=DEFAULT_WORK,
                    help=f"where everything goes (default {DEFAULT_WORK})")
    ap.add_argument("--keep", action="store_true",
                    help="keep the work directory (images, cache, registry) afterwards")
    args = ap.parse_args(argv)
    work: Path = args.work
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    env = {**os.environ, "RAFS_ROOT": str(work / "root"), "RAFS_RUN_DIR": str(work / "run")}
    try:
        _demo(env, work)
    except (DemoError, subprocess.CalledProcessError, OSError, RuntimeError) as e:
        print(f"demo: error: {_one_line(e)}", file=sys.stderr)
        return 1
    finally:
        if not args.keep:
            _cleanup(env, work)
    return 0


def _one_line(e: BaseException) -> str:
    if isinstance(e, subprocess.CalledProcessError):
        said = (e.stderr or "").strip().splitlines() if isinstance(e.stderr, str) else []
        return f"{' '.join(map(str, e.cmd))} exited {e.returncode}" + (
            f": {said[-1]}" if said else "")
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def _demo(env: dict[str, str], work: Path) -> None:
    print("1. building (or reusing) a Debian bookworm + python3 + numpy image ...", flush=True)
    with timer() as t:
        src, tag = corpus.debian_numpy_image()
    print(f"   {src}:{tag} ready in {t[0]:.1f} s")

    with RegistryServer(storage=work / "registry") as registry:
        print(f"2. docker-registry listening on {registry.host}")
        lazy = registry.ref("demo/numpy", "rafs")
        plain = registry.ref("demo/numpy", "oci")
        with timer() as t:
            _rafs(env, "convert", f"oci:{src}:{tag}", lazy, "--no-progress")
        print(f"3. converted to RAFS and pushed as {lazy} in {t[0]:.1f} s")
        print("   " + _rafs(env, "inspect", lazy).stdout.rstrip().replace("\n", "\n   "))
        subprocess.run(["skopeo", "copy", "--dest-tls-verify=false", f"oci:{src}:{tag}", plain],
                       check=True, capture_output=True, text=True)
        print(f"   and pushed the plain OCI image as {plain}")

        seconds, out = _run(env, lazy, "--keep-mounted")
        print(f"4. rafs run {lazy} {' '.join(WORKLOAD[:2])} ...")
        print(f"   printed {out!r} {seconds:.2f} s after the command, starting lazily")
        mnt = next((work / "run" / "images").glob("*/mnt"))
        reply = json.loads(_rafs(env, "stats", str(mnt)).stdout)
        _rafs(env, "umount", str(mnt))
        image_bytes = json.loads(_rafs(env, "inspect", "--json", lazy).stdout)["blob_bytes"]
        fetched = reply["stats"]["backend_bytes"]
        print(f"   it fetched {fetched / 1e6:.1f} MB, {fetched / image_bytes:.1%} of the image's "
              f"{image_bytes / 1e6:.1f} MB of blobs (daemon mode: {reply.get('mode', 'fuse')})")

        eager, _ = _run(env, plain)
        print(f"5. rafs run of the plain OCI image (pull + unpack, then the same container): "
              f"{eager:.2f} s — the lazy start was {eager / seconds:.1f}x sooner")


if __name__ == "__main__":
    sys.exit(main())
