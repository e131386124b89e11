"""Cold-start benchmark: rafs against the OCI path through containerd, over an emulated link.

    rafs bench [--quick] [--profile P]... [--images NAME...] [--samples N] [--out DIR]
    python -m bench.coldstart ...            (the same)

Owns: preparing the images (bench.corpus) in a local ``docker-registry`` in three
forms (plain OCI with gzip layers via ``skopeo copy``; RAFS via ``rafs convert``;
RAFS optimized via ``rafs optimize`` with the image's workload), the five
scenarios, the cold-start discipline, the figures, and writing
``coldstart.json``, ``coldstart.md`` and one ``coldstart-<profile>.png`` per
profile into ``--out``.

Scenarios (each sample is cold: a new containerd and snapshotter on empty
directories, an empty rafs root and chunk cache, page cache dropped):

1. ``oci-containerd``: ``ctr image pull`` + ``ctr container create`` + ``ctr task
   start`` with the overlayfs snapshotter (download and unpack everything first);
2. ``rafs-containerd``: ``ctr-remote image rpull --snapshotter rafs`` + the same
   create/start with ``--snapshotter rafs`` (chunks fetched as they are read);
   ``rafs-containerd-node``: the same with the node service (``rafs daemon``,
   started and warm before the sample's clock starts) forking each mount's daemon;
3. ``rafs-lazy``: ``rafs run`` of the RAFS image;
4. ``rafs-optimized``: ``rafs run`` of the optimized image (prefetch of the traced
   files);
5. ``oci-rafs-run``: ``rafs run`` of the plain OCI image (eager pull + unpack).

The registry is reached through ``bench.linkemu`` with the chosen profile; the
bytes over the link come from its counters, read when the workload is ready.
Phases: for containerd, the three ``ctr`` commands; for ``rafs run``, read from
its ``-v`` log (image mounted or unpacked = end of pull, runc started = end of
create). Ready = the workload exited 0 with the expected output.

The ideal per image and profile: the warm run time (``rafs run`` of the unpacked
plain image, page cache warm) plus the bytes the workload reads (as the kernel
asked the rafs daemon for them, at the image's compression ratio) at link rate,
plus one round trip. Nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from bench import corpus
from bench.containerd_env import (
    Containerd,
    containerd_daemon,
    mounts_under,
    snapshotter_process,
    unmount_under,
)
from bench.registry import RegistryServer
from bench.tools import REPO, drop_caches
from rafs.errors import RafsError

__all__ = ["SCENARIOS", "BenchConfig", "main", "run_bench"]

SCENARIOS = ("oci-containerd", "rafs-containerd", "rafs-containerd-node", "rafs-lazy",
             "rafs-optimized", "oci-rafs-run")
PROFILES = ("wan", "lan", "local")
FULL_IMAGES = ("minbase", "numpy", "nodejs", "large")
QUICK_IMAGE = "numpy"
MB = 1e6
PHASES = ("pull_s", "create_s", "run_s")


class BenchError(RafsError):
    """A scenario did not reach ready, or the setup failed; the message says which."""


@dataclass
class BenchConfig:
    images: list[str]
    profiles: list[str]
    samples: int = 3
    mode: str = "auto"
    out: Path = Path("results")
    work: Path | None = None
    failover_kills: int = 5


@dataclass
class Prepared:
    """One image in the registry in its three forms (refs without the registry host)."""

    name: str
    workload: tuple[str, ...]
    expect: str | None
    repos: dict[str, str]  # form -> "bench/NAME:TAG"
    bytes: dict[str, int]  # form -> layer bytes in the registry
    unpacked_bytes: int = 0
    warm_s: float = 0.0
    warm_runs: list[float] = field(default_factory=list)


# ---------------------------------------------------------------------------------------
# Processes


def _env(**extra: str) -> dict[str, str]:
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": pythonpath, **extra}


def _rafs_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "runtime.cli", *args]


def _check(proc: subprocess.CompletedProcess[str], what: str) -> subprocess.CompletedProcess[str]:
    if proc.returncode != 0:
        raise BenchError(f"{what} exited {proc.returncode}: "
                         f"{(proc.stderr or proc.stdout).strip()[-1500:]}")
    return proc


def _run(argv: list[str], what: str, env: dict[str, str] | None = None,
         timeout: float = 1800) -> subprocess.CompletedProcess[str]:
    return _check(subprocess.run(argv, env=env or _env(), text=True, capture_output=True,
                                 stdin=subprocess.DEVNULL, timeout=timeout), what)


def _ready(image: Prepared, stdout: str) -> None:
    if image.expect is not None and not stdout.strip().startswith(image.expect):
        raise BenchError(f"{image.name}: the workload printed {stdout.strip()[:200]!r}, "
                         f"not {image.expect!r}")


@contextlib.contextmanager
def _rafs_home(base: Path) -> Iterator[dict[str, str]]:
    """A private, empty rafs root and run dir; everything mounted under them is
    unmounted at the end."""
    base.mkdir(parents=True, exist_ok=True)
    env = _env(RAFS_ROOT=str(base / "root"), RAFS_RUN_DIR=str(base / "run"))
    try:
        yield env
    finally:
        _unmount_all(base, env)
        shutil.rmtree(base, ignore_errors=True)


def _image_mounts(base: Path) -> list[str]:
    """rafs image mount points under ``base``: fuse-mode FUSE mounts and kernel-mode
    EROFS mounts (not the blob FUSE mounts kernel mode keeps beside them)."""
    return [mp for mp, fs in mounts_under(base)
            if fs in ("fuse.rafs", "erofs") and not mp.endswith(".blobs")]


def _unmount_all(base: Path, env: dict[str, str]) -> None:
    """``rafs umount`` every image mount under ``base`` (its daemon stops), then
    anything left (overlays, binds) with ``unmount_under``."""
    for mp in _image_mounts(base):
        subprocess.run(_rafs_argv("umount", mp), env=env, capture_output=True, timeout=120,
                       check=False)
    unmount_under(base)


# ---------------------------------------------------------------------------------------
# Preparation: three forms per image


def _layer_bytes(ref: str) -> int:
    from rafs.oci import parse_image_ref
    from rafs.registry import RegistryClient

    image = parse_image_ref(ref)
    with RegistryClient.for_ref(image) as client:
        return sum(d.size for d in client.resolve(image).layers)


def prepare(name: str, registry: RegistryServer, work: Path, mode: str) -> Prepared:
    spec = corpus.IMAGES[name]
    _progress(f"{name}: building/loading the corpus image")
    layout, tag = spec.build(None)
    repo = f"bench/{name}"
    repos = {"oci": f"{repo}:oci", "rafs": f"{repo}:rafs", "optimized": f"{repo}:optimized"}

    def ref(form: str) -> str:
        return f"docker://{registry.host}/{repos[form]}"

    _progress(f"{name}: pushing plain OCI, converting, optimizing")
    _run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false", f"oci:{layout}:{tag}",
          ref("oci")], f"skopeo copy {name}")
    _run(_rafs_argv("convert", f"oci:{layout}:{tag}", ref("rafs"), "--no-progress"),
         f"rafs convert {name}")
    with _rafs_home(work / f"prep-{name}") as env:
        _run(_rafs_argv("optimize", ref("oci"), ref("optimized"), "--", *spec.workload),
             f"rafs optimize {name}", env=env)
    prepared = Prepared(name, spec.workload, spec.expect, repos,
                        {form: _layer_bytes(ref(form)) for form in repos})
    _measure_warm(prepared, ref("oci"), work / f"warm-{name}")
    return prepared


def _measure_warm(image: Prepared, ref: str, base: Path, runs: int = 3) -> None:
    """Warm run time (unpacked plain image on local disk, page cache warm) and the
    unpacked size."""
    with _rafs_home(base) as env:
        argv = _rafs_argv("run", "--rm", ref, *image.workload)
        _run(argv, f"rafs run {image.name} (unpack for the warm runs)", env=env)
        _run(argv, f"rafs run {image.name} (warm-up)", env=env)
        for _ in range(runs):
            t0 = time.perf_counter()
            proc = _run(argv, f"rafs run {image.name} (warm)", env=env)
            image.warm_runs.append(time.perf_counter() - t0)
            _ready(image, proc.stdout)
        image.warm_s = statistics.median(image.warm_runs)
        du = _run(["du", "-sb", str(Path(env["RAFS_ROOT"]) / "rootfs")], "du")
        image.unpacked_bytes = int(du.stdout.split()[0])


# ---------------------------------------------------------------------------------------
# Scenarios: one cold sample each


_LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


def _log_times(stderr: str, *needles: str) -> list[float | None]:
    """Wall-clock time of the first log line containing each needle."""
    found: list[float | None] = []
    for needle in needles:
        t = None
        for line in stderr.splitlines():
            m = _LOG_TIME.match(line)
            if m and needle in line:
                t = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
                break
        found.append(t)
    return found


def _daemon_stats(mnt_root: Path, env: dict[str, str]) -> dict[str, Any]:
    """``rafs stats`` of the one rafs mount under ``mnt_root`` ({} if none)."""
    mps = _image_mounts(mnt_root)
    if len(mps) != 1:
        raise BenchError(f"expected one rafs image mount under {mnt_root}, found {mps}")
    return json.loads(_run(_rafs_argv("stats", mps[0]), "rafs stats", env=env).stdout)


def _stats_fields(reply: dict[str, Any]) -> dict[str, Any]:
    if not reply:
        return {}
    s = reply["stats"]
    return {"mode": reply.get("mode"), "daemon_ready_s": reply.get("ready_seconds"),
            "fetched_bytes": s["backend_bytes"],
            "read_bytes": s["read_bytes"], "backend_requests": s["backend_requests"],
            "fuse_requests_by_op": s.get("fuse_requests_by_op", {}),
            "prefetch_state": s["prefetch"]["state"]}


def _rafs_run_sample(image: Prepared, ref: str, base: Path, mode: str, link: Any,
                     lazy: bool) -> dict[str, Any]:
    with _rafs_home(base) as env:
        drop_caches()
        link.reset_counters()
        argv = _rafs_argv("-v", "run", "--rm", "--keep-mounted", "--mode", mode, ref,
                          *image.workload)
        wall0, t0 = time.time(), time.perf_counter()
        proc = subprocess.run(argv, env=env, text=True, capture_output=True,
                              stdin=subprocess.DEVNULL, timeout=1800)
        total = time.perf_counter() - t0
        counters = link.counters()
        _check(proc, f"rafs run {ref}")
        _ready(image, proc.stdout)
        pulled, started = _log_times(proc.stderr, "runtime.imagemount INFO mounted ",
                                     "runtime.run INFO starting ")
        if pulled is None:
            pulled = _log_times(proc.stderr, "runtime.unpack INFO unpacked ")[0]
        if pulled is None or started is None:
            raise BenchError(f"rafs run {ref}: no phase lines in its log:\n{proc.stderr}")
        out: dict[str, Any] = {
            "pull_s": pulled - wall0, "create_s": started - pulled,
            "run_s": total - (started - wall0), "total_s": total,
            "link_bytes": counters.bytes_down, "link_bytes_up": counters.bytes_up,
            "connections": counters.connections,
        }
        if lazy:
            out.update(_stats_fields(_daemon_stats(base / "run", env)))
        return out


@contextlib.contextmanager
def node_service(run_dir: Path, log: Path) -> Iterator[int | None]:
    """``rafs daemon`` on ``run_dir`` until the block ends (its mounts stay)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as logf:
        proc = subprocess.Popen(_rafs_argv("daemon"), env=_env(RAFS_RUN_DIR=str(run_dir)),
                                stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not (run_dir / "node.sock").exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"rafs daemon did not start: {log.read_text()[-1500:]}")
            time.sleep(0.05)
        yield proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _containerd_sample(image: Prepared, ref: str, base: Path, rafs: bool, mode: str,
                       link: Any, node: bool = False) -> dict[str, Any]:
    sock = base / "snapshotter.sock"
    base.mkdir(parents=True, exist_ok=True)
    env = _env(RAFS_RUN_DIR=str(base / "run"))
    old_run_dir = os.environ.get("RAFS_RUN_DIR")
    os.environ["RAFS_RUN_DIR"] = env["RAFS_RUN_DIR"]  # the snapshotter's daemons
    name = ref.removeprefix("docker://")
    service = (node_service(base / "run", base / "node.log") if node
               else contextlib.nullcontext(None))
    try:
        with service, snapshotter_process(sock, base / "snroot", base / "snapshotter.log",
                                          extra=("--mode", mode)), \
                containerd_daemon(base / "containerd", sock, namespace="bench") as cd:
            drop_caches()
            link.reset_counters()
            snap = ["--snapshotter", "rafs"] if rafs else []
            t0 = time.perf_counter()
            if rafs:
                _ctr(cd, "rpull", "--plain-http", *snap, name)
            else:
                _ctr(cd, "pull", "--plain-http", name)
            t1 = time.perf_counter()
            _ctr(cd, "create", *snap, name, "bench", "--", *image.workload)
            t2 = time.perf_counter()
            res = cd.ctr("task", "start", "bench", check=False, timeout=1800)
            t3 = time.perf_counter()
            counters = link.counters()
            _check(res, f"ctr task start ({image.name})")
            _ready(image, res.stdout)
            out: dict[str, Any] = {
                "pull_s": t1 - t0, "create_s": t2 - t1, "run_s": t3 - t2, "total_s": t3 - t0,
                "link_bytes": counters.bytes_down, "link_bytes_up": counters.bytes_up,
                "connections": counters.connections,
            }
            if rafs:
                out.update(_stats_fields(_daemon_stats(base / "snroot", env)))
            cd.ctr("container", "rm", "bench", check=False)
            return out
    finally:
        if old_run_dir is None:
            os.environ.pop("RAFS_RUN_DIR", None)
        else:
            os.environ["RAFS_RUN_DIR"] = old_run_dir
        _unmount_all(base, env)
        shutil.rmtree(base, ignore_errors=True)


def _ctr(cd: Containerd, what: str, *args: str) -> None:
    if what == "rpull":
        res = cd.ctr_remote("image", "rpull", *args, check=False, timeout=1800)
    elif what == "pull":
        res = cd.ctr("image", "pull", *args, check=False, timeout=1800)
    else:
        res = cd.ctr("container", "create", *args, check=False, timeout=600)
    _check(res, f"ctr {what}")


def sample(scenario: str, image: Prepared, host: str, base: Path, mode: str,
           link: Any) -> dict[str, Any]:
    form = {"oci-containerd": "oci", "rafs-containerd": "rafs", "rafs-containerd-node": "rafs",
            "rafs-lazy": "rafs", "rafs-optimized": "optimized", "oci-rafs-run": "oci"}[scenario]
    ref = f"docker://{host}/{image.repos[form]}"
    if scenario == "oci-containerd":
        r = _containerd_sample(image, ref, base, rafs=False, mode=mode, link=link)
    elif scenario in ("rafs-containerd", "rafs-containerd-node"):
        r = _containerd_sample(image, ref, base, rafs=True, mode=mode, link=link,
                               node=scenario == "rafs-containerd-node")
    else:
        r = _rafs_run_sample(image, ref, base, mode, link, lazy=form != "oci")
    r["image_pct"] = 100 * r["link_bytes"] / image.bytes[form]
    return r


# ---------------------------------------------------------------------------------------
# The whole run


def _failover(image: Prepared, host: str, work: Path, cfg: BenchConfig) -> dict[str, Any]:
    """The failover gap per mode (``bench.failover``) on a supervised mount of the
    image's RAFS form straight from the registry, its chunk cache warm."""
    from bench.failover import gaps

    out: dict[str, Any] = {}
    modes = ("fuse", "kernel") if cfg.mode == "auto" else (cfg.mode,)
    for mode in modes:
        with _rafs_home(work / f"failover-{mode}") as env:
            old = os.environ.get("RAFS_RUN_DIR")
            os.environ["RAFS_RUN_DIR"] = env["RAFS_RUN_DIR"]
            try:
                out[mode] = gaps(f"docker://{host}/{image.repos['rafs']}",
                                 work / f"failover-{mode}", mode, cfg.failover_kills)
            finally:
                if old is None:
                    os.environ.pop("RAFS_RUN_DIR", None)
                else:
                    os.environ["RAFS_RUN_DIR"] = old
    return {"image": image.name, "modes": out}


def _progress(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in (*PHASES, "total_s", "link_bytes", "image_pct"):
        values = [r[key] for r in runs]
        out[key] = {"median": statistics.median(values), "min": min(values),
                    "max": max(values)}
    modes = {r.get("mode") for r in runs if r.get("mode")}
    out["mode"] = modes.pop() if len(modes) == 1 else (sorted(modes) or None)
    return out


def _ideal(image: Prepared, lazy_runs: list[dict[str, Any]], profile: str) -> dict[str, float]:
    from bench.linkemu import PROFILES as LINKS

    link = LINKS[profile]
    read = statistics.median(r.get("read_bytes", 0) for r in lazy_runs)
    ratio = image.bytes["rafs"] / image.unpacked_bytes if image.unpacked_bytes else 1.0
    wire = read * min(ratio, 1.0)
    seconds = image.warm_s + link.seconds_for(int(wire)) + link.rtt
    return {"total_s": seconds, "warm_s": image.warm_s, "read_bytes": read,
            "wire_bytes": wire, "compression_ratio": ratio}


def versions() -> dict[str, str]:
    def first_line(argv: list[str]) -> str:
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"unavailable ({e})"
        return (proc.stdout or proc.stderr).strip().splitlines()[0] if (
            proc.stdout or proc.stderr).strip() else "?"

    rev = first_line(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "-uno"],
                           capture_output=True, text=True).stdout.strip()
    return {
        "rafs": rev + ("+dirty" if dirty else ""),
        "containerd": first_line(["containerd", "--version"]),
        "runc": first_line(["runc", "--version"]),
        "ctr-remote": first_line(["ctr-remote", "--version"]),
        "skopeo": first_line(["skopeo", "--version"]),
        "docker-registry": first_line(["docker-registry", "--version"]),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "cpus": str(os.cpu_count()),
    }


def run_bench(cfg: BenchConfig, progress: Callable[[str], None] = _progress) -> dict[str, Any]:
    from bench.linkemu import LinkEmulator

    started = time.time()
    result: dict[str, Any] = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": "rafs bench " + " ".join(sys.argv[1:]) if sys.argv[0].endswith(
            ("cli.py", "rafs")) else None,
        "versions": versions(), "requested_mode": cfg.mode, "samples": cfg.samples,
        "profiles": cfg.profiles, "scenarios": list(SCENARIOS), "images": {},
    }
    work = cfg.work or Path(tempfile.mkdtemp(prefix="rafs-coldstart-", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        with RegistryServer() as registry:
            prepared = [prepare(name, registry, work, cfg.mode) for name in cfg.images]
            for image in prepared:
                entry: dict[str, Any] = {
                    "workload": list(image.workload), "expect": image.expect,
                    "layer_bytes": image.bytes, "unpacked_bytes": image.unpacked_bytes,
                    "warm_s": image.warm_s, "warm_runs": image.warm_runs, "profiles": {}}
                result["images"][image.name] = entry
                for profile in cfg.profiles:
                    with LinkEmulator(registry.host, profile=profile) as link:
                        runs: dict[str, list[dict[str, Any]]] = {s: [] for s in SCENARIOS}
                        for i in range(cfg.samples):
                            order = SCENARIOS if i % 2 == 0 else tuple(reversed(SCENARIOS))
                            for scenario in order:
                                r = sample(scenario, image, link.host,
                                           work / f"s-{scenario}", cfg.mode, link)
                                runs[scenario].append(r)
                                progress(f"{image.name} {profile} {scenario} #{i + 1}: "
                                         f"{r['total_s']:.2f}s, "
                                         f"{r['link_bytes'] / MB:.1f} MB over the link")
                    entry["profiles"][profile] = {
                        "scenarios": {s: {"summary": _summary(rs), "runs": rs}
                                      for s, rs in runs.items()},
                        "ideal": _ideal(image, runs["rafs-lazy"], profile),
                    }
            if cfg.failover_kills > 0 and prepared:
                result["failover"] = _failover(prepared[0], registry.host, work, cfg)
    finally:
        _unmount_all(work, _env(RAFS_RUN_DIR=str(work)))
        shutil.rmtree(work, ignore_errors=True)
    result["elapsed_s"] = time.time() - started
    return result


# ---------------------------------------------------------------------------------------
# Output


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"Cold start, median of {result['samples']} samples (min–max of the total in "
        f"brackets); rafs `{result['versions']['rafs']}`, "
        f"{result['versions']['containerd']}, {result['versions']['runc'].split(',')[0]}, "
        f"kernel {result['versions']['kernel']}, Python {result['versions']['python']}, "
        f"{result['versions']['cpus']} CPUs (shared); fused mode requested "
        f"`{result['requested_mode']}`.",
        "",
        "| Image | Profile | Scenario | Pull s | Create s | Run s | Total to ready s | "
        "Over the link MB | % of image | vs OCI/containerd | Mode |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, entry in result["images"].items():
        for profile, pr in entry["profiles"].items():
            anchor = pr["scenarios"]["oci-containerd"]["summary"]["total_s"]["median"]
            for scenario, data in pr["scenarios"].items():
                s = data["summary"]
                tot = s["total_s"]
                lines.append(
                    f"| {name} | {profile} | {scenario} | {s['pull_s']['median']:.2f} | "
                    f"{s['create_s']['median']:.2f} | {s['run_s']['median']:.2f} | "
                    f"{tot['median']:.2f} ({tot['min']:.2f}–{tot['max']:.2f}) | "
                    f"{s['link_bytes']['median'] / MB:.1f} | {s['image_pct']['median']:.1f}% | "
                    f"{anchor / tot['median']:.1f}× | {s['mode'] or '—'} |")
            ideal = pr["ideal"]
            opt = pr["scenarios"]["rafs-optimized"]["summary"]["total_s"]["median"]
            lines.append(
                f"| {name} | {profile} | ideal | | | {ideal['warm_s']:.2f} | "
                f"{ideal['total_s']:.2f} (optimized = {opt / ideal['total_s']:.2f}× ideal) | "
                f"{ideal['wire_bytes'] / MB:.1f} | | {anchor / ideal['total_s']:.1f}× | |")
    if result.get("failover"):
        fo = result["failover"]
        lines += ["", f"Failover gap ({fo['image']}, supervised mount, standby worker; time "
                  "from SIGKILL of the worker to the first read answered after it):", "",
                  "| Mode | Kills | Gap median s | Gap max s | New worker in the state file s | "
                  "Read errors |", "|---|---:|---:|---:|---:|---:|"]
        for mode, g in fo["modes"].items():
            lines.append(f"| {mode} | {g['kills']} | {g['gap_median_s']:.3f} | "
                         f"{g['gap_max_s']:.3f} | {g['new_worker_median_s']:.3f} | "
                         f"{g['read_errors']} of {g['reads']} |")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], out: Path) -> list[Path]:
    """One PNG per profile: per image, stacked pull/create/run bars per scenario, the
    ideal as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    images = list(result["images"])
    for profile in result["profiles"]:
        fig, axes = plt.subplots(1, len(images), figsize=(4.2 * len(images), 4.6),
                                 squeeze=False)
        for ax, name in zip(axes[0], images, strict=True):
            pr = result["images"][name]["profiles"][profile]
            bottoms = [0.0] * len(SCENARIOS)
            for phase, color in zip(PHASES, ("#4c72b0", "#dd8452", "#55a868"), strict=True):
                vals = [pr["scenarios"][s]["summary"][phase]["median"] for s in SCENARIOS]
                ax.bar(range(len(SCENARIOS)), vals, bottom=bottoms, color=color,
                       label=phase.removesuffix("_s"))
                bottoms = [b + v for b, v in zip(bottoms, vals, strict=True)]
            ax.axhline(pr["ideal"]["total_s"], color="black", linestyle="--", linewidth=1,
                       label="ideal")
            ax.set_xticks(range(len(SCENARIOS)), SCENARIOS, rotation=35, ha="right",
                          fontsize=8)
            ax.set_title(f"{name} ({profile})")
            ax.set_ylabel("seconds to ready (median)")
        axes[0][0].legend(fontsize=8)
        fig.tight_layout()
        path = out / f"coldstart-{profile}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def write_outputs(result: dict[str, Any], out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "coldstart.json", "markdown": out / "coldstart.md"}
    paths["json"].write_text(json.dumps(result, indent=2) + "\n")
    paths["markdown"].write_text(markdown(result))
    for i, p in enumerate(plot(result, out)):
        paths[f"plot{i}"] = p
    return paths


# ---------------------------------------------------------------------------------------
# Command line


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true",
                   help=f"one image ({QUICK_IMAGE}) on one profile (wan unless --profile)")
    p.add_argument("--profile", action="append", choices=PROFILES, metavar="PROFILE",
                   help="link profile: wan, lan or local (repeatable; default all, "
                   "--quick: wan)")
    p.add_argument("--images", nargs="+", choices=list(corpus.IMAGES), metavar="NAME",
                   help=f"images to run (default: {' '.join(FULL_IMAGES)})")
    p.add_argument("--samples", type=int, default=None,
                   help="cold samples per image, scenario and profile (default 3; --quick 1)")
    p.add_argument("--mode", default="auto", choices=("auto", "fuse", "kernel"),
                   help="fused mode for rafs run and the snapshotter (default %(default)s)")
    p.add_argument("--out", type=Path, default=Path("results"),
                   help="where coldstart.json/.md/.png go (default %(default)s)")
    p.add_argument("--failover-kills", type=int, default=None, metavar="N",
                   help="SIGKILLs of a supervised mount's worker for the failover gap, per "
                   "mode (default 5; --quick 2; 0: skip)")


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    images = args.images or ([QUICK_IMAGE] if args.quick else list(FULL_IMAGES))
    profiles = args.profile or (["wan"] if args.quick else list(PROFILES))
    if args.quick:
        images, profiles = images[:1], profiles[:1]
    samples = args.samples if args.samples is not None else (1 if args.quick else 3)
    if samples < 1:
        raise BenchError("--samples must be at least 1")
    kills = args.failover_kills if args.failover_kills is not None else (2 if args.quick else 5)
    return BenchConfig(images=images, profiles=profiles, samples=samples, mode=args.mode,
                       out=args.out, failover_kills=max(0, kills))


def cmd_bench(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        raise BenchError("rafs bench needs root (containerd, runc, mounts, drop_caches)")
    cfg = config_from_args(args)
    result = run_bench(cfg)
    paths = write_outputs(result, cfg.out)
    print(markdown(result))
    for kind, path in paths.items():
        print(f"{kind}: {path}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.coldstart",
                                     description=__doc__.splitlines()[0])
    add_arguments(parser)
    try:
        return cmd_bench(parser.parse_args(argv))
    except BenchError as e:
        print(f"rafs: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
