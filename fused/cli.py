"""``rafs mount``, ``rafs umount`` and ``rafs stats``.

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
from pathlib import Path
from typing import Any

from rafs.oci import parse_image_ref

from .control import ensure_run_dir, paths_for, request
from .errors import ControlError, MountError, NotMountedError
from .mounts import canonical, find_mount, fusermount_unmount

__all__ = ["mount_background", "register", "stats", "umount"]

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
    p.add_argument("--no-prefetch", action="store_true",
                   help="do not fetch the image's prefetch list in the background")
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


def _cmd_mount(args: argparse.Namespace) -> int:
    image = _absolute_ref(args.image)
    cache_dir = os.path.abspath(args.cache_dir)
    if args.foreground:
        from .daemon import DaemonConfig, run

        def ready(error: str | None) -> None:
            if error is None:
                log.info("mounted %s on %s", image, canonical(args.mountpoint))

        run(DaemonConfig(image, args.mountpoint, cache_dir, prefetch=not args.no_prefetch), ready)
        return 0
    pid = mount_background(image, args.mountpoint, cache_dir, timeout=args.timeout,
                           prefetch=not args.no_prefetch)
    log.info("mounted %s on %s (daemon pid %d)", image, canonical(args.mountpoint), pid)
    return 0


def mount_background(
    image: str, mountpoint: str, cache_dir: str, *, timeout: float = DEFAULT_TIMEOUT,
    prefetch: bool = True,
) -> int:
    """Start a detached daemon and return its pid once the mount is ready."""
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
    read_fd, write_fd = os.pipe()
    try:
        with open(paths.log, "ab") as logf:
            proc = subprocess.Popen(
                [sys.executable, "-m", "fused.daemon", image, mp, "--cache-dir", cache_dir,
                 "--ready-fd", str(write_fd), "--log-level", _log_level(),
                 *([] if prefetch else ["--no-prefetch"])],
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
    entry = find_mount(mp)
    if entry is not None and entry.is_rafs:
        try:
            fusermount_unmount(mp, lazy=True)
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
        log.warning("no daemon answers for %s; unmounting with fusermount3", mp)
        _fallback_unmount(mp, lazy)
        paths.state.unlink(missing_ok=True)
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
    if not lazy:
        try:
            fusermount_unmount(mp)
            return
        except MountError as e:
            log.warning("fusermount3 -u %s: %s; detaching lazily", mp, e)
    fusermount_unmount(mp, lazy=True)


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
