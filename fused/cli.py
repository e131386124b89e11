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

``rafs mount --supervise`` starts ``fused.supervisor`` instead (failover, and
``rafs upgrade``). When the node service (``rafs daemon``, ``fused.node``)
answers, the daemon or supervisor is forked by it instead of spawned.
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

from rafs.credentials import parse_creds
from rafs.hosts import DEFAULT_HOSTS_DIR, HOSTS_DIR_ENV, load_hosts, use_hosts_dir
from rafs.oci import parse_image_ref


from . import node
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
    p.add_argument("--cache-dir", required=True, metavar="DIR",
                   help="chunk cache, shared by every mount on the host")
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
    # -- supervised mounts (fused.supervisor): failover and hot upgrade
    p.add_argument("--supervise", action="store_true",
                   help="serve through a supervisor that replaces a daemon that dies without "
                   "unmounting (readers see a delay, not an error) and allows `rafs upgrade`")
    p.add_argument("--max-crashes", type=int, default=5, metavar="N",
                   help="supervised: give the mount up after N crashes within "
                   "--crash-window (default %(default)s)")
    p.add_argument("--crash-window", type=float, default=60.0, metavar="SECONDS",
                   help="supervised: see --max-crashes (default %(default)s)")
    p.add_argument("--no-resend", action="store_true", help=argparse.SUPPRESS)  # old kernels
    p.set_defaults(func=_cmd_mount)

    p = subparsers.add_parser(
        "upgrade", help="hand a supervised mount to a new daemon without unmounting",
        description="Start a new daemon (the code installed now, from a fresh interpreter) on "
        "the running mount; the old one finishes the requests it has and exits. Readers keep "
        "reading. Needs a mount made with `rafs mount --supervise`.",
    )
    p.add_argument("mountpoint", metavar="MOUNTPOINT", nargs="?")
    p.add_argument("--all", action="store_true", help="every supervised mount of this run "
                   "directory")
    p.set_defaults(func=_cmd_upgrade)

    p = subparsers.add_parser(
        "daemon", help="the node service: start every mount from a process that has "
        "imported everything once",
        description="Serve mount requests on <run dir>/node.sock until SIGTERM. `rafs mount` "
        "and the snapshotter use it when it runs (a mount then starts without a new "
        "interpreter) and work without it. Its mounts outlive it.",
    )
    p.add_argument("--socket", type=Path, metavar="PATH", help="default: <run dir>/node.sock")
    p.set_defaults(func=_cmd_daemon)

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
    units = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    try:
        n = int(t[:-1]) * units[t[-1]] if t and t[-1] in units else int(t)
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"bad size {text!r} (say 512K, 1M, 4194304)") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"bad size {text!r}")
    return n


def _cmd_mount(args: argparse.Namespace) -> int:
    image = _absolute_ref(args.image)
    cache_dir = os.path.abspath(args.cache_dir)
    if args.fetch_timeout <= 0 or args.retries < 0:
        raise MountError("--fetch-timeout must be positive and --retries not negative")
    options = MountOptions(prefetch=args.prefetch, amplify_bytes=args.amplify_bytes,
                           fetch_timeout=args.fetch_timeout, retries=args.retries,
                           metrics_address=args.metrics_address,
                           insecure=True if args.insecure else None, creds=parse_creds(args.creds),
                           mode=args.mode,
                           hosts_dir=use_hosts_dir(args.hosts_dir) if args.hosts_dir else None,
                           supervise=args.supervise, supervisor_args=_supervisor_args(args))
    if args.foreground and options.supervise:
        from .supervisor import main as supervisor_main

        _check_hosts(image, options)

        return supervisor_main([image, args.mountpoint, "--cache-dir", cache_dir,
                                "--log-level", _log_level(), *options.supervisor_args,
                                *options.daemon_args()])
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
    hosts_dir: str | None = None  # None: rafs.hosts' default ($RAFS_HOSTS_DIR, certs.d)
    supervise: bool = False  # python -m fused.supervisor instead of fused.daemon
    supervisor_args: tuple[str, ...] = ()

    def daemon_args(self) -> list[str]:
        args = ["--amplify-bytes", str(self.amplify_bytes), "--mode", self.mode,
                "--fetch-timeout", str(self.fetch_timeout), "--retries", str(self.retries)]
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
    image: str, mountpoint: str, cache_dir: str, *, timeout: float = DEFAULT_TIMEOUT,
    prefetch: bool = True, options: MountOptions | None = None,
) -> int:
    """Start a detached daemon and return its pid once the mount is ready."""
    if options is None:
        options = MountOptions(prefetch=prefetch)
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
    module = "fused.supervisor" if options.supervise else "fused.daemon"
    extra = list(options.supervisor_args) if options.supervise else []
    argv = [image, mp, "--cache-dir", cache_dir, "--log-level", _log_level(), *extra,
            *options.daemon_args()]
    proc: subprocess.Popen[bytes] | _NodeChild
    try:
        with open(paths.log, "ab") as logf:
            # A running node service (`rafs daemon`) forks the daemon with everything
            # imported; without one, start a fresh interpreter.
            node_env = {k: env[k] for k in (CREDS_ENV, "RAFS_RUN_DIR", HOSTS_DIR_ENV,
                                             "REGISTRY_AUTH_FILE", "DOCKER_CONFIG", "HOME")
                        if k in env}
            child = node.request_mount(module, argv, node_env, write_fd, logf.fileno())
            if child is not None:
                proc = _NodeChild(child)
            else:
                proc = subprocess.Popen(
                    [sys.executable, "-m", module, *argv, "--ready-fd", str(write_fd)],
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


class _NodeChild:
    """A daemon the node service forked: not our child, so waited for by its pid."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not _is_zombie(self.pid):
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired("node child", timeout or 0)
            time.sleep(0.02)
        self.returncode = 0
        return 0


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


def _wait_or_kill(proc: subprocess.Popen[bytes] | _NodeChild, grace: float) -> None:
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


# -- upgrade (supervised mounts) ------------------------------------------------


def _supervisor_args(args: argparse.Namespace) -> tuple[str, ...]:
    out = ("--max-crashes", str(args.max_crashes), "--crash-window", str(args.crash_window))
    return (*out, "--no-resend") if args.no_resend else out


def upgrade(mountpoint: str, timeout: float = 300.0) -> dict[str, Any]:
    """Hand a supervised mount to a new daemon; the reply has the new worker's pid and version."""
    mp = _rafs_mount(mountpoint)
    try:
        reply = request(paths_for(mp).socket, {"cmd": "upgrade"}, timeout=timeout)
    except (ConnectionRefusedError, FileNotFoundError):
        raise ControlError(f"no daemon answers for {mp}") from None
    if not reply.get("ok"):
        error = reply.get("error", "unknown error")
        if error == "bad request":
            error = "its daemon is not supervised (mount it with `rafs mount --supervise`)"
        raise ControlError(f"cannot upgrade {mp}: {error}")
    return reply


def _supervised_mounts() -> list[str]:
    from .control import run_dir

    found = []
    for state in sorted(run_dir().glob("*.json")):
        try:
            info = json.loads(state.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(info, dict) and info.get("supervised") and info.get("mountpoint"):
            found.append(str(info["mountpoint"]))
    return found


def _cmd_upgrade(args: argparse.Namespace) -> int:
    if args.all == (args.mountpoint is not None):
        raise MountError("name a MOUNTPOINT or --all")
    targets = _supervised_mounts() if args.all else [args.mountpoint]
    failed = 0
    for mp in targets:
        try:
            reply = upgrade(mp)
        except ControlError as e:
            if not args.all:
                raise
            log.error("%s", e)
            failed += 1
            continue
        print(f"{canonical(mp)}: worker {reply.get('worker_pid')} version {reply.get('version')}")
    return 1 if failed else 0


def _cmd_daemon(args: argparse.Namespace) -> int:
    return node.serve(args.socket or node.node_socket())
