"""Record the reads of a benchmark workload, for the read-ahead policy's tests and studies.

``python -m bench.readtrace numpy gcc postgres --out tests/data/readtrace`` converts
each corpus image (the ``bench.coldstart`` form: parent directory entries
added), pushes it to a local ``docker-registry``, runs its workload cold with
``rafs run`` in kernel and in fuse mode with the daemon's read log on
(``RAFS_READ_LOG``, ``fused.readlog``) and writes ``NAME.json.gz``:

- ``model``: the image as the policy sees it (``bench.readsim.Model``): chunk
  size, the chunk table in columns (blob, compressed offset and size,
  uncompressed offset and size) and every regular file with data as
  ``[nid, directory nid, [chunk index, ...]]``; no names, no data;
- ``traces``: ``kernel``: ``[[blob, offset, length], ...]`` (reads of the blob
  files' uncompressed address spaces); ``fuse``: ``[[nid, offset, length], ...]``
  (reads of files); each in the order the daemon received them.

No link emulation (the order of reads, not their timing, is what is kept).
``--readahead-kb N`` records with the kernel's read-ahead on the mounts set to
N KiB instead of the daemon's 1 MiB (``RAFS_READAHEAD_KB``), for studies of
granularity.
Needs root (mounts, runc) and the corpus images (``bench.corpus``).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench import corpus
from bench.coldstart import _check, _rafs_argv, _rafs_home, _ready, _run
from bench.readsim import model_from_bootstrap
from bench.registry import RegistryServer
from fused.readlog import ENV as READ_LOG_ENV
from rafs.bootstrap import Bootstrap
from rafs.image import open_local_image

MODES = ("kernel", "fuse")


def _read_log(path: Path) -> list[list[int]]:
    out: list[list[int]] = []
    for line in path.read_text().splitlines():
        r = json.loads(line)
        out.append([r["blob"] if "blob" in r else r["nid"], r["off"], r["len"]])
    return out


def record(name: str, registry: RegistryServer, work: Path,
           readahead_kb: int | None = None) -> dict[str, Any]:
    import subprocess

    spec = corpus.IMAGES[name]
    layout, tag = corpus.with_parent_dirs(*spec.build(None))
    ref = f"docker://{registry.host}/trace/{name}:rafs"
    local = work / f"{name}-rafs"
    _run(_rafs_argv("convert", f"oci:{layout}:{tag}", ref, "--no-progress"), f"convert {name}")
    _run(_rafs_argv("convert", f"oci:{layout}:{tag}", f"oci:{local}:rafs", "--no-progress"),
         f"convert {name} (local)")
    with Bootstrap.from_bytes(open_local_image(f"oci:{local}:rafs").bootstrap) as boot:
        model = model_from_bootstrap(boot)
    traces: dict[str, list[list[int]]] = {}
    for mode in MODES:
        log_path = work / f"{name}-{mode}.jsonl"
        with _rafs_home(work / f"home-{name}-{mode}") as env:
            env[READ_LOG_ENV] = str(log_path)
            if readahead_kb is not None:
                env["RAFS_READAHEAD_KB"] = str(readahead_kb)
            proc = subprocess.run(_rafs_argv("run", "--rm", "--mode", mode, ref, *spec.workload),
                                  env=env, text=True, capture_output=True,
                                  stdin=subprocess.DEVNULL, timeout=1800)
            _check(proc, f"rafs run {name} ({mode})")
            _ready(spec, proc.stdout)  # type: ignore[arg-type]
        traces[mode] = _read_log(log_path)
        print(f"readtrace: {name} {mode}: {len(traces[mode])} reads", file=sys.stderr)
    return {"image": name, "workload": list(spec.workload), "model": model, "traces": traces,
            "readahead_kb": readahead_kb}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.readtrace", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="+", choices=list(corpus.IMAGES))
    p.add_argument("--out", type=Path, default=Path("tests/data/readtrace"))
    p.add_argument("--readahead-kb", type=int, default=None,
                   help="the kernel's read-ahead on the mounts (default: the daemon's, "
                   "4096); the file is then NAME-raN.json.gz")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("readtrace: error: needs root (mounts, runc)", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="rafs-readtrace-", dir="/var/tmp") as tmp, \
            RegistryServer() as registry:
        for name in args.images:
            data = record(name, registry, Path(tmp), args.readahead_kb)
            suffix = "" if args.readahead_kb is None else f"-ra{args.readahead_kb}"
            path = args.out / f"{name}{suffix}.json.gz"
            with gzip.open(path, "wt", compresslevel=9) as f:
                json.dump(data, f, separators=(",", ":"))
            print(f"readtrace: {path}: {path.stat().st_size} bytes", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
