"""``rafs snapshotter``: run the containerd proxy snapshotter in the foreground.

containerd is pointed at it with::

    [proxy_plugins.rafs]
      type = "snapshot"
      address = "/run/rafs/snapshotter.sock"

With ``--cri-image-service SOCK`` it also serves CRI's image service on SOCK for
the kubelet (``--image-service-endpoint``), passed on to containerd's CRI
plugin, so that pull credentials reach the snapshotter (``snapshotter.imageproxy``).

The process serves until SIGTERM/SIGINT; the fused daemons it started keep
running (and keep serving running containers) after it exits, and a new
snapshotter on the same root picks up its metadata and mounts: at startup it
adopts the mounts of its bootstrap snapshots whose daemons serve and tears
down every other rafs mount under its root. A second snapshotter on the same
root or address is refused while the first one lives.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sqlite3

from fused.options import DEFAULT_SUPERVISE

from .errors import SnapshotterError

__all__ = ["register"]

log = logging.getLogger(__name__)

DEFAULT_ADDRESS = "/run/rafs/snapshotter.sock"
DEFAULT_ROOT = "/var/lib/rafs/snapshotter"
DEFAULT_CRI_RUNTIME = "/run/containerd/containerd.sock"


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "snapshotter", help="run the containerd proxy snapshotter",
        description="Serve containerd's snapshots API on a unix socket. Layers of RAFS "
        "images (pulled with `ctr-remote image rpull --snapshotter rafs`, or by CRI) are "
        "mounted lazily through fused; other layers are handled like containerd's "
        "overlayfs snapshotter.",
    )
    p.add_argument("--address", default=DEFAULT_ADDRESS,
                   help=f"unix socket to listen on (default {DEFAULT_ADDRESS})")
    p.add_argument("--root", default=DEFAULT_ROOT,
                   help=f"snapshots and metadata (default {DEFAULT_ROOT})")
    p.add_argument("--cache-dir", help="fused chunk cache (default: the host's, as for "
                   "`rafs mount`)")
    p.add_argument("--insecure", action="store_true",
                   help="plain HTTP to every registry (localhost always uses it)")
    p.add_argument("--hosts-dir", metavar="DIR",
                   help="registry mirrors, containerd's layout (DIR/HOST[:PORT]/hosts.toml; "
                   "default $RAFS_HOSTS_DIR or /etc/containerd/certs.d): use containerd's "
                   "own config_path")
    p.add_argument("--no-prefetch", action="store_true",
                   help="mount RAFS images without background prefetch")
    p.add_argument("--mode", choices=("auto", "fuse", "kernel"), default="auto",
                   help="how RAFS images are mounted, as for `rafs mount` (default auto: "
                   "the kernel mounts the bootstrap as EROFS where it can)")
    p.add_argument("--supervise", action=argparse.BooleanOptionalAction,
                   default=DEFAULT_SUPERVISE,
                   help="serve each RAFS layer's mount through a supervisor that replaces a "
                   "daemon that dies without unmounting (default: "
                   f"{'on' if DEFAULT_SUPERVISE else 'off'})")
    p.add_argument("--cri-image-service", metavar="SOCK",
                   help="also serve CRI's image service on SOCK, passed on to containerd's "
                   "CRI plugin, and keep the pull credentials the kubelet sends (point the "
                   "kubelet's --image-service-endpoint here)")
    p.add_argument("--cri-runtime-endpoint", metavar="SOCK", default=DEFAULT_CRI_RUNTIME,
                   help=f"containerd's CRI socket (default {DEFAULT_CRI_RUNTIME})")
    p.set_defaults(func=_cmd_snapshotter)


def _cmd_snapshotter(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fused.cacheconf import default_cache_dir
    from fused.options import MountOptions
    from rafs.hosts import use_hosts_dir

    from .keychain import Keychain
    from .remote import FusedRemote
    from .service import claim, serve
    from .snapshots import ROLE_BOOTSTRAP, Snapshotter

    root = Path(args.root)
    claimed = claim(root, Path(args.address))
    try:
        hosts_dir = use_hosts_dir(args.hosts_dir) if args.hosts_dir else None
        options = MountOptions(str(args.cache_dir or default_cache_dir()),
                               prefetch=not args.no_prefetch, insecure=args.insecure or None,
                               mode=args.mode, hosts_dir=hosts_dir, supervise=args.supervise)
        keychain = Keychain()
        remote = FusedRemote(options, keychain=keychain)
        try:
            snapshotter = Snapshotter(root, remote)
        except (OSError, sqlite3.Error) as e:
            raise SnapshotterError(f"cannot use root {root}: {_reason(e)}") from None
        keep = {snapshotter.fs_dir(s) for s in snapshotter.walk()
                if s.remote is not None and s.remote.get("role") == ROLE_BOOTSTRAP}
        remote.reconcile(snapshotter.root / "snapshots", keep)
        with contextlib.ExitStack() as stack:
            if args.cri_image_service:
                from .imageproxy import ImageProxy

                proxy = ImageProxy(args.cri_image_service, args.cri_runtime_endpoint, keychain)
                proxy.start()
                stack.callback(proxy.stop)
            serve(snapshotter, claimed)
    finally:
        claimed.release()
    return 0


def _reason(e: Exception) -> str:
    return e.strerror if isinstance(e, OSError) and e.strerror else str(e)
