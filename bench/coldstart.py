"""Cold-start benchmark: rafs against OCI through containerd and against eStargz,
over an emulated link, side by side in one run.

    rafs bench [--quick] [--profile P]... [--images NAME...] [--samples N] [--out DIR]
               [--against estargz] [--scenarios S...] [--no-peer-build]
    python -m bench.coldstart ...            (the same)

Owns: preparing the images (bench.corpus, with every parent directory entry
added to the layers: ``corpus.with_parent_dirs``) in a local ``docker-registry``
in their forms (plain OCI with gzip layers via ``skopeo copy``; RAFS via ``rafs
convert``; RAFS optimized via ``rafs optimize`` with the image's workload; with
``--against estargz`` also eStargz and eStargz optimized, ``bench.peers.estargz``),
the scenarios, the cold-start discipline, the figures and the bound, and writing
``coldstart.json``, ``coldstart.md`` and one ``coldstart-<profile>.png`` per
profile into ``--out``.

Scenarios (``SCENARIO_INFO``; each sample is cold: a new containerd and
snapshotter on empty directories, an empty rafs root and chunk cache, empty
eStargz layer caches, page cache dropped):

- ``oci-containerd``: ``ctr image pull`` + ``ctr container create`` + ``ctr task
  start`` with the overlayfs snapshotter (download and unpack everything first);
- ``estargz-lazy`` / ``estargz-optimized`` (``--against estargz``): ``ctr-remote
  image rpull --snapshotter stargz`` + the same create/start with the eStargz
  peer's snapshotter, of the converted / the optimized (recorded workload) image;
- ``rafs-containerd`` / ``rafs-containerd-optimized``: the same through the rafs
  snapshotter, of the RAFS / the optimized RAFS image;
- ``rafs-lazy`` / ``rafs-optimized``: ``rafs run`` of the RAFS / optimized image;
- ``oci-rafs-run``: ``rafs run`` of the plain OCI image (eager pull + unpack).

The registry is reached through ``bench.linkemu`` with the chosen profile. Per
sample: the bytes over the link (the emulator's counter, read when the workload
is ready: the bytes fetched before ready), the registry requests (its access
log) and connections until ready. Phases: for containerd, the three ``ctr``
commands (pull = the snapshotter's Prepare of every layer to ready); for ``rafs
run``, read from its ``-v`` log (image mounted or unpacked = end of pull, runc
started = end of create). Ready = the workload exited 0 with the expected output.

The bound per image and profile (``bound``): T ≥ T_warm + max(B_needed / rate,
round trips × RTT) + metadata / rate, where T_warm is the faster of two warm
starts of the unpacked plain image with a warm page cache (medians of 3): ``rafs
run``, and ``ctr container create`` + ``ctr task start`` on overlayfs; B_needed the bytes
the workload read from a lazy rafs mount (as the kernel asked the daemon for
them, page-cache readahead included; median of the lazy rafs samples) at the
image's compression ratio (RAFS blob bytes / unpacked bytes), round trips
``ROUND_TRIPS`` (connect, manifest, config and metadata, data issued at once)
and metadata the smaller of the RAFS bootstrap layer and the eStargz TOCs.
Nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
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
from bench.registry import RegistryError, RegistryServer
from bench.tools import REPO, drop_caches
from rafs.errors import RafsError

__all__ = ["ALL_SCENARIOS", "SCENARIOS", "BenchConfig", "main", "run_bench"]


@dataclass(frozen=True)
class Scenario:
    """How one scenario starts the workload: ``path`` is ``containerd`` (with
    ``snapshotter``) or ``rafs-run``; ``form`` is the image form it starts."""

    name: str
    path: str
    form: str
    snapshotter: str | None = None
    peer: str | None = None  # the --against peer it needs


SCENARIO_INFO: dict[str, Scenario] = {s.name: s for s in (
    Scenario("oci-containerd", "containerd", "oci", "overlayfs"),
    Scenario("estargz-lazy", "containerd", "estargz", "stargz", peer="estargz"),
    Scenario("estargz-optimized", "containerd", "estargz-optimized", "stargz",
             peer="estargz"),
    Scenario("rafs-containerd", "containerd", "rafs", "rafs"),
    Scenario("rafs-containerd-optimized", "containerd", "optimized", "rafs"),
    Scenario("rafs-lazy", "rafs-run", "rafs"),
    Scenario("rafs-optimized", "rafs-run", "optimized"),
    Scenario("oci-rafs-run", "rafs-run", "oci"),
)}
ALL_SCENARIOS = tuple(SCENARIO_INFO)
SCENARIOS = tuple(s for s, info in SCENARIO_INFO.items() if info.peer is None)  # default
PEERS = ("estargz",)
LAZY_RAFS = ("rafs-lazy", "rafs-containerd")  # where the bound's read set is measured
PROFILES = ("wan", "lan", "local")
FULL_IMAGES = ("minbase", "numpy", "nodejs", "large")
QUICK_IMAGE = "numpy"
MB = 1e6
PHASES = ("pull_s", "create_s", "run_s")
SUMMARY_KEYS = (*PHASES, "total_s", "link_bytes", "image_pct", "requests", "blob_requests",
                "connections")
ROUND_TRIPS = 4  # connect; manifest; config + metadata; all data ranges at once
SOCKET_PATH_MAX = 104  # containerd's limit for its socket paths


class BenchError(RafsError):
    """A scenario did not reach ready, or the setup failed; the message says which."""


@dataclass
class BenchConfig:
    images: list[str]
    profiles: list[str]
    samples: int = 3
    mode: str = "auto"
    out: Path = Path("results")
    work: Path | None = None  # the scratch dir goes below it (default /var/tmp)
    scenarios: list[str] = field(default_factory=lambda: list(SCENARIOS))
    peer_build: bool = True  # build (and apt install) the peer if it is not cached


@dataclass
class Prepared:
    """One image in the registry in its forms (refs without the registry host)."""

    name: str
    workload: tuple[str, ...]
    expect: str | None
    repos: dict[str, str]  # form -> "bench/NAME:TAG"
    bytes: dict[str, int]  # form -> layer bytes in the registry
    metadata_bytes: dict[str, int] = field(default_factory=dict)  # rafs / estargz
    unpacked_bytes: int = 0
    warm_s: float = 0.0  # the smaller of the two paths' medians: the bound's T_warm
    warm_runs: list[float] = field(default_factory=list)  # rafs run
    warm_containerd_runs: list[float] = field(default_factory=list)  # ctr create + start


@dataclass
class Peers:
    """What the --against peers need at sample time (the eStargz snapshotter)."""

    estargz: Path | None = None
    skipped: dict[str, str] = field(default_factory=dict)  # peer -> why it did not run


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
    anything left (overlays, binds, eStargz FUSE layers) with ``unmount_under``."""
    for mp in _image_mounts(base):
        subprocess.run(_rafs_argv("umount", mp), env=env, capture_output=True, timeout=120,
                       check=False)
    unmount_under(base)


# ---------------------------------------------------------------------------------------
# Preparation: the forms of each image


def _manifest_layers(ref: str) -> list[Any]:
    from rafs.oci import parse_image_ref
    from rafs.registry import RegistryClient

    image = parse_image_ref(ref)
    with RegistryClient.for_ref(image) as client:
        return list(client.resolve(image).layers)


def _bootstrap_bytes(layers: list[Any]) -> int:
    from rafs.oci import MEDIA_TYPE_RAFS_BOOTSTRAP

    return sum(d.size for d in layers if d.media_type == MEDIA_TYPE_RAFS_BOOTSTRAP)


_STARGZ_FOOTER = re.compile(rb"([0-9a-f]{16})STARGZ")


def _toc_bytes(layout: Path, tag: str) -> int:
    """Bytes of the eStargz TOCs (TOC entry + footer) of ``layout:tag``: what the
    peer fetches of each layer before it can mount it."""
    index = json.loads((layout / "index.json").read_text())
    desc = next(m for m in index["manifests"]
                if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag)

    def blob(digest: str) -> Path:
        return layout / "blobs" / digest.replace(":", "/")

    total = 0
    for layer in json.loads(blob(desc["digest"]).read_text())["layers"]:
        size = layer["size"]
        with open(blob(layer["digest"]), "rb") as f:
            f.seek(max(0, size - 51))
            m = _STARGZ_FOOTER.search(f.read())
        if m is None:
            raise BenchError(f"{layer['digest']}: no eStargz footer")
        total += size - int(m.group(1), 16)
    return total


def prepare(name: str, registry: RegistryServer, work: Path, mode: str,
            forms: set[str]) -> Prepared:
    spec = corpus.IMAGES[name]
    _progress(f"{name}: building/loading the corpus image")
    layout, tag = corpus.with_parent_dirs(*spec.build(None))
    repo = f"bench/{name}"
    repos = {form: f"{repo}:{form}" for form in ("oci", "rafs", "optimized", *sorted(forms))}

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
    layers = {form: _manifest_layers(ref(form)) for form in ("oci", "rafs", "optimized")}
    metadata = {"rafs": _bootstrap_bytes(layers["rafs"])}
    if {"estargz", "estargz-optimized"} & forms:
        from bench.peers import estargz

        peer_layout = estargz.estargz_images(name, layout, tag, spec.workload,
                                             registry.host, work)
        for form, peer_tag in (("estargz", estargz.ESTARGZ_TAG),
                               ("estargz-optimized", estargz.OPTIMIZED_TAG)):
            _run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false",
                  f"oci:{peer_layout}:{peer_tag}", ref(form)], f"skopeo copy {name} {form}")
            layers[form] = _manifest_layers(ref(form))
        metadata["estargz"] = _toc_bytes(peer_layout, estargz.ESTARGZ_TAG)
    prepared = Prepared(name, spec.workload, spec.expect, repos,
                        {form: sum(d.size for d in ls) for form, ls in layers.items()},
                        metadata)
    _measure_warm(prepared, ref("oci"), work / f"warm-{name}")
    _measure_warm_containerd(prepared, ref("oci"), work / f"warm-ctr-{name}")
    prepared.warm_s = min(statistics.median(prepared.warm_runs),
                          statistics.median(prepared.warm_containerd_runs))
    return prepared


def _measure_warm_containerd(image: Prepared, ref: str, base: Path, runs: int = 3) -> None:
    """Warm start through containerd: the plain image pulled and unpacked (overlayfs),
    then ``ctr container create`` + ``ctr task start`` with a warm page cache."""
    name = ref.removeprefix("docker://")
    try:
        with containerd_daemon(base / "containerd", base / "no-rafs-snapshotter.sock",
                               namespace="bench-warm") as cd:
            _ctr(cd, "pull", "--plain-http", name)
            for i in range(runs + 1):  # the first one warms the page cache
                t0 = time.perf_counter()
                _ctr(cd, "create", name, f"warm{i}", "--", *image.workload)
                res = cd.ctr("task", "start", f"warm{i}", check=False, timeout=600)
                elapsed = time.perf_counter() - t0
                _check(res, f"ctr task start ({image.name}, warm)")
                _ready(image, res.stdout)
                cd.ctr("container", "rm", f"warm{i}", check=False)
                if i:
                    image.warm_containerd_runs.append(elapsed)
    finally:
        unmount_under(base)
        shutil.rmtree(base, ignore_errors=True)


def _measure_warm(image: Prepared, ref: str, base: Path, runs: int = 3) -> None:
    """Warm ``rafs run`` time (unpacked plain image on local disk, page cache warm)
    and the unpacked size."""
    with _rafs_home(base) as env:
        argv = _rafs_argv("run", "--rm", ref, *image.workload)
        _run(argv, f"rafs run {image.name} (unpack for the warm runs)", env=env)
        _run(argv, f"rafs run {image.name} (warm-up)", env=env)
        for _ in range(runs):
            t0 = time.perf_counter()
            proc = _run(argv, f"rafs run {image.name} (warm)", env=env)
            image.warm_runs.append(time.perf_counter() - t0)
            _ready(image, proc.stdout)
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
    """``rafs stats`` of the one rafs mount under ``mnt_root``."""
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


class _Meter:
    """The link's and the registry's counters over one sample."""

    def __init__(self, link: Any, registry: RegistryServer) -> None:
        self.link, self.registry = link, registry

    def start(self) -> None:
        self.link.reset_counters()
        self.registry.mark()

    def read(self) -> dict[str, Any]:
        counters = self.link.counters()
        records = self.registry.access_log(since_mark=True)
        return {"link_bytes": counters.bytes_down, "link_bytes_up": counters.bytes_up,
                "connections": counters.connections, "requests": len(records),
                "blob_requests": sum(1 for r in records
                                     if r.method == "GET" and "/blobs/" in r.path)}


def _rafs_run_sample(image: Prepared, ref: str, base: Path, mode: str, meter: _Meter,
                     lazy: bool) -> dict[str, Any]:
    with _rafs_home(base) as env:
        drop_caches()
        meter.start()
        argv = _rafs_argv("-v", "run", "--rm", "--keep-mounted", "--mode", mode, ref,
                          *image.workload)
        wall0, t0 = time.time(), time.perf_counter()
        proc = subprocess.run(argv, env=env, text=True, capture_output=True,
                              stdin=subprocess.DEVNULL, timeout=1800)
        total = time.perf_counter() - t0
        measured = meter.read()
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
            "run_s": total - (started - wall0), "total_s": total, **measured,
        }
        if lazy:
            out.update(_stats_fields(_daemon_stats(base / "run", env)))
        return out


def _fuse_mounts(root: Path) -> int:
    return sum(1 for _mp, fs in mounts_under(root) if fs.startswith("fuse"))


@contextlib.contextmanager
def _snapshotters(kind: str, base: Path, mode: str, peers: Peers) -> Iterator[dict[str, Path]]:
    """The proxy snapshotter a containerd sample needs, running: ``{"rafs": sock}``,
    ``{"stargz": sock}`` or nothing (overlayfs is built into containerd)."""
    if kind == "rafs":
        sock = base / "snapshotter.sock"
        with snapshotter_process(sock, base / "snroot", base / "snapshotter.log",
                                 extra=("--mode", mode)):
            yield {"rafs": sock}
    elif kind == "stargz":
        from bench.peers.estargz import peer_process

        if peers.estargz is None:
            raise BenchError("the eStargz peer is not available")
        sock = base / "estargz.sock"
        with peer_process(peers.estargz, sock, base / "esroot", base / "estargz.log"):
            yield {"stargz": sock}
    else:
        yield {}


def _containerd_sample(image: Prepared, ref: str, base: Path, snapshotter: str, mode: str,
                       meter: _Meter, peers: Peers) -> dict[str, Any]:
    base.mkdir(parents=True, exist_ok=True)
    env = _env(RAFS_RUN_DIR=str(base / "run"))
    old_run_dir = os.environ.get("RAFS_RUN_DIR")
    os.environ["RAFS_RUN_DIR"] = env["RAFS_RUN_DIR"]  # the snapshotter's daemons
    name = ref.removeprefix("docker://")
    try:
        with _snapshotters(snapshotter, base, mode, peers) as socks:
            rafs_sock = socks.get("rafs", base / "no-rafs-snapshotter.sock")
            proxies = {k: v for k, v in socks.items() if k != "rafs"}
            with containerd_daemon(base / "containerd", rafs_sock, namespace="bench",
                                   proxies=proxies) as cd:
                drop_caches()
                meter.start()
                remote = snapshotter != "overlayfs"
                snap = ["--snapshotter", snapshotter] if remote else []
                t0 = time.perf_counter()
                if remote:
                    _ctr(cd, "rpull", "--plain-http", *snap, name)
                else:
                    _ctr(cd, "pull", "--plain-http", name)
                t1 = time.perf_counter()
                _ctr(cd, "create", *snap, name, "bench", "--", *image.workload)
                t2 = time.perf_counter()
                res = cd.ctr("task", "start", "bench", check=False, timeout=1800)
                t3 = time.perf_counter()
                measured = meter.read()
                _check(res, f"ctr task start ({image.name}, {snapshotter})")
                _ready(image, res.stdout)
                out: dict[str, Any] = {
                    "pull_s": t1 - t0, "create_s": t2 - t1, "run_s": t3 - t2,
                    "total_s": t3 - t0, **measured,
                }
                if snapshotter == "rafs":
                    out.update(_stats_fields(_daemon_stats(base / "snroot", env)))
                elif snapshotter == "stargz":
                    # A layer the peer could not mount lazily would be pulled whole
                    # instead; then this sample would not measure eStargz.
                    out["remote_layers"] = _fuse_mounts(base / "esroot")
                    if out["remote_layers"] == 0:
                        raise BenchError(f"{image.name}: the eStargz snapshotter mounted no "
                                         f"layer lazily (log: {base / 'estargz.log'})")
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
           meter: _Meter, peers: Peers) -> dict[str, Any]:
    info = SCENARIO_INFO[scenario]
    ref = f"docker://{host}/{image.repos[info.form]}"
    if info.path == "containerd":
        assert info.snapshotter is not None
        r = _containerd_sample(image, ref, base, info.snapshotter, mode, meter, peers)
    else:
        r = _rafs_run_sample(image, ref, base, mode, meter, lazy=info.form != "oci")
    r["image_pct"] = 100 * r["link_bytes"] / image.bytes[info.form]
    return r


# ---------------------------------------------------------------------------------------
# The whole run


def _progress(message: str) -> None:
    """A progress line: on a terminal, or with -v (quiet when piped, as every command)."""
    if sys.stderr.isatty() or logging.getLogger().isEnabledFor(logging.INFO):
        print(f"bench: {message}", file=sys.stderr, flush=True)


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in SUMMARY_KEYS:
        values = [r[key] for r in runs]
        out[key] = {"median": statistics.median(values), "min": min(values),
                    "max": max(values)}
    modes = {r.get("mode") for r in runs if r.get("mode")}
    out["mode"] = modes.pop() if len(modes) == 1 else (sorted(modes) or None)
    return out


def _bound(image: Prepared, runs: dict[str, list[dict[str, Any]]],
           profile: str) -> dict[str, Any] | None:
    """T ≥ T_warm + max(B_needed / rate, ROUND_TRIPS × RTT) + metadata / rate, with
    every term (see the module docstring for how each is estimated); None when no
    lazy rafs scenario ran (the read set is measured there)."""
    from bench.linkemu import PROFILES as LINKS

    link = LINKS[profile]
    lazy = [r for s in LAZY_RAFS for r in runs.get(s, []) if "read_bytes" in r]
    if not lazy:
        return None
    read = statistics.median(r["read_bytes"] for r in lazy)
    ratio = image.bytes["rafs"] / image.unpacked_bytes if image.unpacked_bytes else 1.0
    needed = read * min(ratio, 1.0)
    metadata = min(image.metadata_bytes.values())
    transfer_s = link.seconds_for(int(needed))
    rtt_s = ROUND_TRIPS * link.rtt
    metadata_s = link.seconds_for(metadata)
    return {"total_s": image.warm_s + max(transfer_s, rtt_s) + metadata_s,
            "warm_s": image.warm_s, "read_bytes": read, "compression_ratio": ratio,
            "needed_bytes": needed, "transfer_s": transfer_s,
            "round_trips": ROUND_TRIPS, "rtt": link.rtt, "round_trips_s": rtt_s,
            "metadata_bytes": metadata, "metadata_by_format": dict(image.metadata_bytes),
            "metadata_s": metadata_s, "link_rate_bps": link.rate_bps}


def versions(peers: Peers | None = None) -> dict[str, str]:
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
    out = {
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
    if peers is not None and peers.estargz is not None:
        from bench.peers import estargz

        out.update({f"estargz {k}": v for k, v in estargz.versions().items()})
    return out


def _setup_peers(cfg: BenchConfig, progress: Callable[[str], None]) -> Peers:
    """Build (or find) the peers the scenarios need; a peer that cannot be had is
    skipped with one line, and the rest runs."""
    from bench.peers import estargz

    peers = Peers()
    wanted = {SCENARIO_INFO[s].peer for s in cfg.scenarios} - {None}
    if "estargz" in wanted:
        try:
            if cfg.peer_build:
                peers.estargz = estargz.build_peer()
            else:
                peers.estargz = estargz.cached_peer()
                if peers.estargz is None:
                    raise estargz.PeerUnavailable(
                        f"the eStargz peer is not built in {estargz.peer_dir()} and "
                        "--no-peer-build was given")
        except estargz.PeerUnavailable as e:
            peers.skipped["estargz"] = str(e)
            progress(f"eStargz scenarios skipped: {e}")
    return peers


def run_bench(cfg: BenchConfig, progress: Callable[[str], None] = _progress) -> dict[str, Any]:
    from bench.linkemu import LinkEmulator

    started = time.time()
    peers = _setup_peers(cfg, progress)
    scenarios = [s for s in cfg.scenarios if SCENARIO_INFO[s].peer not in peers.skipped]
    forms = {SCENARIO_INFO[s].form for s in scenarios}
    result: dict[str, Any] = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": "rafs bench " + " ".join(sys.argv[1:]) if sys.argv[0].endswith(
            ("cli.py", "rafs")) else None,
        "versions": versions(peers), "requested_mode": cfg.mode, "samples": cfg.samples,
        "profiles": cfg.profiles, "scenarios": scenarios, "skipped": peers.skipped,
        "images": {},
    }
    if cfg.work is not None:
        # the longest unix socket below it must fit sun_path (107 bytes)
        longest = len(str(cfg.work.resolve())) + len(
            "/rafs-coldstart-12345678/s-9/containerd/containerd.sock.ttrpc")
        if longest > SOCKET_PATH_MAX:
            raise BenchError(f"--work {cfg.work}: too long a path for the unix sockets "
                             f"below it ({longest - SOCKET_PATH_MAX} characters over)")
        cfg.work.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="rafs-coldstart-", dir=cfg.work or "/var/tmp"))
    try:
        with RegistryServer() as registry:
            prepared = [prepare(name, registry, work, cfg.mode, forms) for name in cfg.images]
            for image in prepared:
                entry: dict[str, Any] = {
                    "workload": list(image.workload), "expect": image.expect,
                    "layer_bytes": image.bytes, "metadata_bytes": image.metadata_bytes,
                    "unpacked_bytes": image.unpacked_bytes,
                    "warm_s": image.warm_s, "warm_runs": image.warm_runs,
                    "warm_containerd_runs": image.warm_containerd_runs, "profiles": {}}
                result["images"][image.name] = entry
                for profile in cfg.profiles:
                    with LinkEmulator(registry.host, profile=profile) as link:
                        meter = _Meter(link, registry)
                        runs: dict[str, list[dict[str, Any]]] = {s: [] for s in scenarios}
                        for i in range(cfg.samples):
                            order = scenarios if i % 2 == 0 else list(reversed(scenarios))
                            for scenario in order:
                                # short: containerd's sockets go below it
                                base = work / f"s-{ALL_SCENARIOS.index(scenario)}"
                                try:
                                    r = sample(scenario, image, link.host, base, cfg.mode,
                                               meter, peers)
                                except AssertionError as e:  # a daemon did not start
                                    raise BenchError(f"{scenario}: {e}") from None
                                runs[scenario].append(r)
                                progress(f"{image.name} {profile} {scenario} #{i + 1}: "
                                         f"{r['total_s']:.2f}s, "
                                         f"{r['link_bytes'] / MB:.1f} MB over the link, "
                                         f"{r['requests']} requests")
                    entry["profiles"][profile] = {
                        "scenarios": {s: {"summary": _summary(rs), "runs": rs}
                                      for s, rs in runs.items()},
                        "bound": _bound(image, runs, profile),
                    }
    finally:
        _unmount_all(work, _env(RAFS_RUN_DIR=str(work)))
        shutil.rmtree(work, ignore_errors=True)
    result["elapsed_s"] = time.time() - started
    return result


# ---------------------------------------------------------------------------------------
# Output


def markdown(result: dict[str, Any]) -> str:
    v = result["versions"]
    lines = [
        f"Cold start, median of {result['samples']} samples (min–max of the total in "
        f"brackets); rafs `{v['rafs']}`, {v['containerd']}, {v['runc'].split(',')[0]}, "
        f"kernel {v['kernel']}, Python {v['python']}, {v['cpus']} CPUs (shared); fused "
        f"mode requested `{result['requested_mode']}`.",
    ]
    if "estargz go" in v:
        lines.append(f"eStargz peer: stargz-snapshotter library "
                     f"{v['estargz stargz-snapshotter library']} (Debian), "
                     f"{v['estargz go']}, containerd library {v['estargz containerd library']}, "
                     f"ctr-remote {v['estargz ctr-remote']}; background fetch off.")
    for peer, why in result.get("skipped", {}).items():
        lines.append(f"{peer}: skipped ({why}).")
    lines += [
        "",
        "| Image | Profile | Scenario | Pull s | Create s | Run s | Total to ready s | "
        "Over the link MB | Requests | % of image | vs OCI/containerd | × bound | Mode |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    bounds = []
    for name, entry in result["images"].items():
        for profile, pr in entry["profiles"].items():
            scen = pr["scenarios"]
            anchor = (scen["oci-containerd"]["summary"]["total_s"]["median"]
                      if "oci-containerd" in scen else None)
            bound = pr.get("bound")
            for scenario, data in scen.items():
                s = data["summary"]
                tot = s["total_s"]
                vs = f"{anchor / tot['median']:.1f}×" if anchor else "—"
                xb = f"{tot['median'] / bound['total_s']:.2f}×" if bound else "—"
                lines.append(
                    f"| {name} | {profile} | {scenario} | {s['pull_s']['median']:.2f} | "
                    f"{s['create_s']['median']:.2f} | {s['run_s']['median']:.2f} | "
                    f"{tot['median']:.2f} ({tot['min']:.2f}–{tot['max']:.2f}) | "
                    f"{s['link_bytes']['median'] / MB:.1f} | {s['requests']['median']:.0f} | "
                    f"{s['image_pct']['median']:.1f}% | {vs} | {xb} | {s['mode'] or '—'} |")
            if bound:
                vs = f"{anchor / bound['total_s']:.1f}×" if anchor else "—"
                lines.append(
                    f"| {name} | {profile} | bound | | | {bound['warm_s']:.2f} | "
                    f"{bound['total_s']:.2f} | "
                    f"{(bound['needed_bytes'] + bound['metadata_bytes']) / MB:.1f} | | | "
                    f"{vs} | 1.00× | |")
                bounds.append((name, profile, bound))
    if bounds:
        lines += [
            "",
            "Bound = T_warm + max(B_needed / rate, round trips × RTT) + metadata / rate:",
            "",
            "| Image | Profile | T_warm s | B_needed MB (read × ratio) | B / rate s | "
            "round trips × RTT s | metadata MB (rafs / eStargz) | metadata s | bound s |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, profile, b in bounds:
            meta = " / ".join(f"{b['metadata_by_format'][k] / MB:.2f}"
                              for k in ("rafs", "estargz") if k in b["metadata_by_format"])
            lines.append(
                f"| {name} | {profile} | {b['warm_s']:.2f} | {b['needed_bytes'] / MB:.1f} "
                f"({b['read_bytes'] / MB:.1f} × {b['compression_ratio']:.2f}) | "
                f"{b['transfer_s']:.2f} | {b['round_trips']} × {b['rtt'] * 1000:.0f} ms = "
                f"{b['round_trips_s']:.2f} | {meta} | {b['metadata_s']:.2f} | "
                f"{b['total_s']:.2f} |")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], out: Path) -> list[Path]:
    """One PNG per profile: per image, stacked pull/create/run bars per scenario with
    the bound as a dashed line (top), and the MB over the link per scenario with the
    request count on each bar (bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    images = list(result["images"])
    for profile in result["profiles"]:
        fig, axes = plt.subplots(2, len(images), figsize=(4.6 * len(images), 8.4),
                                 squeeze=False)
        for col, name in enumerate(images):
            pr = result["images"][name]["profiles"][profile]
            scen = list(pr["scenarios"])
            xs = range(len(scen))
            ax = axes[0][col]
            bottoms = [0.0] * len(scen)
            for phase, color in zip(PHASES, ("#4c72b0", "#dd8452", "#55a868"), strict=True):
                vals = [pr["scenarios"][s]["summary"][phase]["median"] for s in scen]
                ax.bar(xs, vals, bottom=bottoms, color=color, label=phase.removesuffix("_s"))
                bottoms = [b + v for b, v in zip(bottoms, vals, strict=True)]
            if pr.get("bound"):
                ax.axhline(pr["bound"]["total_s"], color="black", linestyle="--",
                           linewidth=1, label="bound")
            ax.set_xticks(xs, scen, rotation=35, ha="right", fontsize=8)
            ax.set_title(f"{name} ({profile})")
            ax.set_ylabel("seconds to ready (median)")
            ax = axes[1][col]
            mbs = [pr["scenarios"][s]["summary"]["link_bytes"]["median"] / MB for s in scen]
            bars = ax.bar(xs, mbs, color="#8172b3")
            for bar, s in zip(bars, scen, strict=True):
                n = pr["scenarios"][s]["summary"]["requests"]["median"]
                ax.annotate(f"{n:.0f} req", (bar.get_x() + bar.get_width() / 2,
                                             bar.get_height()),
                            ha="center", va="bottom", fontsize=7)
            if pr.get("bound"):
                b = pr["bound"]
                ax.axhline((b["needed_bytes"] + b["metadata_bytes"]) / MB, color="black",
                           linestyle="--", linewidth=1, label="bound's bytes")
                ax.legend(fontsize=8)
            ax.set_xticks(xs, scen, rotation=35, ha="right", fontsize=8)
            ax.set_ylabel("MB over the link before ready (median)")
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
                   help=f"images to run (default: {' '.join(FULL_IMAGES)}; also: "
                   f"{' '.join(n for n in corpus.IMAGES if n not in FULL_IMAGES)})")
    p.add_argument("--samples", type=int, default=None,
                   help="cold samples per image, scenario and profile (default 3; --quick 1)")
    p.add_argument("--mode", default="auto", choices=("auto", "fuse", "kernel"),
                   help="fused mode for rafs run and the snapshotter (default %(default)s)")
    p.add_argument("--against", action="append", choices=PEERS, default=[],
                   help="also run a peer's scenarios: estargz (the stargz snapshotter, "
                   "built from Debian's Go packages on first use and cached)")
    p.add_argument("--scenarios", nargs="+", choices=ALL_SCENARIOS, metavar="SCENARIO",
                   help="run only these scenarios (default: all of the chosen peers'); "
                   f"one of {', '.join(ALL_SCENARIOS)}")
    p.add_argument("--no-peer-build", action="store_true",
                   help="use a peer only if it is built already (never apt-get or go build)")
    p.add_argument("--out", type=Path, default=Path("results"),
                   help="where coldstart.json/.md/.png go (default %(default)s)")
    p.add_argument("--work", type=Path, default=None,
                   help="make the scratch directory (registry, containerd and rafs roots) "
                   "below this one (default /var/tmp); it is removed at the end")


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    images = args.images or ([QUICK_IMAGE] if args.quick else list(FULL_IMAGES))
    profiles = args.profile or (["wan"] if args.quick else list(PROFILES))
    if args.quick:
        images, profiles = images[:1], profiles[:1]
    samples = args.samples if args.samples is not None else (1 if args.quick else 3)
    if samples < 1:
        raise BenchError("--samples must be at least 1")
    against = set(getattr(args, "against", None) or [])
    chosen = getattr(args, "scenarios", None)
    if chosen:
        scenarios = [s for s in ALL_SCENARIOS if s in chosen]
    else:
        scenarios = [s for s, info in SCENARIO_INFO.items()
                     if info.peer is None or info.peer in against]
    return BenchConfig(images=images, profiles=profiles, samples=samples, mode=args.mode,
                       out=args.out, work=getattr(args, "work", None), scenarios=scenarios,
                       peer_build=not getattr(args, "no_peer_build", False))


def _failure_line(e: BaseException, out: Path) -> str:
    """One line for a failed benchmark; the whole story (log tails) goes to a file."""
    if isinstance(e, OSError) and e.filename is not None:
        return f"{e.filename}: {e.strerror or e}"
    text = str(e) or type(e).__name__
    first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
    if "\n" not in text.strip():
        return first
    path = out / "coldstart-error.log"
    try:
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    except OSError:
        return first
    return f"{first} (details: {path})"


def cmd_bench(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        raise BenchError("rafs bench needs root (containerd, runc, mounts, drop_caches)")
    cfg = config_from_args(args)
    try:
        result = run_bench(cfg)
    except (BenchError, corpus.CorpusError, RegistryError, RuntimeError, AssertionError,
            subprocess.SubprocessError, OSError) as e:
        raise BenchError(_failure_line(e, cfg.out)) from None
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
    except RafsError as e:
        print(f"rafs: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
