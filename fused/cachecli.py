"""``rafs cache status|prune|verify|clear``: see and manage the host's chunk cache.

Every subcommand takes ``--cache-dir`` (default: the host's cache,
``fused.cacheconf``) and is safe while daemons serve from the cache. Exit
statuses: 0 done; 1 an error (one ``rafs: error: ...`` line: an unknown image,
a cap in the host config that does not parse, an unusable cache directory); 2 a
bad command line (``prune --to lots``); 3 ``verify`` found bad data (and
dropped it: it will be fetched again). ``--json`` output is
``rafs.output.print_json``'s.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from rafs import sizes
from rafs.output import add_json_flag, print_json

from .cacheconf import CacheConfig, load_config
from .errors import CacheError

__all__ = ["EXIT_BAD_DATA", "register"]

EXIT_BAD_DATA = 3


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "cache", help="show and manage the host's chunk cache",
        description="The chunk cache every rafs mount on this host shares: its size, cap and "
        "images (status), eviction now (prune), a full re-hash (verify), emptying it (clear). "
        "Safe while mounts are serving.",
    )
    sub = p.add_subparsers(dest="cache_command", required=True, metavar="COMMAND")

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--cache-dir", metavar="DIR",
                       help="the cache (default: the host's, as for `rafs mount`)")

    q = sub.add_parser("status", help="size, cap, free space, chunks, hit ratio, images")
    common(q)
    add_json_flag(q)
    q.add_argument("--cache-max", metavar="SIZE", help="show the cap this would give")
    q.add_argument("--cache-min-free", metavar="SIZE")
    q.set_defaults(func=_cmd_status)

    q = sub.add_parser("prune", help="evict now: to the cap in force, to SIZE, or one image",
                       description="Evict least recently used chunks until the cache holds "
                       "at most --to SIZE (default: 90% of the cap in force, if it is over "
                       "it), or every chunk of --image REF; bootstraps and blob files nobody "
                       "uses go too. Chunks a mount still reads are fetched again.")
    common(q)
    q.add_argument("--to", metavar="SIZE", type=sizes.size_arg,
                   help="evict until the cache is at most this big (e.g. 10G)")
    q.add_argument("--image", metavar="REF", help="evict this image's chunks (a reference a "
                   "mount used, or a bootstrap or manifest digest)")
    q.add_argument("--cache-max", metavar="SIZE")
    q.add_argument("--cache-min-free", metavar="SIZE")
    q.set_defaults(func=_cmd_prune)

    q = sub.add_parser("verify", help="re-hash every cached chunk; drop bad ones (exit 3)")
    common(q)
    add_json_flag(q)
    q.set_defaults(func=_cmd_verify)

    q = sub.add_parser("clear", help="evict everything; remove every file nobody uses")
    common(q)
    q.set_defaults(func=_cmd_clear)


def _config(args: argparse.Namespace) -> tuple[Path, CacheConfig]:
    config = load_config().with_flags(getattr(args, "cache_max", None),
                                      getattr(args, "cache_min_free", None))
    root = Path(args.cache_dir).absolute() if args.cache_dir else config.dir
    if root.exists() and not root.is_dir():
        raise CacheError(f"cache directory {root} is not a directory")
    return root, config


def _mb(n: int | None) -> str:
    return "none" if n is None else f"{n / 1e6:,.1f} MB"


def _cmd_status(args: argparse.Namespace) -> int:
    from .cachecheck import status

    root, config = _config(args)
    if not root.exists():
        raise CacheError(f"no cache at {root}")
    s = status(root, config)
    if args.json:
        print_json(s)
        return 0
    ratio = "n/a" if s["hit_ratio"] is None else f"{s['hit_ratio'] * 100:.1f}%"
    lines = [
        f"cache      {s['dir']}" + (f"  (config {s['config']})" if s["config"] else ""),
        f"size       {_mb(s['size'])} on disk, {s['chunks']:,} chunks "
        f"({_mb(s['chunk_bytes'])}) in {s['blobs']} blobs",
        f"cap        {_mb(s['cap'])} (max {s['max'] or 'none'}, keep {s['min_free'] or 'none'}"
        f" free; evicts to {_mb(s['target'])})",
        f"disk       {_mb(s['fs_free'])} free of {_mb(s['fs_size'])}",
        f"hit ratio  {ratio} ({s['hits']:,} hits, {s['misses']:,} misses); dedup saved "
        f"{_mb(s['counters'].get('dedup_bytes', 0))}; evicted "
        f"{s['counters'].get('evicted_chunks', 0):,} chunks, refetched "
        f"{s['counters'].get('refetched', 0):,}",
        "images:",
    ]
    for im in s["images"]:
        lines.append(f"  {'in use' if im['in_use'] else 'unused'}  "
                     f"{_mb(im['present_bytes'])} of {_mb(im['bytes'])}  "
                     f"{im['ref'] or '(unknown reference)'}  {im['bootstrap'][:19]}")
    print("\n".join(lines))
    return 0


def _print_report(what: str, r: Any) -> None:
    print(f"{what}: {r.chunks:,} chunks, {r.bootstraps} bootstraps, {r.blobs} blob files; "
          f"{_mb(r.before)} -> {_mb(r.after)}")


def _cmd_prune(args: argparse.Namespace) -> int:
    from .cachecheck import prune, prune_image

    if args.to is not None and args.image is not None:
        raise CacheError("give --to or --image, not both")
    to = args.to
    root, config = _config(args)
    if not root.exists():
        raise CacheError(f"no cache at {root}")
    if args.image is not None:
        report, kept = prune_image(root, args.image)
        _print_report(f"pruned {args.image}", report)
        for digest in kept:
            print(f"kept bootstrap {digest}: in use by a mount")
        return 0
    _print_report("pruned", prune(root, config, to))
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from .cachecheck import verify

    root, _ = _config(args)
    if not root.exists():
        raise CacheError(f"no cache at {root}")
    r = verify(root)
    if args.json:
        print_json(r.to_json())
    else:
        print(f"verified {r.good:,} chunks: {r.bad} bad (dropped), {r.adopted} re-indexed, "
              f"{r.stale_rows} stale index rows, {r.orphan_bits} orphan blocks cleared, "
              f"{_mb(r.orphan_bytes)} orphan data punched, {r.bad_bootstraps} bad bootstraps")
        for line in r.problems:
            print(f"  {line}")
    if r.bad or r.bad_bootstraps:
        print(f"rafs: error: {r.bad} bad chunks and {r.bad_bootstraps} bad bootstraps in "
              f"{root} (dropped; they will be fetched again)", file=sys.stderr)
        return EXIT_BAD_DATA
    return 0


def _cmd_clear(args: argparse.Namespace) -> int:
    from .cachecheck import clear

    root, _ = _config(args)
    if not root.exists():
        print(f"no cache at {root}: nothing to clear")
        return 0
    _print_report("cleared", clear(root))
    return 0
