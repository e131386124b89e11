"""Supervised mounts: what the supervisor costs in steady state, and the failover gap.

    python -m bench.failover [--work DIR] [--out results/failover.json] [--repeat N] [--kills N]

Figures, per mode (fuse, kernel), on the Debian python3 image converted into a
local OCI layout (no link in the way):

- steady state, ``rafs mount`` against ``rafs mount --supervise``, interleaved,
  median of ``--repeat`` runs, each on a fresh mount with the chunk cache full:
  the first metadata walk after mounting (``os.walk`` + ``lstat`` of every
  entry: in fuse mode every lookup reaches the daemon) and a warm read pass
  (every regular file under /usr read whole, its pages dropped per file
  before, ``POSIX_FADV_DONTNEED``, so every read reaches the daemon);
- failover gap, supervised, without a standby worker (the default: the next
  worker starts when one dies) and with one ready (``--standby``): 8 threads
  read small files in a loop (pages dropped per file, so each read reaches
  the daemon); the worker gets SIGKILL ``--kills`` times; the gap is the time
  from the kill to the first read answered after it (median and max), and
  until the supervisor's state file names the new worker as serving;
- memory per mount after a metadata walk and a read of every file under
  /usr/bin: RSS and PSS (``/proc/PID/smaps_rollup``: shared pages split
  between the processes sharing them) of a plain daemon, of a supervisor and
  its worker, and of a standby worker;

- mount to ready (``fused.client.mount``, in this process, as the snapshotter
  and ``rafs run`` call it): a spawned daemon, a spawned supervisor (its first
  worker a fresh interpreter too), one daemon and one supervisor forked by the
  node service (``rafs daemon``).

Prints a Markdown table and writes the JSON to ``--out``. Needs root for
kernel mode. Nothing here drops the whole page cache.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import threading
import time
from pathlib import Path
from typing import Any

from bench import corpus
from bench.modes import converted
from bench.tools import mounted

MODES = ("fuse", "kernel")


def _walk(root: Path) -> int:
    n = 0
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            os.lstat(os.path.join(dirpath, name))
            n += 1
    return n


def _files(root: Path) -> list[str]:
    out = []
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            if os.path.isfile(path) and not os.path.islink(path):
                out.append(path)
    return out


def _read_dropped(path: str) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        n = 0
        while piece := os.read(fd, 1 << 20):
            n += len(piece)
        return n
    finally:
        os.close(fd)


def _steady(image: str, work: Path, mode: str, supervise: bool) -> dict[str, float]:
    mnt = work / f"mnt-{mode}-{'sup' if supervise else 'plain'}"
    extra = ["--mode", mode, "--no-prefetch", "--supervise" if supervise else "--no-supervise"]
    with mounted(image, mnt, work / "cache", *extra):
        t = time.perf_counter()
        entries = _walk(mnt)
        walk = time.perf_counter() - t
        files = _files(mnt / "usr")
        t = time.perf_counter()
        total = sum(_read_dropped(p) for p in files)
        read = time.perf_counter() - t
    return {"walk_s": walk, "entries": entries, "read_s": read, "read_mb": total / 1e6}


def _state(mnt: Path) -> dict[str, Any]:
    """The supervisor's state file (cheaper to poll than ``rafs stats``)."""
    from fused.runstate import instances

    for inst in instances(mnt):
        if inst.owner_alive() and (st := inst.state()):
            return st
    return {}


def _wait_standby(mnt: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not _state(mnt).get("standby_pid"):
        if time.monotonic() > deadline:
            raise RuntimeError(f"no standby worker on {mnt} after {timeout}s")
        time.sleep(0.01)


def _wait_new_worker(mnt: Path, old: int, timeout: float = 120) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = _state(mnt)
        if st.get("phase") == "serving" and st.get("worker_pid") not in (None, old):
            return int(st["worker_pid"])
        time.sleep(0.002)
    raise RuntimeError(f"no new worker on {mnt} after {timeout}s")


def gaps(image: str, work: Path, mode: str, kills: int, standby: bool) -> dict[str, Any]:
    """Kill the worker of a supervised mount of ``image`` ``kills`` times under 8 readers."""
    mnt = work / f"mnt-{mode}-gap"
    with mounted(image, mnt, work / "cache", "--mode", mode, "--no-prefetch", "--supervise",
                 "--standby" if standby else "--no-standby", "--max-crashes", str(kills + 10)):
        files = [p for p in _files(mnt / "usr/bin") if os.path.getsize(p) < 256 << 10][:64]
        for p in files:
            _read_dropped(p)  # the chunk cache holds them: a read costs the daemon only
        answered: list[float] = []
        errors: list[str] = []
        lock = threading.Lock()
        stop = threading.Event()

        def reader(i: int) -> None:
            k = i
            while not stop.is_set():
                try:
                    _read_dropped(files[k % len(files)])
                except OSError as e:
                    with lock:
                        errors.append(str(e))
                now = time.monotonic()
                with lock:
                    answered.append(now)
                k += 7

        threads = [threading.Thread(target=reader, args=(i,), daemon=True) for i in range(8)]
        for t in threads:
            t.start()
        gaps, restarts = [], []
        pid = int(_state(mnt)["worker_pid"])
        for _ in range(kills):
            time.sleep(0.5)
            if standby:
                _wait_standby(mnt)  # the steady case: a standby is ready
            killed = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            pid = _wait_new_worker(mnt, pid)
            restarts.append(time.monotonic() - killed)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                with lock:
                    after = [t for t in answered if t > killed]
                if after:
                    gaps.append(min(after) - killed)
                    break
                time.sleep(0.01)
        stop.set()
        for t in threads:
            t.join(60)
    return {"kills": kills, "gap_median_s": statistics.median(gaps), "gap_max_s": max(gaps),
            "new_worker_median_s": statistics.median(restarts), "read_errors": len(errors),
            "reads": len(answered)}


def _memory(pid: int) -> dict[str, float]:
    """RSS and PSS of one process, in MB."""
    out = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("Rss", "Pss"):
            out[key.lower() + "_mb"] = int(value.split()[0]) / 1024
    return out


def memory(image: str, work: Path, mode: str) -> dict[str, dict[str, float]]:
    """RSS/PSS per process of a plain mount and of a supervised one with a standby."""
    out: dict[str, dict[str, float]] = {}
    for kind, flags in (("plain", ["--no-supervise"]), ("supervised", ["--standby"])):
        mnt = work / f"mnt-{mode}-mem-{kind}"
        with mounted(image, mnt, work / "cache", "--mode", mode, "--no-prefetch", *flags):
            if kind == "supervised":
                _wait_standby(mnt)
            _walk(mnt)
            for p in _files(mnt / "usr/bin"):
                _read_dropped(p)
            st = _state(mnt)
            roles = {"daemon": st["owner_pid"]} if kind == "plain" else {
                "supervisor": st["owner_pid"], "worker": st["worker_pid"],
                "standby": st["standby_pid"]}
            for role, pid in roles.items():
                out[role] = _memory(int(pid))
    return out


def start_times(image: str, work: Path, mode: str, repeat: int) -> dict[str, float]:
    """Mount-to-ready of ``fused.client.mount`` (what the snapshotter and ``rafs run``
    call, in their own process), plain and supervised, without and with the node
    service: the median of ``repeat`` mounts each, interleaved; the image local and
    its bootstrap cached, so this is the daemon's own start."""
    import subprocess
    import sys

    from bench.tools import REPO
    from fused import client
    from fused.options import MountOptions

    run_dir = Path(os.environ["RAFS_RUN_DIR"])
    cache = str(work / "cache")
    plain = MountOptions(cache, mode=mode, prefetch=False, supervise=False)
    supervised = MountOptions(cache, mode=mode, prefetch=False, supervise=True)
    kinds = {"spawned": plain, "spawned-supervised": supervised, "node": plain,
             "node-supervised": supervised}
    times: dict[str, list[float]] = {k: [] for k in kinds}
    with open(work / "node.log", "ab") as log:
        node = subprocess.Popen([sys.executable, "-m", "fused.node"], cwd=REPO, stdout=log,
                                stderr=log, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        while not (run_dir / "node.sock").exists():
            time.sleep(0.05)
        for _ in range(repeat):
            for kind, opts in kinds.items():
                sock = run_dir / "node.sock"
                hidden = run_dir / "node.sock.hidden"
                if kind.startswith("spawned"):
                    sock.rename(hidden)  # as if no service ran
                mnt = work / f"start-{mode}-{kind}"
                mnt.mkdir(parents=True, exist_ok=True)
                try:
                    t = time.perf_counter()
                    client.mount(image, mnt, opts)
                    times[kind].append(time.perf_counter() - t)
                finally:
                    if kind.startswith("spawned"):
                        hidden.rename(sock)
                    client.unmount(mnt)
    finally:
        node.terminate()
        node.wait(30)
    return {f"{k}_s": statistics.median(v) for k, v in times.items()}


def run(work: Path, repeat: int, kills: int, start_only: bool = False) -> dict[str, Any]:
    cache = corpus.default_cache_dir()
    src, tag = corpus.debian_python_image(cache)
    image = converted(work, src, tag, "python3-rafs")
    result: dict[str, Any] = {"image": "debian python3", "modes": {}}
    for mode in MODES:
        if start_only:
            result["modes"][mode] = {"start": start_times(image, work, mode, max(repeat, 5))}
            continue
        with mounted(image, work / f"warm-{mode}", work / "cache", "--mode", mode,
                     "--no-prefetch", "--no-supervise") as mnt:
            for p in _files(mnt / "usr"):
                _read_dropped(p)  # fill the chunk cache
        runs: dict[str, list[dict[str, float]]] = {"plain": [], "supervised": []}
        for _ in range(repeat):
            for kind in ("plain", "supervised"):
                runs[kind].append(_steady(image, work, mode, kind == "supervised"))
        row: dict[str, Any] = {}
        for kind, samples in runs.items():
            row[kind] = {key: statistics.median(s[key] for s in samples)
                         for key in ("walk_s", "read_s", "read_mb", "entries")}
        row["failover"] = gaps(image, work, mode, kills, standby=False)
        row["failover_standby"] = gaps(image, work, mode, kills, standby=True)
        row["memory"] = memory(image, work, mode)
        row["start"] = start_times(image, work, mode, max(repeat, 5))
        result["modes"][mode] = row
    return result


def markdown(result: dict[str, Any]) -> str:
    lines: list[str] = []
    rows = result["modes"]
    if all("failover" in row for row in rows.values()):
        lines += ["| mode | metadata walk plain / supervised (s) | warm read plain / supervised "
                  "(s, MB) | failover gap median / max (s) | state file names the new worker "
                  "(median s) | read errors |", "|---|---|---|---|---|---|"]
        for mode, row in rows.items():
            p, s = row["plain"], row["supervised"]
            for label, f in (("", row["failover"]), (", standby", row["failover_standby"])):
                lines.append(
                    f"| {mode}{label} | {p['walk_s']:.3f} / {s['walk_s']:.3f} "
                    f"({int(p['entries'])} entries) | {p['read_s']:.3f} / {s['read_s']:.3f} "
                    f"({p['read_mb']:.0f} MB) | {f['gap_median_s']:.3f} / {f['gap_max_s']:.3f} "
                    f"({f['kills']} kills) | {f['new_worker_median_s']:.3f} | "
                    f"{f['read_errors']} of {f['reads']} |")
        lines += ["", "| mode | plain daemon RSS / PSS (MB) | supervisor | worker | "
                  "standby worker |", "|---|---|---|---|---|"]
        for mode, row in rows.items():
            m = row["memory"]
            cells = [f"{m[r]['rss_mb']:.1f} / {m[r]['pss_mb']:.1f}"
                     for r in ("daemon", "supervisor", "worker", "standby")]
            lines.append(f"| {mode} | {' | '.join(cells)} |")
        lines.append("")
    lines += ["| mode | mount to ready, spawned: daemon / supervised (s) | forked by the node "
              "service: daemon / supervised (s) |", "|---|---|---|"]
    for mode, row in rows.items():
        st = row["start"]
        lines.append(f"| {mode} | {st['spawned_s']:.3f} / {st['spawned-supervised_s']:.3f} | "
                     f"{st['node_s']:.3f} / {st['node-supervised_s']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.failover")
    p.add_argument("--work", type=Path, default=Path("/var/tmp/rafs-bench-failover"))
    p.add_argument("--out", type=Path, default=Path("results/failover.json"))
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--kills", type=int, default=10)
    p.add_argument("--start-only", action="store_true", help="only the mount-to-ready times")
    args = p.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("RAFS_RUN_DIR", str(args.work / "run"))
    result = run(args.work, args.repeat, args.kills, args.start_only)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
