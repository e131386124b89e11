"""Lazy loading from a registry: how frugal and how fast, for the numpy workload.

    python -m bench.lazy [--samples 3] [--out results/lazy.json] [--profile wan]
                         [--mode auto|fuse|kernel]

A real ``docker-registry`` (bench.registry) holds the python3-numpy image
converted twice: plainly, and with the prefetch list that a traced run of the
workload (``chroot MNT python3 -c 'import numpy'``) gives. With ``--profile``,
the daemon reaches the registry through the link emulator (bench.linkemu).
Every sample starts cold: empty chunk cache, page cache dropped. Figures,
medians of ``--samples`` runs taken side by side:

- bytes fetched (compressed, on the wire) divided by bytes read (what the
  kernel asked the filesystem for), and as % of the image's blobs;
- Range requests made; wall time of mount + workload;
- the same with the optimized image and ``--prefetch``, where the workload
  starts once the prefetch is done, and its Range requests for the startup set.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from bench import corpus
from bench.registry import RegistryServer
from bench.tools import drop_caches, mounted, rafs, stats

WORKLOAD = ["python3", "-c", "import numpy"]
MB = 1e6


def _workload(mnt: Path) -> None:
    subprocess.run(["chroot", str(mnt), *WORKLOAD], check=True, capture_output=True)


def _wait_prefetch(mnt: Path, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while stats(mnt)["stats"]["prefetch"]["state"] == "running":  # type: ignore[index]
        if time.monotonic() > deadline:
            raise RuntimeError("prefetch did not finish")
        time.sleep(0.02)


@contextlib.contextmanager
def _link(registry: RegistryServer, profile: str | None) -> Iterator[str]:
    """The registry's address as the daemon reaches it (through the emulator if asked)."""
    if profile is None:
        yield registry.host
        return
    from bench.linkemu import LinkEmulator  # type: ignore[attr-defined]

    with LinkEmulator(registry.host, profile=profile) as link:
        yield link.address


def _image_bytes(ref: str) -> int:
    from rafs.oci import parse_image_ref
    from rafs.registry import RegistryClient

    image = parse_image_ref(ref)
    with RegistryClient.for_ref(image) as client:
        manifest = client.resolve(image)
    return sum(d.size for d in manifest.layers)


def sample(ref: str, work: Path, prefetch: bool, mode: str) -> dict[str, float]:
    cache = work / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    drop_caches()
    extra = ["--prefetch" if prefetch else "--no-prefetch", "--mode", mode]
    started = time.perf_counter()
    with mounted(ref, work / "mnt", cache, *extra) as mnt:
        mounted_at = time.perf_counter()
        if prefetch:
            _wait_prefetch(mnt)
        prefetched_at = time.perf_counter()
        _workload(mnt)
        done = time.perf_counter()
        s = stats(mnt)["stats"]
    return {
        "mount_s": mounted_at - started, "prefetch_s": prefetched_at - mounted_at,
        "workload_s": done - prefetched_at, "total_s": done - started,
        "fetched_bytes": s["backend_bytes"], "read_bytes": s["read_bytes"],  # type: ignore[index]
        "requests": s["backend_requests"],  # type: ignore[index]
        "ondemand_requests": s["requests"]["ondemand"],  # type: ignore[index]
        "prefetch_requests": s["requests"]["prefetch"],  # type: ignore[index]
        "cache_misses": s["cache_misses"],  # type: ignore[index]
    }


def _median(samples: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(s[k] for s in samples) for k in samples[0]}


def run(samples: int, profile: str | None, mode: str, work: Path) -> dict[str, object]:
    src, tag = corpus.debian_numpy_image()
    with RegistryServer() as registry:
        plain = registry.ref("bench/numpy", "rafs")
        rafs("convert", f"oci:{src}:{tag}", plain, "--no-progress")
        with mounted(plain, work / "trace-mnt", work / "trace-cache", "--no-prefetch") as mnt:
            _workload(mnt)
            (work / "prefetch.txt").write_text(rafs("trace", str(mnt)).stdout)
        optimized = registry.ref("bench/numpy", "optimized")
        rafs("convert", f"oci:{src}:{tag}", optimized, "--no-progress",
             "--prefetch-list", str(work / "prefetch.txt"))
        image_bytes = _image_bytes(plain)
        results: dict[str, list[dict[str, float]]] = {"lazy": [], "optimized_prefetch": []}
        with _link(registry, profile) as host:
            via = {name: ref.replace(registry.host, host) for name, ref in
                   (("lazy", plain), ("optimized_prefetch", optimized))}
            for _ in range(samples):  # side by side: alternate the scenarios
                results["lazy"].append(sample(via["lazy"], work, False, mode))
                results["optimized_prefetch"].append(
                    sample(via["optimized_prefetch"], work, True, mode))
    out: dict[str, object] = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                              "profile": profile or "local", "mode": mode,
                              "samples": samples,
                              "image_bytes": image_bytes,
                              "startup_files": len((work / "prefetch.txt").read_text().split())}
    for name, runs in results.items():
        m = _median(runs)
        m["fetched_per_read"] = m["fetched_bytes"] / m["read_bytes"]
        m["fetched_pct_of_image"] = 100 * m["fetched_bytes"] / image_bytes
        out[name] = {"median": m, "runs": runs}
    return out


def markdown(r: dict) -> str:
    lazy, opt = r["lazy"]["median"], r["optimized_prefetch"]["median"]
    return "\n".join([
        f"numpy import, cold, registry `{r['profile']}`, `--mode {r['mode']}`; image blobs "
        f"{r['image_bytes'] / MB:.1f} MB; median of {r['samples']}",
        "",
        "| Figure | lazy, no prefetch | optimized image, --prefetch |",
        "|---|---|---|",
        f"| Bytes fetched / bytes read | {lazy['fetched_per_read']:.2f} "
        f"({lazy['fetched_bytes'] / MB:.1f} / {lazy['read_bytes'] / MB:.1f} MB) | "
        f"{opt['fetched_per_read']:.2f} ({opt['fetched_bytes'] / MB:.1f} / "
        f"{opt['read_bytes'] / MB:.1f} MB) |",
        f"| Bytes fetched, % of the image | {lazy['fetched_pct_of_image']:.1f}% | "
        f"{opt['fetched_pct_of_image']:.1f}% |",
        f"| Range requests (on demand + prefetch) | {lazy['ondemand_requests']:.0f} + "
        f"{lazy['prefetch_requests']:.0f} | {opt['ondemand_requests']:.0f} + "
        f"{opt['prefetch_requests']:.0f} |",
        f"| Wall time: mount + (prefetch) + workload | {lazy['total_s']:.2f} s | "
        f"{opt['total_s']:.2f} s ({opt['mount_s']:.2f} + {opt['prefetch_s']:.2f} + "
        f"{opt['workload_s']:.2f}) |",
    ])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=3)
    ap.add_argument("--profile", choices=("wan", "lan", "local"), default=None,
                    help="reach the registry through the link emulator")
    ap.add_argument("--mode", choices=("auto", "fuse", "kernel"), default="auto")
    ap.add_argument("--out", type=Path, default=Path("results/lazy.json"))
    args = ap.parse_args(argv)
    profile = None if args.profile in (None, "local") else args.profile
    with tempfile.TemporaryDirectory(prefix="rafs-bench-lazy-", dir="/var/tmp") as tmp:
        results = run(args.samples, profile, args.mode, Path(tmp))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(markdown(results))
    print(f"results: {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
