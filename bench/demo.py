"""`make demo`: build a real Debian image, convert it, mount it lazily, run python3 from it.

    python -m bench.demo [--work DIR]

Prints each step's time and how many bytes the run really fetched against the
size of the image. The container step runs the workload with chroot on the
read-only mount; `rafs run` (overlayfs + runc) takes its place once it exists.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench import corpus
from bench.tools import mounted, rafs, stats, timer

WORKLOAD = ["python3", "-c",
            "import json, sqlite3, sys; print('hello from', sys.version.split()[0])"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/var/tmp/rafs-demo"))
    args = ap.parse_args(argv)
    work: Path = args.work
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)

    print("1. building (or reusing) a Debian bookworm + python3 image ...", flush=True)
    with timer() as t:
        src, tag = corpus.debian_python_image()
    print(f"   {src}:{tag} ready in {t[0]:.1f} s")

    dst = work / "rafs"
    with timer() as t:
        rafs("convert", f"oci:{src}:{tag}", f"oci:{dst}:{tag}", capture=False)
    print(f"2. converted to RAFS in {t[0]:.1f} s")
    print(rafs("inspect", f"oci:{dst}:{tag}").stdout.rstrip())

    start = time.perf_counter()
    with mounted(f"oci:{dst}:{tag}", work / "mnt", work / "cache") as mnt:
        mount_ms = (time.perf_counter() - start) * 1000
        print(f"3. mounted lazily at {mnt} in {mount_ms:.0f} ms (empty chunk cache)")
        with timer() as t:
            out = subprocess.run(["chroot", str(mnt), *WORKLOAD], check=True,
                                 capture_output=True, text=True).stdout.strip()
        print(f"4. `{' '.join(WORKLOAD[:2])} ...` printed {out!r} in {t[0]:.2f} s (cold)")
        s = stats(mnt)["stats"]
        with timer() as t:
            subprocess.run(["chroot", str(mnt), *WORKLOAD], check=True, capture_output=True)
        print(f"   again, warm: {t[0]:.2f} s")
    image_bytes = json.loads(rafs("inspect", "--json", f"oci:{dst}:{tag}").stdout)["blob_bytes"]
    fetched = s["backend_bytes"]
    print(f"5. the cold run fetched {fetched / 1e6:.1f} MB in {s['backend_chunks']} chunks, "
          f"{fetched / image_bytes:.1%} of the image's {image_bytes / 1e6:.1f} MB of blobs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
