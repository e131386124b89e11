"""Reference images built from real Debian packages, built once and cached.

Owns: building OCI image layouts of Debian bookworm with ``debootstrap`` and
``umoci`` (layer 1: a minbase debootstrap; each further layer: ``apt-get install``
in a chroot), caching them under ``$RAFS_CACHE`` (default ``/var/cache/rafs``),
the build lock, and the chroot mount discipline.

Both the tests and the benchmarks use these images, so they are plain OCI
layouts with gzip layers and one tag each, nothing rafs-specific.

Guarantees:

- A cached image is complete: it is built in a temporary directory next to the
  cache and renamed into place only when every step succeeded.
- Concurrent builders of the same image wait on an ``fcntl`` lock; the second
  one finds the finished image.
- Nothing stays mounted: ``/proc`` and ``/dev`` are mounted for the chroot only
  and unmounted in ``finally``; before a layer is packed and before a build
  directory is removed, every mount below it is unmounted (lazily if needed) and
  a directory that still has a mount below it is never deleted.

``with_parent_dirs`` derives from an image a copy whose layers carry an entry for
every parent directory of every entry (umoci omits unchanged parents;
``ctr-remote image optimize`` needs them); the benchmarks use that copy for every
form of an image, so all peers start from the same layers.

Run ``python -m bench.corpus [python|minbase|numpy|nodejs|large|gcc|postgres]`` to
build ahead of time.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "IMAGES",
    "BenchImage",
    "CorpusError",
    "debian_gcc_image",
    "debian_large_image",
    "debian_minbase_image",
    "debian_mirror",
    "debian_nodejs_image",
    "debian_numpy_image",
    "debian_postgres_image",
    "debian_python_image",
    "default_cache_dir",
    "with_parent_dirs",
]

SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
# Bump when a recipe changes: the cache key changes with it, so old images are not reused.
RECIPE_VERSION = 1

PYTHON_IMAGE = f"debian-{SUITE}-python3-v{RECIPE_VERSION}"
PYTHON_TAG = "python3"
NUMPY_IMAGE = f"debian-{SUITE}-python3-numpy-v{RECIPE_VERSION}"
NUMPY_TAG = "python3-numpy"
MINBASE_IMAGE = f"debian-{SUITE}-minbase-v{RECIPE_VERSION}"
MINBASE_TAG = "minbase"
NODEJS_IMAGE = f"debian-{SUITE}-nodejs-v{RECIPE_VERSION}"
NODEJS_TAG = "nodejs"
LARGE_IMAGE = f"debian-{SUITE}-scipy-toolchain-v{RECIPE_VERSION}"
LARGE_TAG = "scipy-toolchain"
# The large image's extra layer: a data-science stack and a C toolchain (> 500 MB
# unpacked in all), of which the workload (importing numpy and scipy.linalg) reads little.
LARGE_PACKAGES = ("python3-scipy", "python3-pandas", "python3-sklearn", "gcc", "g++")
GCC_IMAGE = f"debian-{SUITE}-gcc-v{RECIPE_VERSION}"
GCC_TAG = "gcc"
GCC_PACKAGES = ("gcc", "libc6-dev")
POSTGRES_IMAGE = f"debian-{SUITE}-postgresql-v{RECIPE_VERSION}"
POSTGRES_TAG = "postgresql"
POSTGRES_BIN = "/usr/lib/postgresql/15/bin"  # bookworm's PostgreSQL 15
POSTGRES_DATA = "/var/lib/postgresql/data"
PARENT_DIRS_VERSION = 1

_ENV_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_CHROOT_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "DEBIAN_FRONTEND": "noninteractive",
    "LC_ALL": "C",
    "HOME": "/root",
}
_POLICY_RC_D = "#!/bin/sh\n# written by bench.corpus: start no services while building\nexit 101\n"


class CorpusError(RuntimeError):
    """Building a reference image failed; the message names the step."""


# ---------------------------------------------------------------------------------------
# Public API


def default_cache_dir() -> Path:
    """``$RAFS_CACHE`` if set, else ``/var/cache/rafs`` (kept between CI runs)."""
    return Path(os.environ.get("RAFS_CACHE") or "/var/cache/rafs")


def debian_python_image(cache_dir: Path | None = None) -> tuple[Path, str]:
    """Debian bookworm with python3: (OCI layout dir, tag), two gzip layers.

    Layer 1 is ``debootstrap --variant=minbase``; layer 2 adds ``python3`` with apt.
    """
    return _cached(_cache_root(cache_dir), PYTHON_IMAGE, PYTHON_TAG, _build_python)


def debian_numpy_image(cache_dir: Path | None = None) -> tuple[Path, str]:
    """The python3 image plus a third layer with ``python3-numpy``: (layout dir, tag)."""
    root = _cache_root(cache_dir)
    base_layout, base_tag = debian_python_image(root)

    def build(work: Path, layout: Path, tag: str) -> None:
        _progress(f"copying {base_layout.name} as the base")
        shutil.copytree(base_layout, layout, symlinks=True)
        bundle = work / "bundle"
        _umoci(work, "unpack", "--image", f"{layout}:{base_tag}", str(bundle))
        rootfs = bundle / "rootfs"
        _apt_install_layer(work, rootfs, ["python3-numpy"])
        _umoci(
            work, "repack", "--history.created_by", "apt-get install python3-numpy",
            "--image", f"{layout}:{tag}", str(bundle),
        )
        _umoci(work, "rm", "--image", f"{layout}:{base_tag}")
        _umoci(work, "gc", "--layout", str(layout))

    return _cached(root, NUMPY_IMAGE, NUMPY_TAG, build)


def debian_minbase_image(cache_dir: Path | None = None) -> tuple[Path, str]:
    """Debian bookworm minbase alone, one gzip layer: the python3 image's first layer."""
    root = _cache_root(cache_dir)
    base_layout, base_tag = debian_python_image(root)

    def build(work: Path, layout: Path, tag: str) -> None:
        shutil.copytree(base_layout, layout, symlinks=True)
        _keep_first_layers(layout, base_tag, tag, 1, cmd=["/bin/sh"])
        _umoci(work, "rm", "--image", f"{layout}:{base_tag}")
        _umoci(work, "gc", "--layout", str(layout))

    return _cached(root, MINBASE_IMAGE, MINBASE_TAG, build)


def debian_nodejs_image(cache_dir: Path | None = None) -> tuple[Path, str]:
    """The minbase image plus a layer with ``nodejs``: (layout dir, tag)."""
    root = _cache_root(cache_dir)
    base_layout, base_tag = debian_minbase_image(root)
    return _cached(root, NODEJS_IMAGE, NODEJS_TAG, _layer_on(
        base_layout, base_tag, ["nodejs"], cmd=["node"]))


def debian_large_image(cache_dir: Path | None = None) -> tuple[Path, str]:
    """The python3-numpy image plus a large layer (``LARGE_PACKAGES``): (layout dir, tag)."""
    root = _cache_root(cache_dir)
    base_layout, base_tag = debian_numpy_image(root)
    return _cached(root, LARGE_IMAGE, LARGE_TAG, _layer_on(
        base_layout, base_tag, list(LARGE_PACKAGES)))


def debian_gcc_image(cache_dir: Path | None = None) -> tuple[Path, str]:
    """The minbase image plus a layer with a C compiler (``GCC_PACKAGES``)."""
    root = _cache_root(cache_dir)
    base_layout, base_tag = debian_minbase_image(root)
    return _cached(root, GCC_IMAGE, GCC_TAG, _layer_on(
        base_layout, base_tag, list(GCC_PACKAGES), cmd=["gcc", "--version"]))


def debian_postgres_image(cache_dir: Path | None = None) -> tuple[Path, str]:
    """The minbase image plus a layer with PostgreSQL 15 and a database cluster made
    by ``initdb`` at build time in ``POSTGRES_DATA`` (trust auth, 1 MiB WAL segments,
    so a start copies up little); Debian's own ``main`` cluster is dropped."""
    root = _cache_root(cache_dir)
    base_layout, base_tag = debian_minbase_image(root)
    return _cached(root, POSTGRES_IMAGE, POSTGRES_TAG, _layer_on(
        base_layout, base_tag, ["postgresql"], cmd=[f"{POSTGRES_BIN}/postgres"],
        after=_initdb))


def with_parent_dirs(layout: Path, tag: str,
                     cache_dir: Path | None = None) -> tuple[Path, str]:
    """``layout:tag`` with an entry for every parent directory in every layer
    (``bench.parentdirs``), cached next to the source as ``NAME-parentdirs-vN``."""
    from bench.parentdirs import add_parent_dirs

    root = _cache_root(cache_dir)

    def build(work: Path, out: Path, out_tag: str) -> None:
        fixes = add_parent_dirs(layout, tag, out, out_tag)
        _progress(f"{layout.name}: parent directory entries added per layer: "
                  f"{', '.join(str(f.added) for f in fixes)}")

    return _cached(root, f"{layout.name}-parentdirs-v{PARENT_DIRS_VERSION}", tag, build)


def _initdb(work: Path, rootfs: Path) -> None:
    with _chroot_mounts(rootfs):
        chroot = ["chroot", str(rootfs)]
        _run([*chroot, "pg_dropcluster", "15", "main"], work, env=_CHROOT_ENV)
        _run([*chroot, "install", "-d", "-o", "postgres", "-g", "postgres", "-m", "0700",
              POSTGRES_DATA], work, env=_CHROOT_ENV)
        _run(["chroot", "--userspec=postgres:postgres", str(rootfs), f"{POSTGRES_BIN}/initdb",
              "-D", POSTGRES_DATA, "--auth=trust", "--wal-segsize=1", "--no-sync",
              "--encoding=UTF8", "--locale=C"], work,
             env={**_CHROOT_ENV, "HOME": "/var/lib/postgresql"}, timeout=600)


# The compiler workload: write a C file, compile and link it, run it.
_HELLO_C = r'#include <stdio.h>\nint main(void) { puts(\"hello\"); return 0; }\n'
GCC_WORKLOAD = ("sh", "-c", f'printf "{_HELLO_C}" > /tmp/hello.c && '
                "gcc -O2 -o /tmp/hello /tmp/hello.c && /tmp/hello")
# The database workload: start the server on a unix socket, query its catalog, stop it.
POSTGRES_WORKLOAD = (
    "setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", "sh", "-c",
    f"{POSTGRES_BIN}/pg_ctl -D {POSTGRES_DATA} -o '-c listen_addresses= -k /tmp' "
    "-l /tmp/pg.log -w -s start && "
    f"{POSTGRES_BIN}/psql -h /tmp -At -c "
    "\"select 'ok' from pg_class having count(*) > 100\" postgres && "
    f"{POSTGRES_BIN}/pg_ctl -D {POSTGRES_DATA} -m fast -w -s stop")


@dataclass(frozen=True)
class BenchImage:
    """A benchmark image: how to build it, the workload and what ready means.

    Ready is: the workload exits 0 and, if ``expect`` is set, its stdout (stripped)
    starts with it.
    """

    name: str
    build: Callable[[Path | None], tuple[Path, str]]
    workload: tuple[str, ...]
    expect: str | None = None


IMAGES: dict[str, BenchImage] = {
    img.name: img for img in (
        BenchImage("minbase", debian_minbase_image, ("true",)),
        BenchImage("numpy", debian_numpy_image,
                   ("python3", "-c", "import numpy; print('ok')"), "ok"),
        BenchImage("nodejs", debian_nodejs_image, ("node", "-e", "console.log(1)"), "1"),
        BenchImage("large", debian_large_image,
                   ("python3", "-c", "import numpy, scipy.linalg; print('ok')"), "ok"),
        BenchImage("gcc", debian_gcc_image, GCC_WORKLOAD, "hello"),
        BenchImage("postgres", debian_postgres_image, POSTGRES_WORKLOAD, "ok"),
    )
}


def debian_mirror() -> str:
    """The http Debian mirror this host's apt uses for bookworm (``$RAFS_DEBIAN_MIRROR`` wins).

    Only ``http://`` mirrors qualify: the minbase chroot has no CA certificates.
    """
    override = os.environ.get("RAFS_DEBIAN_MIRROR")
    if override:
        return override
    for uri in _apt_uris():
        if uri.startswith("http://"):
            return uri.rstrip("/")
    return DEFAULT_MIRROR


# ---------------------------------------------------------------------------------------
# Cache and lock


def _cache_root(cache_dir: Path | None) -> Path:
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    return root


def _is_complete(layout: Path, tag: str) -> bool:
    try:
        index = json.loads((layout / "index.json").read_text())
    except (OSError, ValueError):
        return False
    refs = [
        m.get("annotations", {}).get("org.opencontainers.image.ref.name")
        for m in index.get("manifests", [])
    ]
    return tag in refs and (layout / "oci-layout").is_file()


def _make_readable(layout: Path) -> None:
    """umoci writes blobs 0600; a cached image is shared, read-only data."""
    for dirpath, _dirs, files in os.walk(layout):
        os.chmod(dirpath, 0o755)
        for name in files:
            os.chmod(os.path.join(dirpath, name), 0o644)


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    with open(lock_path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _progress(f"waiting for another builder ({lock_path})")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


Builder = Callable[[Path, Path, str], None]


def _cached(root: Path, name: str, tag: str, build: Builder) -> tuple[Path, str]:
    final = root / name
    if _is_complete(final, tag):
        return final, tag
    with _locked(root / f".{name}.lock"):
        if _is_complete(final, tag):
            return final, tag
        for stale in root.glob(f".build-{name}-*"):
            _progress(f"removing stale build directory {stale}")
            _safe_rmtree(stale)
        if final.exists():
            _safe_rmtree(final)
        work = Path(tempfile.mkdtemp(prefix=f".build-{name}-", dir=root))
        started = time.monotonic()
        _progress(f"building {name} in {work}")
        try:
            with _sigterm_raises():
                layout = work / "layout"
                build(work, layout, tag)
                if not _is_complete(layout, tag):
                    raise CorpusError(f"{name}: the build produced no tag {tag!r}")
                _make_readable(layout)
                os.rename(layout, final)
        finally:
            _safe_rmtree(work)
        _progress(f"built {final}:{tag} in {time.monotonic() - started:.0f}s")
    return final, tag


# ---------------------------------------------------------------------------------------
# Recipes


def _layer_on(base_layout: Path, base_tag: str, packages: list[str],
              cmd: list[str] | None = None,
              after: Callable[[Path, Path], None] | None = None) -> Builder:
    """A builder: ``base_layout`` plus one layer of ``apt-get install packages``;
    ``after(work, rootfs)`` runs before the layer is packed."""

    def build(work: Path, layout: Path, tag: str) -> None:
        _progress(f"copying {base_layout.name} as the base")
        shutil.copytree(base_layout, layout, symlinks=True)
        bundle = work / "bundle"
        _umoci(work, "unpack", "--image", f"{layout}:{base_tag}", str(bundle))
        _apt_install_layer(work, bundle / "rootfs", packages)
        if after is not None:
            after(work, bundle / "rootfs")
        _umoci(
            work, "repack", "--history.created_by", f"apt-get install {' '.join(packages)}",
            "--image", f"{layout}:{tag}", str(bundle),
        )
        if cmd:
            _umoci(work, "config", "--image", f"{layout}:{tag}", "--clear=config.cmd",
                   *[a for c in cmd for a in ("--config.cmd", c)])
        _umoci(work, "rm", "--image", f"{layout}:{base_tag}")
        _umoci(work, "gc", "--layout", str(layout))

    return build


def _blob_path(layout: Path, digest: str) -> Path:
    algo, _, hexd = digest.partition(":")
    return layout / "blobs" / algo / hexd


def _write_blob(layout: Path, data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    _blob_path(layout, digest).write_bytes(data)
    return digest


def _keep_first_layers(layout: Path, src_tag: str, tag: str, n: int,
                       cmd: list[str]) -> None:
    """Tag ``tag`` in ``layout``: ``src_tag`` cut down to its first ``n`` layers."""
    index = json.loads((layout / "index.json").read_text())
    desc = next(m for m in index["manifests"]
                if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == src_tag)
    manifest = json.loads(_blob_path(layout, desc["digest"]).read_text())
    config = json.loads(_blob_path(layout, manifest["config"]["digest"]).read_text())
    config["rootfs"]["diff_ids"] = config["rootfs"]["diff_ids"][:n]
    history, kept = [], 0
    for h in config.get("history", []):
        if kept == n:
            break
        history.append(h)
        kept += 0 if h.get("empty_layer") else 1
    config["history"] = history
    config["config"]["Cmd"] = cmd
    config_bytes = json.dumps(config, separators=(",", ":")).encode()
    manifest["config"] = {**manifest["config"], "digest": _write_blob(layout, config_bytes),
                          "size": len(config_bytes)}
    manifest["layers"] = manifest["layers"][:n]
    manifest_bytes = json.dumps(manifest, separators=(",", ":")).encode()
    index["manifests"].append({
        "mediaType": desc["mediaType"], "digest": _write_blob(layout, manifest_bytes),
        "size": len(manifest_bytes),
        "annotations": {"org.opencontainers.image.ref.name": tag},
    })
    (layout / "index.json").write_text(json.dumps(index))


def _build_python(work: Path, layout: Path, tag: str) -> None:
    bundle = work / "bundle"
    _umoci(work, "init", "--layout", str(layout))
    _umoci(work, "new", "--image", f"{layout}:{tag}")
    _umoci(work, "unpack", "--image", f"{layout}:{tag}", str(bundle))
    rootfs = bundle / "rootfs"

    mirror = debian_mirror()
    _progress(f"debootstrap --variant=minbase {SUITE} from {mirror} (a few minutes)")
    try:
        _run(
            ["debootstrap", "--variant=minbase", SUITE, str(rootfs), mirror],
            work, timeout=3600,
        )
    finally:
        _unmount_below(rootfs)  # debootstrap mounts /proc and /sys itself
    _clean_apt(rootfs)
    for leak in ("etc/resolv.conf", "etc/hostname"):  # the build host's, not the image's
        with contextlib.suppress(FileNotFoundError):
            (rootfs / leak).unlink()
    _umoci(
        work, "repack", "--refresh-bundle",
        "--history.created_by", f"debootstrap --variant=minbase {SUITE}",
        "--image", f"{layout}:{tag}", str(bundle),
    )

    _apt_install_layer(work, rootfs, ["python3"])
    _umoci(
        work, "repack", "--history.created_by", "apt-get install python3",
        "--image", f"{layout}:{tag}", str(bundle),
    )
    _umoci(
        work, "config", "--image", f"{layout}:{tag}",
        "--config.env", _ENV_PATH, "--config.env", "LANG=C.UTF-8",
        "--config.cmd", "python3", "--config.workingdir", "/",
    )
    _umoci(work, "gc", "--layout", str(layout))


def _apt_install_layer(work: Path, rootfs: Path, packages: Sequence[str]) -> None:
    """Install ``packages`` into ``rootfs`` with apt in a chroot, leaving no caches behind."""
    _progress(f"apt-get install {' '.join(packages)} in a chroot")
    resolv = rootfs / "etc/resolv.conf"
    had_resolv = resolv.exists() or resolv.is_symlink()
    policy = rootfs / "usr/sbin/policy-rc.d"
    if not had_resolv:
        shutil.copyfile("/etc/resolv.conf", resolv)
    policy.write_text(_POLICY_RC_D)
    policy.chmod(0o755)
    try:
        with _chroot_mounts(rootfs):
            chroot = ["chroot", str(rootfs)]
            _run([*chroot, "apt-get", "update"], work, env=_CHROOT_ENV, timeout=1800)
            _run(
                [*chroot, "apt-get", "install", "-y", "--no-install-recommends", *packages],
                work, env=_CHROOT_ENV, timeout=3600,
            )
            _run([*chroot, "apt-get", "clean"], work, env=_CHROOT_ENV, timeout=600)
    finally:
        _unmount_below(rootfs)
        policy.unlink(missing_ok=True)
        if not had_resolv:
            resolv.unlink(missing_ok=True)
    _clean_apt(rootfs)


def _clean_apt(rootfs: Path) -> None:
    """Drop apt lists, package caches and the debootstrap leftovers, as Docker images do."""
    for pattern in (
        "var/lib/apt/lists/*",
        "var/cache/apt/*.bin",
        "var/cache/apt/archives/*.deb",
        "var/cache/debconf/*-old",
        "var/lib/dpkg/*-old",
    ):
        for p in rootfs.glob(pattern):
            if p.is_file() and not p.is_symlink() and p.name != "lock":
                p.unlink()
    for d in ("var/lib/apt/lists/partial",):
        with contextlib.suppress(FileNotFoundError):
            for p in (rootfs / d).iterdir():
                p.unlink()


def _apt_uris() -> Iterator[str]:
    """Mirror URIs for ``SUITE`` from the host's deb822 and one-line apt sources."""
    for path in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        with contextlib.suppress(OSError):
            for stanza in path.read_text().split("\n\n"):
                fields: dict[str, str] = {}
                for line in stanza.splitlines():
                    if line.startswith("#") or ":" not in line:
                        continue
                    key, _, value = line.partition(":")
                    fields[key.strip().lower()] = value.strip()
                if SUITE in fields.get("suites", "").split() and "deb" in fields.get(
                    "types", ""
                ).split():
                    yield from fields.get("uris", "").split()
    for path in [Path("/etc/apt/sources.list"), *Path("/etc/apt/sources.list.d").glob("*.list")]:
        with contextlib.suppress(OSError):
            for line in path.read_text().splitlines():
                words = [w for w in line.split() if not w.startswith("[")]
                if len(words) >= 3 and words[0] == "deb" and words[2] == SUITE:
                    yield words[1]


# ---------------------------------------------------------------------------------------
# Mount discipline


def _mounts_below(path: Path) -> list[Path]:
    """Mount points at or below ``path``, deepest first."""
    base = os.path.realpath(path)
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = _unescape_mountinfo(line.split()[4])
            if point == base or point.startswith(base.rstrip("/") + "/"):
                found.append(Path(point))
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def _unescape_mountinfo(field: str) -> str:
    for esc, ch in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(esc, ch)
    return field


def _unmount_below(path: Path) -> None:
    """Unmount everything at or below ``path``; raise if anything stays mounted."""
    for _ in range(3):
        points = _mounts_below(path)
        if not points:
            return
        for point in points:
            if subprocess.run(["umount", str(point)], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", str(point)], capture_output=True)
    left = _mounts_below(path)
    if left:
        raise CorpusError(f"could not unmount {', '.join(map(str, left))}")


@contextlib.contextmanager
def _chroot_mounts(rootfs: Path) -> Iterator[None]:
    """``/proc`` and a read-only bind of ``/dev`` inside ``rootfs``, always unmounted."""
    try:
        (rootfs / "proc").mkdir(exist_ok=True)
        (rootfs / "dev").mkdir(exist_ok=True)
        _run_quiet(["mount", "-t", "proc", "proc", str(rootfs / "proc")])
        _run_quiet(["mount", "--bind", "/dev", str(rootfs / "dev")])
        # Read-only: writes to device nodes still work, but nothing can delete host /dev.
        _run_quiet(["mount", "-o", "remount,bind,ro", str(rootfs / "dev")])
        yield
    finally:
        _unmount_below(rootfs)


def _safe_rmtree(path: Path) -> None:
    """Remove ``path``, first unmounting anything below it; never delete through a mount."""
    if not (path.exists() or path.is_symlink()):
        return
    _unmount_below(path)
    shutil.rmtree(path)


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """Turn SIGTERM into SystemExit so ``finally`` blocks unmount (main thread only)."""
    if sys.platform != "linux" or not _in_main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


# ---------------------------------------------------------------------------------------
# Processes


def _progress(message: str) -> None:
    print(f"corpus: {message}", file=sys.stderr, flush=True)


def _run_quiet(cmd: Sequence[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise CorpusError(f"{' '.join(cmd)} failed: {proc.stderr.strip()}")


def _run(
    cmd: Sequence[str], work: Path, *, env: dict[str, str] | None = None, timeout: float = 600
) -> None:
    """Run ``cmd`` with output appended to ``work/build.log``; raise with the log tail."""
    log_path = work / "build.log"
    with open(log_path, "ab") as log:
        log.write(f"\n$ {' '.join(cmd)}\n".encode())
        log.flush()
        try:
            proc = subprocess.run(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=env, timeout=timeout,
            )
        except subprocess.TimeoutExpired as e:
            raise CorpusError(f"{cmd[0]} timed out after {timeout:.0f}s") from e
    if proc.returncode != 0:
        tail = log_path.read_bytes()[-3000:].decode(errors="replace")
        raise CorpusError(f"{' '.join(cmd)} exited {proc.returncode}; log tail:\n{tail}")


def _umoci(work: Path, *args: str) -> None:
    _run(["umoci", *args], work, timeout=1800)


def main(argv: list[str] | None = None) -> int:
    which = (argv if argv is not None else sys.argv[1:]) or ["python"]
    builders: dict[str, Callable[..., tuple[Path, str]]] = {
        "python": debian_python_image, **{name: img.build for name, img in IMAGES.items()}}
    for name in which:
        if name not in builders:
            print(f"usage: python -m bench.corpus [{'|'.join(builders)}]...", file=sys.stderr)
            return 2
        layout, tag = builders[name]()
        print(f"oci:{layout}:{tag}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
