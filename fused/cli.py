"""``rafs mount``, ``rafs umount``, ``rafs stats`` and ``rafs trace``.

``rafs mount`` starts ``python -m fused.daemon`` detached (its own session,
output to ``<run>/<key>.log``, see ``fused.control``) and returns only when
the daemon reports the mount ready through a pipe (``--ready-fd``). If the
daemon reports an error, dies, or does not get ready in time, the command
makes sure nothing stays mounted and fails with one line. ``--foreground``
serves in this process instead.

``rafs umount`` asks the daemon to unmount and exit through the control socket
and waits for it to go; if no daemon answers (it crashed) it falls back to
``fusermount3 -u``, then ``fusermount3 -u -z``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rafs import sizes
from rafs.credentials import parse_creds
from rafs.hosts import DEFAULT_HOSTS_DIR, HOSTS_DIR_ENV, load_hosts, use_hosts_dir
from rafs.oci import parse_image_ref


from .cacheconf import load_config
from .control import ensure_run_dir, paths_for, request
from .errors import ControlError, MountError, NotMountedError
from .options import DEFAULT_AMPLIFY, DEFAULT_FETCH_TIMEOUT, DEFAULT_RETRIES, BackendOptions
from .kernelmount import MODES, resolve_mode
from .mounts import BLOB_FSTYPE, canonical, find_mount, fusermount_unmount

if TYPE_CHECKING:
    from .daemon import DaemonConfig

__all__ = ["CREDS_ENV", "MountOptions", "mount_background", "register", "stats", "trace",
           "umount"]

CREDS_ENV = "RAFS_REGISTRY_CREDS"

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 120.0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "mount", help="mount a RAFS image with a lazy-loading daemon",
        description="Mount IMAGE (oci:DIR[:TAG]) read-only on MOUNTPOINT. Returns once the "
        "mount is ready; the daemon keeps running until `rafs umount`.",
    )
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("--cache-dir", metavar="DIR",
                   help="chunk cache, shared by every mount on the host (default: the "
                   "host's, $RAFS_CACHE_DIR or /var/lib/rafs/cache for root; see `rafs cache`)")
    p.add_argument("--cache-max", metavar="SIZE",
                   help="cap of the cache, e.g. 20G or 15%% of its file system (default: "
                   "cache.max of the host config file, else none); least recently used "
                   "chunks are evicted past it")
    p.add_argument("--cache-min-free", metavar="SIZE",
                   help="evict while the cache's file system has less free than this "
                   "(default: cache.min_free of the host config file, else 5%%)")
    p.add_argument("--foreground", action="store_true",
                   help="serve in this process until unmounted")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                   help="how long to wait for the mount to become ready (default %(default)s)")
    p.add_argument("--prefetch", action=argparse.BooleanOptionalAction, default=True,
                   help="fetch the files of the image's prefetch list in the background, "
                   "below on-demand reads (default: on)")
    p.add_argument("--amplify-bytes", type=_size, default=DEFAULT_AMPLIFY, metavar="BYTES",
                   help="grow an on-demand fetch with the chunks that follow it in the blob "
                   "up to this many bytes (default 1M; 0: fetch only what is read)")
    p.add_argument("--fetch-timeout", type=float, default=DEFAULT_FETCH_TIMEOUT,
                   metavar="SECONDS", help="a fetch that receives nothing for this long fails "
                   f"and is retried (default {DEFAULT_FETCH_TIMEOUT:g})")
    p.add_argument("--retries", type=int, default=DEFAULT_RETRIES,
                   help="retries of a failed fetch, with exponential backoff, before the "
                   f"read fails with EIO (default {DEFAULT_RETRIES})")
    p.add_argument("--metrics-address", metavar="HOST:PORT",
                   help="serve Prometheus metrics over HTTP on this address")
    p.add_argument("--insecure", action="store_true",
                   help="plain HTTP to the registry even if it is not on localhost")
    p.add_argument("--mode", choices=MODES, default="auto",
                   help="kernel: the kernel mounts the bootstrap as EROFS and the daemon "
                   "serves only blob data (Linux >= 6.12, root); fuse: the daemon serves "
                   "everything; auto (default): kernel when this host supports it, else fuse")
    p.add_argument("--creds", metavar="USER:PASS",
                   help="registry credentials (default: REGISTRY_AUTH_FILE or "
                   "~/.docker/config.json)")
    add_hosts_dir_argument(p)
    p.set_defaults(func=_cmd_mount)

    p = subparsers.add_parser("umount", help="unmount a rafs mount and stop its daemon")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("-z", "--lazy", action="store_true",
                   help="detach even if busy; the daemon serves the files still open "
                   "and exits after the last one is closed")
    p.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS")
    p.set_defaults(func=_cmd_umount)

    p = subparsers.add_parser("stats", help="print the counters of a rafs mount as JSON")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("--prometheus", action="store_true", help="Prometheus text format")
    p.set_defaults(func=_cmd_stats)

    p = subparsers.add_parser(
        "trace", help="print the files a mount has served, in first-access order",
        description="Print every file opened (or symlink read) through MOUNTPOINT since it "
        "was mounted, once, in the order of first access: a prefetch list for "
        "`rafs convert --prefetch-list`.",
    )
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.set_defaults(func=_cmd_trace)


def add_hosts_dir_argument(p: argparse.ArgumentParser) -> None:
    """``--hosts-dir``: registry mirrors, containerd's hosts.toml layout (``rafs.hosts``)."""
    p.add_argument("--hosts-dir", metavar="DIR",
                   help="registry mirrors and TLS settings in containerd's layout "
                   "(DIR/HOST[:PORT]/hosts.toml; default $" + HOSTS_DIR_ENV + " or "
                   + DEFAULT_HOSTS_DIR + ")")


# -- mount --------------------------------------------------------------------


def _absolute_ref(image: str) -> str:
    """The image reference with its path made absolute (the daemon runs in /)."""
    ref = parse_image_ref(image)
    if ref.transport in ("oci", "docker-archive"):
        path = os.path.abspath(ref.path)
        if ":" in path:
            raise MountError(f"image path {path} contains ':', which references cannot carry")
        return f"{ref.transport}:{path}" + (f":{ref.tag}" if ref.tag else "")
    return image


def _log_level() -> str:
    return logging.getLevelName(min(logging.getLogger().getEffectiveLevel(), logging.INFO))


def _size(text: str) -> int:
    try:
        return sizes.parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _cmd_mount(args: argparse.Namespace) -> int:
    image = _absolute_ref(args.image)
    # -- the cache (fused.cacheconf): a bad SIZE or config file is one line, here --
    config = load_config().with_flags(args.cache_max, args.cache_min_free)
    cache_dir = os.path.abspath(args.cache_dir) if args.cache_dir else str(config.dir)
    if args.fetch_timeout <= 0 or args.retries < 0:
        raise MountError("--fetch-timeout must be positive and --retries not negative")
    options = MountOptions(prefetch=args.prefetch, amplify_bytes=args.amplify_bytes,
                           fetch_timeout=args.fetch_timeout, retries=args.retries,
                           metrics_address=args.metrics_address,
                           insecure=True if args.insecure else None, creds=parse_creds(args.creds),
                           mode=args.mode, cache_max=args.cache_max,
                           cache_min_free=args.cache_min_free,
                           hosts_dir=use_hosts_dir(args.hosts_dir) if args.hosts_dir else None)
    if args.foreground:
        from .daemon import run

        _check_hosts(image, options)

        if options.mode == "kernel":
            resolve_mode("kernel")

        def ready(error: str | None) -> None:
            if error is None:
                log.info("mounted %s on %s", image, canonical(args.mountpoint))

        run(options.daemon_config(image, args.mountpoint, cache_dir), ready)
        return 0
    pid = mount_background(image, args.mountpoint, cache_dir, timeout=args.timeout,
                           options=options)
    log.info("mounted %s on %s (daemon pid %d)", image, canonical(args.mountpoint), pid)
    return 0


@dataclass(frozen=True)
class MountOptions:
    """What ``rafs mount`` passes on to the daemon."""

    prefetch: bool = True
    amplify_bytes: int = DEFAULT_AMPLIFY
    fetch_timeout: float = DEFAULT_FETCH_TIMEOUT
    retries: int = DEFAULT_RETRIES
    metrics_address: str | None = None
    insecure: bool | None = None
    creds: tuple[str, str] | None = None
    mode: str = "auto"  # auto | fuse | kernel
    cache_max: str | None = None  # over the host config (fused.cacheconf)
    cache_min_free: str | None = None
    hosts_dir: str | None = None  # None: rafs.hosts' default ($RAFS_HOSTS_DIR, certs.d)

    def daemon_args(self) -> list[str]:
        args = ["--amplify-bytes", str(self.amplify_bytes), "--mode", self.mode,
                "--fetch-timeout", str(self.fetch_timeout), "--retries", str(self.retries)]
        if self.cache_max is not None:
            args += ["--cache-max", self.cache_max]
        if self.cache_min_free is not None:
            args += ["--cache-min-free", self.cache_min_free]
        if not self.prefetch:
            args.append("--no-prefetch")
        if self.metrics_address:
            args += ["--metrics-address", self.metrics_address]
        if self.insecure:
            args.append("--insecure")
        if self.hosts_dir:
            args += ["--hosts-dir", self.hosts_dir]
        return args

    def daemon_config(self, image: str, mountpoint: str, cache_dir: str) -> DaemonConfig:
        from .daemon import DaemonConfig

        return DaemonConfig(image, mountpoint, cache_dir, prefetch=self.prefetch,
                            amplify_bytes=self.amplify_bytes,
                            fetch_timeout=self.fetch_timeout, retries=self.retries,
                            metrics_address=self.metrics_address, mode=self.mode,
                            cache_max=self.cache_max, cache_min_free=self.cache_min_free,
                            backend=BackendOptions(insecure=self.insecure, creds=self.creds,
                                                   timeout=self.fetch_timeout,
                                                   hosts_dir=self.hosts_dir))


def _check_hosts(image: str, options: MountOptions) -> None:
    """A registry image's hosts.toml is read here first, so that a bad one is one
    error line (naming the file) before any daemon starts."""
    ref = parse_image_ref(image)
    if ref.transport == "docker":
        load_hosts(ref.registry, options.hosts_dir, insecure=options.insecure)


def mount_background(
    image: str, mountpoint: str, cache_dir: str | None = None, *,
    timeout: float = DEFAULT_TIMEOUT, prefetch: bool = True,
    options: MountOptions | None = None,
) -> int:
    """Start a detached daemon and return its pid once the mount is ready.

    ``cache_dir`` None: the host's cache (``fused.cacheconf.default_cache_dir``)."""
    if options is None:
        options = MountOptions(prefetch=prefetch)
    # The daemon parses these too; a bad one is one line here, before anything starts.
    config = load_config().with_flags(options.cache_max, options.cache_min_free)
    cache_dir = os.path.abspath(cache_dir) if cache_dir else str(config.dir)
    if options.mode == "kernel":
        resolve_mode("kernel")  # fail here, at once, with the reason (the daemon checks too)
    _check_hosts(image, options)
    mp = canonical(mountpoint)
    paths = paths_for(mp)
    ensure_run_dir()
    entry = find_mount(mp)
    if entry is not None and entry.is_rafs:
        raise MountError(f"{mp} is already a rafs mount (`rafs umount` it first)")
    os.makedirs(cache_dir, mode=0o700, exist_ok=True)
    env = dict(os.environ)
    pkg_root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [pkg_root, env.get("PYTHONPATH")]))
    if options.creds is not None:  # the environment, unlike argv, is private to root
        env[CREDS_ENV] = ":".join(options.creds)
    read_fd, write_fd = os.pipe()
    try:
        with open(paths.log, "ab") as logf:
            proc = subprocess.Popen(
                [sys.executable, "-m", "fused.daemon", image, mp, "--cache-dir", cache_dir,
                 "--ready-fd", str(write_fd), "--log-level", _log_level(),
                 *options.daemon_args()],
                stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, pass_fds=(write_fd,),
                start_new_session=True, cwd="/", env=env,
            )
    except OSError as e:
        os.close(read_fd)
        raise MountError(f"cannot start the daemon: {e.strerror}") from None
    finally:
        os.close(write_fd)
    try:
        line = _read_ready(read_fd, timeout)
    finally:
        os.close(read_fd)
    if line.startswith("OK"):
        return proc.pid
    # Not ready: make sure the daemon is gone and nothing stays mounted.
    if line.startswith("ERR "):
        message = line[4:]
        _wait_or_kill(proc, 30)
    else:
        _wait_or_kill(proc, 0 if line == "TIMEOUT" else 5)
        message = (f"the daemon did not get ready within {timeout:g}s" if line == "TIMEOUT"
                   else _last_log_line(paths.log) or f"the daemon exited with {proc.returncode}")
    try:
        _fallback_unmount(mp, lazy=True)
    except MountError as e:
        log.warning("could not clean up the mount on %s: %s", mp, e)
    raise MountError(f"mounting {image} on {mp} failed: {message} (log: {paths.log})")


def _read_ready(fd: int, timeout: float) -> str:
    """The daemon's readiness line, "" on EOF, or "TIMEOUT"."""
    deadline = time.monotonic() + timeout
    buf = b""
    while not buf.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0:
            return "TIMEOUT"
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        piece = os.read(fd, 4096)
        if not piece:
            break
        buf += piece
    return buf.decode("utf-8", "replace").strip()


def _wait_or_kill(proc: subprocess.Popen[bytes], grace: float) -> None:
    try:
        proc.wait(timeout=grace)
        return
    except subprocess.TimeoutExpired:
        pass
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _last_log_line(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return lines[-1] if lines else ""


# -- umount -------------------------------------------------------------------


def _rafs_mount(mountpoint: str) -> str:
    mp = canonical(mountpoint)
    entry = find_mount(mp)
    if entry is None or not entry.is_rafs:
        raise NotMountedError(f"{mp} is not a rafs mount")
    return mp


def umount(mountpoint: str, *, lazy: bool = False, timeout: float = 30.0) -> None:
    """Unmount a rafs mount and wait for its daemon to exit."""
    mp = _rafs_mount(mountpoint)
    paths = paths_for(mp)
    try:
        reply = request(paths.socket, {"cmd": "shutdown", "lazy": lazy}, timeout=timeout + 60)
    except (ConnectionRefusedError, FileNotFoundError):
        log.warning("no daemon answers for %s; unmounting it myself", mp)
        _fallback_unmount(mp, lazy)
        paths.state.unlink(missing_ok=True)
        paths.socket.unlink(missing_ok=True)  # nobody listens: a crashed daemon's
        return
    if not reply.get("ok"):
        raise MountError(f"cannot unmount {mp}: {reply.get('error', 'unknown error')}")
    pid = reply.get("pid")
    if reply.get("detached"):
        log.info("%s detached; daemon %s exits once its open files are closed", mp, pid)
        return
    if isinstance(pid, int):
        _wait_exit(pid, timeout)
    if (entry := find_mount(mp)) is not None and entry.is_rafs:
        raise MountError(f"{mp} is still mounted after the daemon stopped")


def _fallback_unmount(mp: str, lazy: bool) -> None:
    """Unmount without the daemon (both mounts in kernel mode): plainly, else lazily."""
    if not lazy:
        try:
            fusermount_unmount(mp)
            return
        except MountError as e:
            log.warning("unmounting %s: %s; detaching lazily", mp, e)
    if (entry := find_mount(mp)) is not None and entry.is_rafs:
        fusermount_unmount(mp, lazy=True)
    else:  # the user-visible mount is gone; a blob mount may be left
        blobs = paths_for(mp).blobs
        if (b := find_mount(blobs)) is not None and b.fstype == BLOB_FSTYPE:
            fusermount_unmount(blobs, lazy=True)
        with contextlib.suppress(OSError):
            blobs.rmdir()


def _wait_exit(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        except PermissionError:
            pass
        if _is_zombie(pid):
            return
        time.sleep(0.05)
    log.warning("daemon %d did not exit within %gs; killing it", pid, timeout)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[0] == "Z"


# -- stats ----------------------------------------------------------------------


def stats(mountpoint: str) -> dict[str, Any]:
    """The daemon's stats reply for a rafs mount."""
    mp = _rafs_mount(mountpoint)
    try:
        reply = request(paths_for(mp).socket, {"cmd": "stats"})
    except (ConnectionRefusedError, FileNotFoundError):
        raise ControlError(f"no daemon answers for {mp}") from None
    if not reply.get("ok"):
        raise ControlError(f"stats of {mp}: {reply.get('error', 'unknown error')}")
    return reply


def _cmd_umount(args: argparse.Namespace) -> int:
    umount(args.mountpoint, lazy=args.lazy, timeout=args.timeout)
    return 0


def _cmd_stats(args: argparse.Namespace) -> int:
    if args.prometheus:
        mp = _rafs_mount(args.mountpoint)
        try:
            reply = request(paths_for(mp).socket, {"cmd": "metrics"})
        except (ConnectionRefusedError, FileNotFoundError):
            raise ControlError(f"no daemon answers for {mp}") from None
        sys.stdout.write(str(reply.get("text", "")))
        return 0
    print(json.dumps(stats(args.mountpoint), indent=2, sort_keys=True))
    return 0


def trace(mountpoint: str) -> list[str]:
    """The paths a mount has served, in first-access order."""
    mp = _rafs_mount(mountpoint)
    try:
        reply = request(paths_for(mp).socket, {"cmd": "trace"}, timeout=120)
    except (ConnectionRefusedError, FileNotFoundError):
        raise ControlError(f"no daemon answers for {mp}") from None
    if not reply.get("ok"):
        raise ControlError(f"trace of {mp}: {reply.get('error', 'unknown error')}")
    if reply.get("truncated"):
        log.warning("the trace of %s is truncated: the daemon keeps the first %d files",
                    mp, len(reply["paths"]))
    return list(reply["paths"])


def _cmd_trace(args: argparse.Namespace) -> int:
    out = sys.stdout.buffer
    for path in trace(args.mountpoint):
        out.write(os.fsencode(path) + b"\n")
    out.flush()
    return 0
