"""Where the time of one ``rafs run`` goes, phase by phase (warm chunk cache, no link).

    python -m bench.runphases [--work DIR] [--out results/runphases.json] [--samples N]
                              [--mode auto|kernel|fuse]

Each sample is ``rafs -v run --rm`` of the converted python3-numpy image with
``python3 -c 'import numpy; print("ready")'``, in a private ``RAFS_ROOT`` and
``RAFS_RUN_DIR`` (so every sample starts its own daemon, as a first ``rafs
run`` of an image does), after one unmeasured run that fills the chunk cache.
The phases, in seconds from the command's start, come from its log lines
(``-v``) and from when the container's output and the command's exit arrive:

- ``resolved``: the CLI is up and the image's manifest is read;
- ``mounted``: the daemon started, loaded the bootstrap and is serving;
- ``runc``: the overlay is mounted and runc is started;
- ``ready``: the container printed its line (its Python imported numpy);
- ``exit``: the command ended (container gone, overlay, image mount and
  container directory undone).

Prints the medians and writes every sample to ``--out``. Needs root.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import corpus
from bench.tools import rafs

PHASES = {"resolved": "runtime.image INFO", "mounted": "runtime.imagemount INFO mounted ",
          "runc": "runtime.run INFO starting "}
WORKLOAD = ("python3", "-c", "import numpy; print('ready', flush=True)")


def converted_numpy(work: Path) -> str:
    src, tag = corpus.debian_numpy_image()
    dst = work / "numpy-rafs"
    if not (dst / "index.json").exists():
        rafs("convert", "--no-progress", f"oci:{src}:{tag}", f"oci:{dst}:{tag}")
    return f"oci:{dst}:{tag}"


def _log_time(stderr: str, marker: str, start: float) -> float | None:
    for line in stderr.splitlines():
        if marker in line:
            stamp = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
            return stamp.timestamp() - start
    return None


def sample(ref: str, cache: Path, mode: str) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="rafs-runphases-") as tmp:
        env = dict(os.environ, RAFS_ROOT=f"{tmp}/root", RAFS_RUN_DIR=f"{tmp}/run")
        argv = [sys.executable, "-m", "runtime.cli", "-v", "run", "--rm", "--mode", mode,
                "--cache-dir", str(cache), ref, *WORKLOAD]
        start = time.time()
        proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        ready = time.time() - start
        out, err = proc.communicate(timeout=600)
        end = time.time() - start
        if proc.returncode != 0 or line.strip() != "ready":
            raise SystemExit(f"rafs run failed ({proc.returncode}): {line}{out}\n{err}")
    row: dict[str, float] = {}
    for name, marker in PHASES.items():
        at = _log_time(err, marker, start)
        if at is None:
            raise SystemExit(f"no {marker!r} line in the log of rafs run:\n{err}")
        row[name] = at
    row["ready"], row["exit"] = ready, end
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/var/tmp/rafs-bench-runphases"))
    ap.add_argument("--out", type=Path, default=Path("results/runphases.json"))
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--mode", default="auto", choices=("auto", "kernel", "fuse"))
    args = ap.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    ref = converted_numpy(args.work)
    cache = args.work / "cache"
    sample(ref, cache, args.mode)  # fills the chunk cache and stamps the bootstrap
    rows = [sample(ref, cache, args.mode) for _ in range(args.samples)]
    medians = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    result: dict[str, Any] = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                              "mode": args.mode, "load": os.getloadavg()[0],
                              "median_s": medians, "samples": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print("| phase (s from the command's start, median) | " + " | ".join(medians) + " |")
    print("|---|" + "---|" * len(medians))
    print(f"| rafs run, {args.mode} mode | " + " | ".join(f"{v:.3f}" for v in medians.values())
          + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
