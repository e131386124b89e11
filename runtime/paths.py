"""Where the runtime keeps things on the host.

Durable state lives under the runtime root: ``$RAFS_ROOT`` if set, else
``/var/lib/rafs`` for root, else ``$XDG_DATA_HOME/rafs`` (``~/.local/share/rafs``):

    <root>/containers/<id>/   one container: state.json, config.json (the bundle),
                              rootfs/ (the overlay mount point), upper/, work/,
                              hosts, hostname, resolv.conf
    <root>/rootfs/<digest>/   unpacked plain (non-RAFS) images, one per manifest digest
    <root>/cache/             the chunk cache of lazily mounted images, when $RAFS_ROOT
                              is set (else the host's: ``fused.cacheconf``)

What dies with a reboot lives in the run directory of ``fused.runstate.run_dir``
(``$RAFS_RUN_DIR``, ``/run/rafs``, ...):

    <run>/images/<digest>/mnt    the shared rafs mount of one image
    <run>/images/<digest>/users/ one file per container using it (see ``imagemount``)
    <run>/runc/                  runc's own state (``runc --root``)
"""

from __future__ import annotations

import os
from pathlib import Path

from fused.cacheconf import default_cache_dir
from fused.runstate import run_dir

__all__ = ["cache_dir", "containers_dir", "images_run_dir", "rootfs_cache_dir",
           "runc_root", "runtime_root"]


def runtime_root() -> Path:
    env = os.environ.get("RAFS_ROOT")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/lib/rafs")
    data = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return Path(data) / "rafs"


def containers_dir() -> Path:
    return runtime_root() / "containers"


def rootfs_cache_dir() -> Path:
    return runtime_root() / "rootfs"


def cache_dir() -> Path:
    """The host's chunk cache (``fused.cacheconf``: ``$RAFS_ROOT/cache`` when set)."""
    return default_cache_dir()


def images_run_dir() -> Path:
    return run_dir() / "images"


def runc_root() -> Path:
    return run_dir() / "runc"
