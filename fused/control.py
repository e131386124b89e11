"""The control socket: how the CLI finds and talks to the daemon of a mount point.

Location: every mount point has a key, the first 16 hex digits of the sha256
of its canonical path. The daemon of mount point M keeps in the run directory

    <run>/<key>.sock   the control socket (mode 0600)
    <run>/<key>.json   state: pid, mount point, image, cache dir, log path
    <run>/<key>.log    the daemon's stdout and stderr (background mounts)
    <run>/<key>.blobs  kernel mode: where the blob filesystem is mounted

where <run> is ``$RAFS_RUN_DIR`` if set, else ``/run/rafs`` for root, else
``$XDG_RUNTIME_DIR/rafs``, else ``/tmp/rafs-<uid>``.

Protocol: the client sends one JSON object on one line, ``{"cmd": NAME}``, and
reads one JSON object on one line back: ``{"ok": true, ...}`` or
``{"ok": false, "error": "one line"}``. Commands: ``stats`` (counters as
JSON), ``metrics`` (Prometheus text in ``"text"``), ``shutdown`` (unmount and
exit; refused while the mount is busy). The daemon's side is
``fused.control_server``; this module stays free of trio so the CLI starts fast.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


from .errors import ControlError, MountError
from .mounts import canonical

__all__ = ["ControlPaths", "Handler", "paths_for", "request", "run_dir"]

log = logging.getLogger(__name__)

MAX_MESSAGE = 1 << 20
SUN_PATH_MAX = 107


Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


def run_dir() -> Path:
    env = os.environ.get("RAFS_RUN_DIR")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/run/rafs")
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / "rafs"
    return Path(f"/tmp/rafs-{os.getuid()}")


@dataclass(frozen=True, slots=True)
class ControlPaths:
    mountpoint: str
    socket: Path
    state: Path
    log: Path
    blobs: Path


def paths_for(mountpoint: str | os.PathLike[str]) -> ControlPaths:
    mp = canonical(mountpoint)
    key = hashlib.sha256(mp.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    base = run_dir()
    return ControlPaths(mp, base / f"{key}.sock", base / f"{key}.json", base / f"{key}.log",
                        base / f"{key}.blobs")


def ensure_run_dir() -> Path:
    base = run_dir()
    try:
        base.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise MountError(f"cannot create run directory {base}: {e.strerror}") from None
    return base


# -- client -----------------------------------------------------------------


def request(sock_path: Path, message: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
    """Send one request and return the reply; ControlError if nobody answers properly.

    ``ConnectionRefusedError``/``FileNotFoundError`` are raised as they are, so
    callers can tell a dead daemon from a misbehaving one.
    """
    if len(str(sock_path)) > SUN_PATH_MAX:
        raise ControlError(f"control socket path is too long: {sock_path}")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as s:
        s.settimeout(timeout)
        s.connect(str(sock_path))
        try:
            s.sendall(json.dumps(message).encode() + b"\n")
            buf = bytearray()
            while not buf.endswith(b"\n"):
                piece = s.recv(65536)
                if not piece:
                    break
                buf += piece
                if len(buf) > MAX_MESSAGE:
                    raise ControlError("control reply too large")
        except TimeoutError:
            raise ControlError(f"the daemon did not answer within {timeout:g}s") from None
        except OSError as e:
            raise ControlError(f"control socket {sock_path}: {e.strerror}") from None
    try:
        reply = json.loads(buf)
    except ValueError:
        raise ControlError("the daemon sent a malformed reply") from None
    if not isinstance(reply, dict):
        raise ControlError("the daemon sent a malformed reply")
    return reply


def daemon_alive(sock_path: Path) -> bool:
    """Whether a daemon answers on ``sock_path``."""
    try:
        request(sock_path, {"cmd": "ping"}, timeout=5)
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except (ControlError, OSError):
        return True  # something is there, but unwell: do not trample it
    return True
