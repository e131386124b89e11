"""eStargz, the peer of ``rafs bench --against estargz``: its snapshotter and its images.

Owns:

- ``build_peer`` — the stargz snapshotter daemon (``estargz-snapshotter/main.go``,
  over the library's ``service`` package), built in GOPATH mode from Debian's Go
  sources (``/usr/share/gocode``) with a stand-in for the one CRI type the library
  needs (``estargz-snapshotter/cri-api``), cached in ``peer_dir()`` under a key
  hashed from those sources and the Go, stargz and containerd package versions.
  ``APT_PACKAGES`` are installed with apt on first use. When any of it cannot be
  had, ``PeerUnavailable`` says why in one line.
- ``cached_peer`` — the binary if it is built already (nothing is installed or built).
- ``peer_process`` — the daemon serving the snapshots API on a socket for one
  cold sample (its own root: empty layer caches); stopped with SIGTERM, which
  closes the snapshotter and unmounts its layers; anything left under its root
  is unmounted after.
- ``estargz_images`` — the two eStargz forms of a corpus image: ``ctr-remote image
  convert --estargz --oci`` (lazy) and ``ctr-remote image optimize --oci`` with
  the workload (files it read first, prefetched at mount), made with a private
  containerd and cached as one OCI layout (tags ``ESTARGZ_TAG``,
  ``OPTIMIZED_TAG``) under ``peer_dir()/images``, keyed by the source manifest,
  the workload and the ctr-remote (``stargz-snapshotter`` package) version.
- ``versions`` — the Go, library and ctr-remote versions, for the report.

The snapshotter runs with the library's defaults except background fetch, which
is off (``--no-background-fetch``): by default the peer downloads whole layers in
the background from mount on, which would compete with the start-up's own
fetches on the link and add bytes that no read asked for; rafs has no such
fetch. Prefetch of optimized images (the recorded files) stays on.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from bench import corpus
from bench.containerd_env import containerd_daemon, stop_process, unmount_under, wait_for_path
from rafs.errors import RafsError

__all__ = [
    "APT_PACKAGES",
    "ESTARGZ_TAG",
    "OPTIMIZED_TAG",
    "PeerError",
    "PeerUnavailable",
    "build_peer",
    "cached_peer",
    "estargz_images",
    "peer_dir",
    "peer_process",
    "versions",
]

log = logging.getLogger(__name__)

SOURCE = Path(__file__).resolve().parent / "estargz-snapshotter"
GOCODE = Path("/usr/share/gocode/src")
LIBRARY = GOCODE / "github.com/containerd/stargz-snapshotter"
LIBRARY_PACKAGE = "golang-github-containerd-stargz-snapshotter-dev"
APT_PACKAGES = ("golang-go", LIBRARY_PACKAGE)
VERSIONED_PACKAGES = ("golang-go", LIBRARY_PACKAGE, "golang-github-containerd-containerd-dev")
GO_PACKAGE = "rafsbench/estargz-snapshotter"  # the main package's path in the build GOPATH
ESTARGZ_TAG = "estargz"
OPTIMIZED_TAG = "estargz-optimized"
BUILD_TIMEOUT = 1800


class PeerError(RafsError):
    """Converting an image or running the peer failed; the message says which step."""


class PeerUnavailable(PeerError):
    """The peer cannot be built here (no Go toolchain, package missing, build failed)."""


def peer_dir() -> Path:
    """Where built peers and converted images are cached: ``$RAFS_PEER_CACHE``, else
    ``$RAFS_CACHE/peers`` (``/var/cache/rafs/peers``)."""
    override = os.environ.get("RAFS_PEER_CACHE")
    return Path(override) if override else corpus.default_cache_dir() / "peers"


# ---------------------------------------------------------------------------------------
# Building the snapshotter


def _package_version(name: str) -> str | None:
    try:
        proc = subprocess.run(["dpkg-query", "-W", "-f", "${Status} ${Version}", name],
                              capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    words = proc.stdout.split()
    return words[-1] if proc.returncode == 0 and "installed" in words[:3] else None


def _source_files() -> list[Path]:
    return sorted(p for p in SOURCE.rglob("*.go") if p.is_file())


def _build_key() -> str | None:
    """Hash of the sources and the package versions; None if a package is missing."""
    h = hashlib.sha256()
    for path in _source_files():
        h.update(str(path.relative_to(SOURCE)).encode() + b"\0" + path.read_bytes() + b"\0")
    for name in VERSIONED_PACKAGES:
        version = _package_version(name)
        if version is None:
            return None
        h.update(f"{name}={version}\0".encode())
    return h.hexdigest()[:16]


def _binary(key: str) -> Path:
    return peer_dir() / f"estargz-snapshotter-{key}"


def cached_peer() -> Path | None:
    """The built snapshotter for the current sources and packages, or None."""
    key = _build_key()
    if key is None:
        return None
    binary = _binary(key)
    return binary if os.access(binary, os.X_OK) else None


def _install_packages() -> None:
    if os.geteuid() != 0:
        raise PeerUnavailable(f"cannot build the eStargz peer: {' '.join(APT_PACKAGES)} are "
                              "not installed and installing them needs root")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    argv = ["apt-get", "install", "-y", "--no-install-recommends", *APT_PACKAGES]
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode != 0:  # maybe the package lists are stale or missing
        subprocess.run(["apt-get", "update"], capture_output=True, env=env, timeout=600)
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode != 0:
        last = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-1:] or ["?"]
        raise PeerUnavailable(f"cannot build the eStargz peer: apt-get install "
                              f"{' '.join(APT_PACKAGES)} failed: {last[0]}")


def build_peer(*, install: bool = True) -> Path:
    """The snapshotter binary, built and cached on first use (one to two minutes).

    ``install``: install ``APT_PACKAGES`` if missing (else PeerUnavailable).
    """
    binary = cached_peer()
    if binary is not None:
        return binary
    if _build_key() is None or shutil.which("go") is None:
        if not install:
            raise PeerUnavailable("cannot build the eStargz peer: no Go toolchain (go) or "
                                  f"not all of {' '.join(APT_PACKAGES)} installed")
        _install_packages()
    key = _build_key()
    if key is None or shutil.which("go") is None or not (LIBRARY / "service").is_dir():
        raise PeerUnavailable(f"cannot build the eStargz peer: no Go toolchain or no "
                              f"{LIBRARY} after installing {' '.join(APT_PACKAGES)}")
    peer_dir().mkdir(parents=True, exist_ok=True)
    with _locked(peer_dir() / ".estargz-build.lock"):
        binary = _binary(key)
        if os.access(binary, os.X_OK):
            return binary
        _progress(f"building the eStargz snapshotter into {binary} (one to two minutes, once)")
        with tempfile.TemporaryDirectory(prefix="estargz-gopath-", dir=peer_dir()) as tmp:
            gopath = Path(tmp)
            shutil.copytree(SOURCE / "cri-api", gopath / "src/k8s.io/cri-api")
            main_dir = gopath / "src" / GO_PACKAGE
            main_dir.mkdir(parents=True)
            shutil.copy(SOURCE / "main.go", main_dir / "main.go")
            env = {**os.environ, "GO111MODULE": "off", "GOFLAGS": "",
                   "GOPATH": f"{gopath}{os.pathsep}{GOCODE.parent}",
                   "GOCACHE": str(peer_dir() / "gocache")}
            out = gopath / "estargz-snapshotter"
            proc = subprocess.run(["go", "build", "-trimpath", "-o", str(out), GO_PACKAGE],
                                  cwd=main_dir, env=env, capture_output=True, text=True,
                                  timeout=BUILD_TIMEOUT)
            if proc.returncode != 0:
                lines = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
                raise PeerUnavailable("cannot build the eStargz peer: go build failed: "
                                      + (" | ".join(lines[:3]) or "?"))
            os.replace(out, binary)
    return binary


# ---------------------------------------------------------------------------------------
# Running it


@contextlib.contextmanager
def peer_process(binary: Path, address: Path, root: Path, log_path: Path,
                 *, background_fetch: bool = False) -> Iterator[subprocess.Popen[bytes]]:
    """The snapshotter serving on ``address`` with state in ``root`` until the block
    ends; then stopped, and everything mounted under ``root`` unmounted."""
    root.mkdir(parents=True, exist_ok=True)
    argv = [str(binary), "--address", str(address), "--root", str(root)]
    if not background_fetch:
        argv.append("--no-background-fetch")
    with contextlib.suppress(FileNotFoundError):
        address.unlink()
    with open(log_path, "ab") as logf:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                start_new_session=True)
    try:
        try:
            wait_for_path(address, proc, 60, "the eStargz snapshotter", log_path)
        except AssertionError as e:
            raise PeerError(str(e)) from None
        yield proc
    finally:
        stop_process(proc)
        unmount_under(root)


# ---------------------------------------------------------------------------------------
# Images


def _run(argv: Sequence[str], what: str, timeout: float = 1800) -> str:
    proc = subprocess.run(list(argv), capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          timeout=timeout)
    if proc.returncode != 0:
        raise PeerError(f"{what} exited {proc.returncode}: "
                        f"{(proc.stderr or proc.stdout).strip()[-1500:]}")
    return proc.stdout


def _manifest_digest(layout: Path, tag: str) -> str:
    index = json.loads((layout / "index.json").read_text())
    for m in index["manifests"]:
        if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag:
            return str(m["digest"])
    raise PeerError(f"{layout}: no tag {tag!r}")


def _images_key(layout: Path, tag: str, workload: Sequence[str]) -> str:
    h = hashlib.sha256()
    h.update(_manifest_digest(layout, tag).encode() + b"\0")
    h.update(json.dumps(list(workload)).encode() + b"\0")
    h.update((_package_version("stargz-snapshotter") or "?").encode())
    return h.hexdigest()[:16]


def estargz_images(name: str, layout: Path, tag: str, workload: Sequence[str],
                   registry_host: str, work: Path) -> Path:
    """An OCI layout holding ``layout:tag`` as eStargz (tag ``ESTARGZ_TAG``) and as
    eStargz optimized for ``workload`` (tag ``OPTIMIZED_TAG``), cached.

    ``registry_host`` serves the source image as ``bench/NAME:oci`` (plain HTTP);
    the conversion pulls it from there into a private containerd under ``work``.
    """
    key = _images_key(layout, tag, workload)
    final = peer_dir() / "images" / f"{name}-{key}"
    if _is_complete(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with _locked(final.parent / f".{name}-{key}.lock"):
        if _is_complete(final):
            return final
        _progress(f"{name}: converting to eStargz and optimizing it with ctr-remote "
                  "(a few minutes, once)")
        base = work / f"estargz-convert-{name}"
        src = f"{registry_host}/bench/{name}:oci"
        lazy, optimized = f"bench/{name}:{ESTARGZ_TAG}", f"bench/{name}:{OPTIMIZED_TAG}"
        try:
            with containerd_daemon(base / "containerd", base / "no-proxy.sock",
                                   namespace="estargz-convert") as cd:
                ctr = ["ctr", "--address", str(cd.address), "--namespace", cd.namespace]
                remote = ["ctr-remote", *ctr[1:]]
                _run([*ctr, "image", "pull", "--plain-http", src], f"ctr image pull {src}")
                _run([*remote, "image", "convert", "--estargz", "--oci", src, lazy],
                     f"ctr-remote image convert --estargz {name}")
                _run([*remote, "image", "optimize", "--oci",
                      "--entrypoint", json.dumps(list(workload[:1])),
                      "--args", json.dumps(list(workload[1:])), src, optimized],
                     f"ctr-remote image optimize {name}")
                archive = base / "estargz.tar"
                _run([*ctr, "image", "export", "--platform", "linux/amd64", str(archive),
                      lazy, optimized], f"ctr image export {name}")
            tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=final.parent))
            with tarfile.open(archive) as tar:
                tar.extractall(tmp, filter="data")
            for path in [tmp, *tmp.rglob("*")]:
                path.chmod(0o755 if path.is_dir() else 0o644)
            if not _is_complete(tmp):
                raise PeerError(f"{name}: ctr image export wrote no {ESTARGZ_TAG!r} and "
                                f"{OPTIMIZED_TAG!r} tags")
            os.rename(tmp, final)
        finally:
            unmount_under(base)
            shutil.rmtree(base, ignore_errors=True)
            for stale in final.parent.glob(f".{name}-*"):
                if stale.is_dir():
                    shutil.rmtree(stale, ignore_errors=True)
    return final


def _is_complete(layout: Path) -> bool:
    try:
        index = json.loads((layout / "index.json").read_text())
    except (OSError, ValueError):
        return False
    tags = {m.get("annotations", {}).get("org.opencontainers.image.ref.name")
            for m in index.get("manifests", [])}
    return {ESTARGZ_TAG, OPTIMIZED_TAG} <= tags


# ---------------------------------------------------------------------------------------
# Helpers


def versions() -> dict[str, str]:
    """Versions of what makes the peer: Go, the stargz and containerd libraries, ctr-remote."""
    def first_line(argv: list[str]) -> str:
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return "unavailable"
        lines = (proc.stdout or proc.stderr).strip().splitlines()
        return lines[0] if lines else "?"

    return {
        "go": first_line(["go", "version"]),
        "stargz-snapshotter library": _package_version(LIBRARY_PACKAGE) or "not installed",
        "containerd library": _package_version("golang-github-containerd-containerd-dev")
        or "not installed",
        "ctr-remote": f"stargz-snapshotter {_package_version('stargz-snapshotter') or '?'} "
                      f"({first_line(['ctr-remote', '--version'])})",
    }


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _progress(message: str) -> None:
    print(f"bench: {message}", flush=True, file=sys.stderr)


def main() -> int:
    """``python -m bench.peers.estargz``: install the packages, build the peer, print
    its path (what ``make bench-deps`` does)."""
    try:
        print(build_peer())
    except PeerError as e:
        print(f"rafs: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
