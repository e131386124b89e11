"""``rafs mount``, ``rafs umount``, ``rafs ls``, ``rafs stats``, ``rafs trace``,
``rafs upgrade`` and ``rafs daemon`` (the node service, ``fused.node``).

Argument parsing and printing only: every command is one call into
``fused.client``, the API the runtime and the snapshotter use too.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import rafs
from rafs import sizes
from rafs.credentials import parse_creds
from rafs.hosts import DEFAULT_HOSTS_DIR, HOSTS_DIR_ENV, use_hosts_dir
from rafs.output import add_json_flag, print_json
from rafs.transports import MOUNT_IMAGE

from . import client
from .errors import MountError
from .options import (
    DEFAULT_AMPLIFY,
    DEFAULT_FETCH_TIMEOUT,
    DEFAULT_RETRIES,
    DEFAULT_STANDBY,
    DEFAULT_SUPERVISE,
    MODES,
    MountOptions,
)

__all__ = ["add_hosts_dir_argument", "register"]

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "mount", help="mount a RAFS image with a lazy-loading daemon",
        description=f"Mount IMAGE ({MOUNT_IMAGE.syntax}) read-only on MOUNTPOINT. Returns "
        "once the mount is ready; the daemon keeps running until `rafs umount`.",
    )
    MOUNT_IMAGE.add_argument(p, "image", help="a RAFS image")
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
    p.add_argument("--timeout", type=float, default=client.DEFAULT_TIMEOUT, metavar="SECONDS",
                   help="how long to wait for the mount to become ready (default %(default)s)")
    p.add_argument("--prefetch", action=argparse.BooleanOptionalAction, default=True,
                   help="fetch the files of the image's prefetch list in the background, "
                   "below on-demand reads (default: on)")
    p.add_argument("--amplify-bytes", type=sizes.size_arg, default=DEFAULT_AMPLIFY, metavar="BYTES",
                   help="the most an on-demand fetch holds with its read-ahead (within "
                   "the file being read, small files of its directory; in images laid out "
                   "by access, the chunks that follow), compressed (default 1M; 0: fetch "
                   "only what is read)")
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
    add_supervise_arguments(p)
    p.set_defaults(func=_cmd_mount)

    p = subparsers.add_parser(
        "upgrade", help="hand a supervised mount to a new daemon without unmounting",
        description="Start a new worker (the code installed now, from a fresh interpreter) "
        "on the running mount; the old one finishes the requests it has and exits. Readers "
        "keep reading. Prints the new worker's pid and version.",
    )
    p.add_argument("mountpoint", metavar="MOUNTPOINT", nargs="?")
    p.add_argument("-a", "--all", action="store_true",
                   help="every supervised mount of this run directory")
    p.set_defaults(func=_cmd_upgrade)

    p = subparsers.add_parser(
        "daemon", help="the node service: start every mount from a process that has "
        "imported everything once",
        description="Serve mount requests on <run dir>/node.sock until SIGTERM. `rafs mount`, "
        "`rafs run` and the snapshotter use it when it runs (a mount then starts without a "
        "new interpreter) and work without it. Its mounts outlive it.",
    )
    p.add_argument("--socket", metavar="PATH", help="default: <run dir>/node.sock")
    p.set_defaults(func=_cmd_daemon)

    p = subparsers.add_parser("umount", help="unmount a rafs mount and stop its daemon")
    p.add_argument("mountpoint", metavar="MOUNTPOINT", nargs="?")
    p.add_argument("-z", "--lazy", action="store_true",
                   help="detach even if busy; the daemon serves the files still open "
                   "and exits after the last one is closed")
    p.add_argument("-f", "--force", action="store_true",
                   help="for a daemon that does not answer: abort its FUSE connection "
                   "(readers get an error at once), detach the mounts, kill the daemon")
    p.add_argument("-a", "--all", action="store_true",
                   help="every mount of this run directory's daemons, and the leftovers "
                   "of dead ones")
    p.add_argument("--timeout", type=float, default=client.EXIT_TIMEOUT, metavar="SECONDS",
                   help="how long to wait for the daemon to unmount and exit; past it, "
                   "it is killed and its mounts undone, as with --force (default "
                   "%(default)g)")
    p.set_defaults(func=_cmd_umount)

    p = subparsers.add_parser(
        "ls", help="list the rafs mounts of this host",
        description="Every rafs mount in the kernel's mount table and every daemon in the "
        "run directory, whoever started it (rafs mount, rafs run, the snapshotter): mount "
        "point, state (serving, starting, stopping, recovering, unresponsive, dead, "
        "unknown), mode, daemon pid, cache use, version (marked * if it is not this "
        "rafs's), image.",
    )
    add_json_flag(p, "the mounts as one JSON array")
    p.set_defaults(func=_cmd_ls)

    p = subparsers.add_parser("stats", help="print the counters of a rafs mount as JSON")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("--prometheus", action="store_true", help="Prometheus text format")
    p.set_defaults(func=_cmd_stats)

    p = subparsers.add_parser(
        "trace", help="print the files a mount has served, in first-access order",
        description="Print every file opened (or symlink read) through MOUNTPOINT since it "
        "was mounted, once, in the order of first access: a prefetch list for "
        "`rafs convert --prefetch-list`. --ranges prints the byte ranges read instead "
        "(OFFSET LENGTH PATH per line), --json both as one JSON object.",
    )
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    form = p.add_mutually_exclusive_group()
    form.add_argument("--ranges", action="store_true",
                      help="the byte ranges read, in first-access order of their chunks")
    form.add_argument("--json", action="store_true",
                      help="paths and ranges as JSON (also a prefetch list)")
    p.set_defaults(func=_cmd_trace)


def add_hosts_dir_argument(p: argparse.ArgumentParser) -> None:
    """``--hosts-dir``: registry mirrors, containerd's hosts.toml layout (``rafs.hosts``)."""
    p.add_argument("--hosts-dir", metavar="DIR",
                   help="registry mirrors and TLS settings in containerd's layout "
                   "(DIR/HOST[:PORT]/hosts.toml; default $" + HOSTS_DIR_ENV + " or "
                   + DEFAULT_HOSTS_DIR + ")")


def add_supervise_arguments(p: argparse.ArgumentParser) -> None:
    """``--supervise``/``--no-supervise`` and the supervisor's knobs (``fused.supervisor``)."""
    p.add_argument("--supervise", action=argparse.BooleanOptionalAction,
                   default=DEFAULT_SUPERVISE,
                   help="serve through a supervisor that replaces a daemon that dies without "
                   "unmounting (readers see a delay, not an error) and allows `rafs upgrade` "
                   f"(default: {'on' if DEFAULT_SUPERVISE else 'off'}; off where the kernel "
                   "lacks FUSE_NOTIFY_RESEND or /dev/fuse is closed to this user; "
                   "--no-supervise: one plain daemon per mount, the least memory)")
    p.add_argument("--standby", action=argparse.BooleanOptionalAction,
                   default=DEFAULT_STANDBY,
                   help="supervised: keep a second daemon ready to take over at once "
                   f"(default: {'on' if DEFAULT_STANDBY else 'off'}; a failover without "
                   "one waits for a new daemon to start, readers see a longer delay)")
    p.add_argument("--max-crashes", type=int, default=5, metavar="N",
                   help="supervised: give the mount up after N crashes within "
                   "--crash-window (default %(default)s)")
    p.add_argument("--crash-window", type=float, default=60.0, metavar="SECONDS",
                   help="supervised: see --max-crashes (default %(default)s)")
    p.add_argument("--no-resend", dest="resend", action="store_false",
                   help=argparse.SUPPRESS)  # what a kernel without FUSE_NOTIFY_RESEND does


def supervise_options(args: argparse.Namespace) -> dict[str, object]:
    """The ``MountOptions`` fields of ``add_supervise_arguments``."""
    return {"supervise": args.supervise, "standby": args.standby,
            "max_crashes": args.max_crashes, "crash_window": args.crash_window,
            "resend": args.resend}


def _cmd_mount(args: argparse.Namespace) -> int:
    MOUNT_IMAGE.parse(args.image)  # a reference `rafs mount` cannot use: one line, first
    options = MountOptions(args.cache_dir, mode=args.mode, prefetch=args.prefetch,
                           amplify_bytes=args.amplify_bytes, fetch_timeout=args.fetch_timeout,
                           retries=args.retries, metrics_address=args.metrics_address,
                           insecure=True if args.insecure else None,
                           creds=parse_creds(args.creds), cache_max=args.cache_max,
                           cache_min_free=args.cache_min_free,
                           hosts_dir=use_hosts_dir(args.hosts_dir) if args.hosts_dir else None,
                           **supervise_options(args))  # type: ignore[arg-type]
    if args.foreground:
        client.serve_foreground(args.image, args.mountpoint, options, on_ready=lambda: log.info(
            "mounted %s on %s", args.image, os.path.abspath(args.mountpoint)))
        return 0
    info = client.mount(args.image, args.mountpoint, options, timeout=args.timeout)
    log.info("mounted %s on %s (daemon pid %s)", info.image, info.mountpoint, info.pid)
    return 0


def _cmd_umount(args: argparse.Namespace) -> int:
    if args.all == (args.mountpoint is not None):
        raise MountError("give either a MOUNTPOINT or --all")
    if args.all:
        failed = client.unmount_all(lazy=args.lazy, force=args.force)
        if failed:
            raise MountError(f"{len(failed)} mount(s) stay: {', '.join(failed)}")
        return 0
    client.unmount(args.mountpoint, lazy=args.lazy, force=args.force, timeout=args.timeout)
    return 0


def _cmd_upgrade(args: argparse.Namespace) -> int:
    if args.all == (args.mountpoint is not None):
        raise MountError("give a MOUNTPOINT or --all, not both")
    if args.mountpoint is not None:
        done, failed = [client.upgrade(args.mountpoint)], []
    else:
        done, failed = client.upgrade_all()
    for info in done:
        print(f"{info.mountpoint}: worker {info.pid}, version {info.version}")
    if failed:
        raise MountError(f"could not upgrade {', '.join(failed)}")
    return 0


def _cmd_daemon(args: argparse.Namespace) -> int:
    from pathlib import Path

    from . import node

    return node.serve(Path(args.socket) if args.socket else node.node_socket())


def _cmd_ls(args: argparse.Namespace) -> int:
    infos = client.list_mounts()
    if args.json:
        print_json([i.to_json() for i in infos])
        return 0
    ours = {rafs.version()}
    if any(i.version and "+" in i.version for i in infos):  # a supervised worker's
        from .supervisor import code_version  # the standard library only

        ours.add(code_version())
    rows = [("MOUNTPOINT", "STATE", "MODE", "PID", "SUPERVISOR", "CACHE", "VERSION", "IMAGE")]
    for i in infos:
        version = "-" if i.version is None else i.version + ("" if i.version in ours else "*")
        supervisor = str(i.owner_pid) if i.supervised and i.owner_pid else "-"
        rows.append((i.mountpoint + ("" if i.mounted or i.state == "unknown" else " (gone)"),
                     i.state, i.mode or "-", str(i.pid or "-"), supervisor,
                     _human(i.cache_bytes), version, i.image or "-"))
    widths = [max(len(r[k]) for r in rows) for k in range(len(rows[0]) - 1)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1])
    if any(r[6].endswith("*") for r in rows[1:]):
        print(f"* a daemon of another rafs than this one ({rafs.version()})")
    return 0


def _human(n: int | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "K", "M", "G"):
        if value < 1024 or unit == "G":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _cmd_stats(args: argparse.Namespace) -> int:
    if args.prometheus:
        sys.stdout.write(client.metrics(args.mountpoint))
        return 0
    print_json(client.stats(args.mountpoint))
    return 0


def _cmd_trace(args: argparse.Namespace) -> int:
    from rafs.prefetchlist import format_paths, format_ranges

    report = client.trace_report(args.mountpoint)
    if args.json:
        print_json(report)
        return 0
    out = sys.stdout.buffer
    if args.ranges:
        out.write(format_ranges([(os.fsencode(r["path"]), r["offset"], r["length"])
                                 for r in report.get("ranges", [])]))
    else:
        out.write(format_paths([os.fsencode(p) for p in report["paths"]]))
    out.flush()
    return 0
