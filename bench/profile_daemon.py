"""Where a cold start's time goes inside the rafs daemon: py-spy on fused during one run.

    python -m bench.profile_daemon [--image numpy] [--form rafs|optimized]
        [--profile wan] [--mode auto] [--out results/profile-numpy-rafs-wan.txt]

One cold sample, as ``bench.coldstart`` takes them (registry behind the link
emulator, empty chunk cache, page cache dropped): ``rafs mount`` of the image,
then its workload in a chroot of the mount. ``py-spy record`` samples the
daemon from just after the mount until the workload exits. The report gives:
wall times (mount, workload), the daemon's CPU share (samples on CPU / wall
samples), the functions holding the most on-CPU samples (self and inclusive),
the FUSE requests by opcode and the read-latency histogram from ``rafs stats``,
and the link's byte counters.

Needs root and ``py-spy`` (in the venv). Nothing is asserted.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import corpus
from bench.registry import RegistryServer
from bench.tools import REPO, drop_caches

RATE = 250  # py-spy samples per second


def _env(run_dir: Path) -> dict[str, str]:
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": pythonpath, "RAFS_RUN_DIR": str(run_dir)}


def _rafs(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "runtime.cli", *args], env=env, text=True,
                          capture_output=True, check=True)


def _py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not os.access(found, os.X_OK):
        raise SystemExit("py-spy is not installed (pip install py-spy)")
    return found


def _top(collapsed: Path, n: int = 15) -> tuple[int, list[tuple[str, int]], list[tuple[str, int]]]:
    """Total samples, top functions by self samples, top by inclusive samples."""
    total, self_c, incl = 0, collections.Counter[str](), collections.Counter[str]()
    for line in collapsed.read_text().splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_s)
        total += count
        frames = [f.split(" (")[0] + " " + f.rpartition("/")[2].rstrip(")")
                  for f in stack.split(";")[1:]]  # drop the thread frame
        if frames:
            self_c[frames[-1]] += count
        for f in set(frames):
            incl[f] += count
    return total, self_c.most_common(n), incl.most_common(n)


def profile(image_name: str, form: str, profile_name: str, mode: str, work: Path) -> str:
    from bench.linkemu import LinkEmulator

    spec = corpus.IMAGES[image_name]
    layout, tag = spec.build(None)
    env = _env(work / "run")
    mnt, cache, trace_mnt = work / "mnt", work / "cache", work / "trace"
    lines: list[str] = []
    with RegistryServer() as registry:
        plain = f"docker://{registry.host}/bench/{image_name}:rafs"
        _rafs(env, "convert", f"oci:{layout}:{tag}", plain, "--no-progress")
        ref = plain
        if form == "optimized":
            trace_mnt.mkdir()
            _rafs(env, "mount", plain, str(trace_mnt), "--cache-dir", str(work / "tcache"),
                  "--no-prefetch", "--mode", "fuse")
            try:
                subprocess.run(["chroot", str(trace_mnt), *spec.workload], check=True,
                               capture_output=True)
                (work / "prefetch.txt").write_text(_rafs(env, "trace", str(trace_mnt)).stdout)
            finally:
                _rafs(env, "umount", str(trace_mnt))
            ref = f"docker://{registry.host}/bench/{image_name}:optimized"
            _rafs(env, "convert", f"oci:{layout}:{tag}", ref, "--no-progress",
                  "--prefetch-list", str(work / "prefetch.txt"))
        with LinkEmulator(registry.host, profile=profile_name) as link:
            via = ref.replace(registry.host, link.host)
            mnt.mkdir()
            drop_caches()
            link.reset_counters()
            t0 = time.perf_counter()
            _rafs(env, "mount", via, str(mnt), "--cache-dir", str(cache), "--mode", mode)
            t1 = time.perf_counter()
            try:
                reply = json.loads(_rafs(env, "stats", str(mnt)).stdout)
                collapsed = work / "daemon.collapsed"
                spy = subprocess.Popen(
                    [_py_spy(), "record", "--pid", str(reply["pid"]), "--rate", str(RATE),
                     "--format", "raw", "--output", str(collapsed), "--nonblocking"],
                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                time.sleep(0.5)  # py-spy attaches
                t2 = time.perf_counter()
                subprocess.run(["chroot", str(mnt), *spec.workload], check=True,
                               capture_output=True)
                t3 = time.perf_counter()
                spy.send_signal(signal.SIGINT)
                spy.wait(60)
                stats = json.loads(_rafs(env, "stats", str(mnt)).stdout)
            finally:
                _rafs(env, "umount", str(mnt))
            counters = link.counters()
    s = stats["stats"]
    total, by_self, by_incl = _top(collapsed)
    wall_samples = (t3 - t2) * RATE
    lines += [
        f"image {image_name} ({form}), link {profile_name}, fused mode {stats['mode']}",
        f"mount {t1 - t0:.2f} s, workload {t3 - t2:.2f} s (profiled)",
        f"over the link: {counters.bytes_down / 1e6:.1f} MB down in {counters.connections} "
        f"connections; backend requests {s['backend_requests']}, fetched "
        f"{s['backend_bytes'] / 1e6:.1f} MB, read {s['read_bytes'] / 1e6:.1f} MB",
        f"daemon on CPU: {total} samples of ~{wall_samples:.0f} wall "
        f"({100 * total / max(wall_samples, 1):.0f}% of one core, all threads)",
        f"FUSE requests by opcode: {json.dumps(s['fuse_requests_by_op'])}",
        "read latency histogram (bucket upper bound s: count): " + ", ".join(
            f"{b}: {c}" for b, c in zip(s["read_latency"]["buckets"],
                                        s["read_latency"]["counts"], strict=True) if c),
        f"read latency sum {s['read_latency']['sum']:.2f} s",
        "", "top functions by on-CPU self samples:",
        *(f"  {c:6d}  {f}" for f, c in by_self),
        "", "top functions by on-CPU inclusive samples:",
        *(f"  {c:6d}  {f}" for f, c in by_incl),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image", default="numpy", choices=list(corpus.IMAGES))
    ap.add_argument("--form", default="rafs", choices=("rafs", "optimized"))
    ap.add_argument("--profile", default="wan", choices=("wan", "lan", "local"))
    ap.add_argument("--mode", default="auto", choices=("auto", "fuse", "kernel"))
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="rafs-profile-", dir="/var/tmp") as tmp:
        report = profile(args.image, args.form, args.profile, args.mode, Path(tmp))
    print(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
