"""A node starting images one after another on one chunk cache, with and without a cap.

    python -m bench.node [--starts 24] [--cap-fraction 0.5] [--profile wan]
                         [--images minbase,python,numpy,numpy-opt,nodejs,large]
                         [--mode auto] [--seed 2] [--work DIR] [--out results/node.json]

The corpus images (``bench.corpus``) are converted to RAFS and pushed to a local
``docker-registry``, reached through the link emulator (``bench.linkemu``,
``--profile``). ``numpy-opt`` is the numpy image converted again on its own with a
prefetch list traced from its workload (what ``rafs optimize`` does): it shares every
layer with ``numpy`` and ``python`` but its blobs are laid out differently, so it
shares chunks with them, not blobs (the case node-wide dedup is for).

A fixed random sequence of ``--starts`` image starts (``rafs run --rm IMAGE
WORKLOAD``, each on a new daemon: the last container of an image unmounts it)
runs twice, each time on a new empty cache under one private rafs root: uncapped,
then capped at ``--cap-fraction`` of what the uncapped run left in the cache
(set in the host config file, ``RAFS_CONFIG``, as an operator would). Per start:
wall time, bytes over the link; per run: bytes fetched, the host-wide hit ratio,
evictions and refetches (``rafs cache status``).

Then the dedup figure: on a new cache, every file of ``numpy`` is read through a
mount, then every file of ``numpy-opt``: bytes fetched for ``numpy-opt``, bytes of
chunk data on disk, against the sum of the two images' unique chunks (by sha256)
and against what per-blob storage would hold.

Prints Markdown tables and writes the JSON to ``--out``. Needs root (mounts, runc).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench import corpus
from bench.registry import RegistryServer
from bench.tools import REPO, read_tree

MB = 1e6
IMAGES = ("minbase", "python", "numpy", "numpy-opt", "nodejs", "large")
WORKLOADS: dict[str, tuple[str, ...]] = {
    "python": ("python3", "-c", "print('ok')"),
    "numpy-opt": corpus.IMAGES["numpy"].workload,
    **{name: img.workload for name, img in corpus.IMAGES.items()},
}


def _env(**extra: str) -> dict[str, str]:
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": pythonpath, **extra}


def _rafs(*args: str, env: dict[str, str] | None = None, timeout: float = 1800
          ) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "runtime.cli", *args], cwd=REPO, text=True,
                          capture_output=True, env=env or _env(), timeout=timeout,
                          stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise SystemExit(f"rafs {' '.join(args[:3])} failed ({proc.returncode}): "
                         f"{proc.stderr.strip()[-2000:]}")
    return proc


def _progress(message: str) -> None:
    print(f"node: {message}", file=sys.stderr, flush=True)


def _layout(name: str) -> tuple[Path, str]:
    if name == "python":
        return corpus.debian_python_image()
    return corpus.IMAGES["numpy" if name == "numpy-opt" else name].build(None)


@contextmanager
def _mount(ref: str, mnt: Path, cache: Path, env: dict[str, str]) -> Iterator[Path]:
    mnt.mkdir(parents=True, exist_ok=True)
    _rafs("mount", ref, str(mnt), "--cache-dir", str(cache), "--no-prefetch", env=env)
    try:
        yield mnt
    finally:
        res = subprocess.run([sys.executable, "-m", "runtime.cli", "umount", str(mnt)],
                             cwd=REPO, env=env, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            subprocess.run([sys.executable, "-m", "runtime.cli", "umount", "-z", str(mnt)],
                           cwd=REPO, env=env, capture_output=True, check=False)


def prepare(names: list[str], registry: RegistryServer, work: Path) -> dict[str, str]:
    """Push every image as RAFS; returns name -> repository:tag."""
    repos = {}
    for name in names:
        layout, tag = _layout(name)
        repo = f"node/{name}:rafs"
        args = ["convert", "--no-progress", f"oci:{layout}:{tag}",
                f"docker://{registry.host}/{repo}"]
        if name == "numpy-opt":
            args[1:1] = ["--prefetch-list", str(_trace(layout, tag, work))]
        _progress(f"converting {name}")
        _rafs(*args)
        repos[name] = repo
    return repos


def _trace(layout: Path, tag: str, work: Path) -> Path:
    """The files numpy's workload opens (``rafs trace``), in order: a prefetch list."""
    out = work / "numpy.trace"
    if out.exists():
        return out
    local = work / "numpy-rafs"
    if not (local / "index.json").exists():
        _rafs("convert", "--no-progress", f"oci:{layout}:{tag}", f"oci:{local}:{tag}")
    env = _env(RAFS_RUN_DIR=str(work / "trace-run"))
    with _mount(f"oci:{local}:{tag}", work / "trace-mnt", work / "trace-cache", env) as mnt:
        subprocess.run(["chroot", str(mnt), *WORKLOADS["numpy"]], check=True,
                       capture_output=True)
        paths = _rafs("trace", str(mnt), env=env).stdout
    out.write_text(paths)
    return out


def _status(env: dict[str, str], cache: Path) -> dict[str, Any]:
    return json.loads(_rafs("cache", "status", "--json", "--cache-dir", str(cache),
                            env=env).stdout)


def simulate(sequence: list[str], repos: dict[str, str], host: str, link: Any, base: Path,
             cap: int | None, mode: str) -> dict[str, Any]:
    """One run of the sequence on a new cache; ``cap`` bytes (None: no cap)."""
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    conf = base / "rafs.toml"
    conf.write_text("[cache]\n" + (f'max = "{cap}"\n' if cap is not None else "")
                    + 'min_free = "off"\n')
    cache = base / "root" / "cache"
    env = _env(RAFS_ROOT=str(base / "root"), RAFS_RUN_DIR=str(base / "run"),
               RAFS_CONFIG=str(conf))
    starts = []
    for i, name in enumerate(sequence):
        link.reset_counters()
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "runtime.cli", "run", "--rm", "--net",
                               "none", "--mode", mode, f"docker://{host}/{repos[name]}",
                               *WORKLOADS[name]], cwd=REPO, env=env, text=True,
                              capture_output=True, stdin=subprocess.DEVNULL, timeout=1800)
        seconds = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"start {i} ({name}) failed ({proc.returncode}): "
                             f"{proc.stderr.strip()[-2000:]}")
        counters = link.wait_idle()
        size = _status(env, cache)["size"]
        starts.append({"image": name, "seconds": seconds, "link_bytes": counters.bytes_down,
                       "cache_bytes": size})
        _progress(f"{'capped' if cap else 'uncapped'} #{i + 1} {name}: {seconds:.2f} s, "
                  f"{counters.bytes_down / MB:.1f} MB over the link, cache {size / MB:.1f} MB")
    status = _status(env, cache)
    shutil.rmtree(base, ignore_errors=True)
    c = status["counters"]
    return {
        "cap": cap, "starts": starts,
        "link_bytes": sum(s["link_bytes"] for s in starts),
        "seconds": sum(s["seconds"] for s in starts),
        "median_s": statistics.median(s["seconds"] for s in starts),
        "max_cache_bytes": max(s["cache_bytes"] for s in starts),
        "final_cache_bytes": status["size"],
        "hit_ratio": status["hit_ratio"], "hits": status["hits"], "misses": status["misses"],
        "evicted_chunks": c.get("evicted_chunks", 0), "refetched": c.get("refetched", 0),
        "dedup_bytes": c.get("dedup_bytes", 0), "fetched_bytes": c.get("fetched_bytes", 0),
    }


def dedup(repos: dict[str, str], host: str, base: Path) -> dict[str, Any]:
    """numpy then numpy-opt read whole on one cache: bytes fetched and stored."""
    from fused.evict import bootstrap_files
    from rafs.bootstrap import Bootstrap

    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    cache = base / "cache"
    env = _env(RAFS_RUN_DIR=str(base / "run"), RAFS_CONFIG=str(base / "none.toml"))
    out: dict[str, Any] = {}
    for name in ("numpy", "numpy-opt"):
        with _mount(f"docker://{host}/{repos[name]}", base / f"mnt-{name}", cache, env) as m:
            read = read_tree(m)
            stats = json.loads(_rafs("stats", str(m), env=env).stdout)["stats"]
        out[name] = {"read_bytes": read, "fetched_bytes": stats["backend_bytes"],
                     "dedup_bytes": stats["dedup_bytes"], "dedup_hits": stats["dedup_hits"]}
    unique: dict[bytes, int] = {}
    per_blob = 0
    for _digest, path, _mtime in bootstrap_files(cache):
        b = Bootstrap.open(path)
        try:
            for c in b.chunks():
                unique[c.sha256] = c.uncompressed_size
                per_blob += c.uncompressed_size
        finally:
            b.close()
    on_disk = sum(p.stat().st_blocks * 512 for p in (cache / "blobs").rglob("*.data"))
    out.update({"data_on_disk": on_disk, "unique_chunk_bytes": sum(unique.values()),
                "per_blob_bytes": per_blob})
    shutil.rmtree(base, ignore_errors=True)
    return out


def markdown(r: dict[str, Any]) -> str:
    u, c, d = r["uncapped"], r["capped"], r["dedup"]
    lines = [
        f"{len(u['starts'])} starts ({', '.join(r['images'])}; seed {r['seed']}), "
        f"profile {r['profile']}, mode {r['mode']}; cap = {r['cap_fraction']:.0%} of the "
        f"{u['final_cache_bytes'] / MB:.0f} MB the uncapped run left = "
        f"{c['cap'] / MB:.0f} MB",
        "",
        "| run | fetched over the link | hit ratio | starts: total / median | largest cache "
        "| evicted chunks | refetched | dedup saved |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, x in (("uncapped", u), ("capped", c)):
        ratio = "n/a" if x["hit_ratio"] is None else f"{x['hit_ratio'] * 100:.1f} %"
        lines.append(
            f"| {label} | {x['link_bytes'] / MB:.1f} MB | {ratio} | {x['seconds']:.1f} s / "
            f"{x['median_s']:.2f} s | {x['max_cache_bytes'] / MB:.1f} MB | "
            f"{x['evicted_chunks']:,} | {x['refetched']:,} | {x['dedup_bytes'] / MB:.1f} MB |")
    lines += ["", "| image | starts | median start, uncapped | capped |", "|---|---|---|---|"]
    for name in r["images"]:
        us = [s["seconds"] for s in u["starts"] if s["image"] == name]
        cs = [s["seconds"] for s in c["starts"] if s["image"] == name]
        if us:
            lines.append(f"| {name} | {len(us)} | {statistics.median(us):.2f} s | "
                         f"{statistics.median(cs):.2f} s |")
    n, o = d["numpy"], d["numpy-opt"]
    lines += [
        "",
        "| dedup: numpy, then numpy-opt read whole | |",
        "|---|---|",
        f"| numpy: read / fetched | {n['read_bytes'] / MB:.1f} MB / "
        f"{n['fetched_bytes'] / MB:.1f} MB |",
        f"| numpy-opt: read / fetched / not fetched thanks to a local copy | "
        f"{o['read_bytes'] / MB:.1f} MB / {o['fetched_bytes'] / MB:.1f} MB / "
        f"{o['dedup_bytes'] / MB:.1f} MB ({o['dedup_hits']:,} chunks) |",
        f"| chunk data on disk | {d['data_on_disk'] / MB:.1f} MB |",
        f"| sum of the two images' unique chunks | {d['unique_chunk_bytes'] / MB:.1f} MB |",
        f"| per-blob storage (no node-wide dedup) | {d['per_blob_bytes'] / MB:.1f} MB |",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", default=",".join(IMAGES))
    ap.add_argument("--starts", type=int, default=24)
    ap.add_argument("--cap-fraction", type=float, default=0.5)
    ap.add_argument("--profile", default="wan", choices=("wan", "lan", "local"))
    ap.add_argument("--mode", default="auto", choices=("auto", "fuse", "kernel"))
    ap.add_argument("--seed", type=int, default=2)  # every image appears at least twice
    ap.add_argument("--work", type=Path, default=Path("/var/tmp/rafs-bench-node"))
    ap.add_argument("--out", type=Path, default=Path("results/node.json"))
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("bench.node needs root (mounts, runc)")
    from bench.linkemu import LinkEmulator

    names = [n.strip() for n in args.images.split(",") if n.strip()]
    unknown = sorted(set(names) - set(IMAGES))
    if unknown:
        raise SystemExit(f"unknown image {unknown[0]} (known: {', '.join(IMAGES)})")
    rng = random.Random(args.seed)
    # A mix with repeats, popular images more often (a node's usual skew).
    weights = [len(names) - k for k in range(len(names))]
    sequence = rng.choices(names, weights=weights, k=args.starts)
    args.work.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"images": names, "seed": args.seed, "profile": args.profile,
                              "mode": args.mode, "cap_fraction": args.cap_fraction,
                              "sequence": sequence}
    with RegistryServer() as registry:
        repos = prepare(names, registry, args.work)
        with LinkEmulator(registry.host, profile=args.profile) as link:
            result["uncapped"] = simulate(sequence, repos, link.host, link,
                                          args.work / "uncapped", None, args.mode)
            cap = int(result["uncapped"]["final_cache_bytes"] * args.cap_fraction)
            result["capped"] = simulate(sequence, repos, link.host, link,
                                        args.work / "capped", cap, args.mode)
        if "numpy" in repos and "numpy-opt" in repos:
            result["dedup"] = dedup(repos, registry.host, args.work / "dedup")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
