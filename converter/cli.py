"""The ``rafs convert`` subcommand: options, the prefetch list file, what is printed.

It prints ``DST@DIGEST`` (``--json``: ``describe_result``, also what
``rafs optimize --json`` prints). The transports SRC, DST and ``--chunk-dict``
take are ``rafs.transports``' table.
"""

from __future__ import annotations

import argparse
import logging
from typing import TYPE_CHECKING, Any

from rafs import sizes, transports
from rafs.codec import BOOTSTRAP_LEVEL, DEFAULT_LEVEL, STARTUP_LEVEL
from rafs.output import add_json_flag, print_json
from rafs.prefetchlist import Entry, PrefetchListError
from rafs.prefetchlist import parse as parse_prefetch_list

from .chunker import DEFAULT_CHUNK_SIZE
from .errors import OptionError

if TYPE_CHECKING:
    from .convert import ConvertResult

log = logging.getLogger(__name__)

def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "convert", help="convert an OCI image into a RAFS image",
        description=f"Convert SRC ({transports.CONVERT_SRC.syntax}) into a RAFS image "
                    f"written to DST ({transports.CONVERT_DST.syntax}; the tag defaults to "
                    "latest in a layout; a registry is checked for push access first). "
                    "Prints DST@DIGEST.")
    transports.CONVERT_SRC.add_argument(p, "src")
    transports.CONVERT_DST.add_argument(p, "dst")
    p.add_argument("--chunk-size", type=sizes.size_arg, default=DEFAULT_CHUNK_SIZE,
                   help="chunk size, a power of two from 4K to 16M (default 1M)")
    p.add_argument("--compression", choices=("zstd", "none"), default="zstd",
                   help="chunk compression (default zstd; a chunk is stored raw when "
                        "compression does not make it smaller)")
    p.add_argument("--level", type=int, default=DEFAULT_LEVEL,
                   help=f"zstd level for chunks (default {DEFAULT_LEVEL})")
    p.add_argument("--bootstrap-level", type=int, default=BOOTSTRAP_LEVEL,
                   help=f"zstd level for the bootstrap (default {BOOTSTRAP_LEVEL})")
    p.add_argument("--jobs", "-j", type=int, default=None,
                   help="threads hashing and compressing chunks (default: min(4, CPUs))")
    p.add_argument("--prefetch-list", "--prefetch", dest="prefetch", metavar="FILE",
                   help="what a start-up reads, in order (`rafs trace` output): absolute "
                   "paths, or 'OFFSET LENGTH PATH' ranges (`rafs trace --ranges`), one per "
                   "line, or `rafs trace --json`; those chunks are laid out first in the "
                   "blobs, in that order, and prefetched at mount")
    p.add_argument("--startup-level", type=int, default=STARTUP_LEVEL,
                   help="zstd level for the chunks of the prefetch list, the start-up set "
                   f"(default {STARTUP_LEVEL})")
    p.add_argument("--dictionary", action=argparse.BooleanOptionalAction, default=False,
                   help="compress the small chunks of the prefetch list with a zstd "
                   "dictionary trained on them, one per blob, stored in the bootstrap")
    p.add_argument("--chunk-dict", metavar="IMAGE",
                   help="an earlier RAFS image "
                   f"({transports.CONVERT_CHUNK_DICT.syntax}): chunks it already has are "
                   "referenced in its blobs instead of being stored again")
    p.add_argument("--creds", metavar="USER:PASS",
                   help="credentials for docker:// sources and targets (default: "
                   "REGISTRY_AUTH_FILE or ~/.docker/config.json)")
    p.add_argument("--insecure", action="store_true",
                   help="plain HTTP to registries even if they are not on localhost")
    p.add_argument("--hosts-dir", metavar="DIR",
                   help="registry mirrors for docker:// pulls, containerd's layout "
                   "(DIR/HOST[:PORT]/hosts.toml; default $RAFS_HOSTS_DIR or "
                   "/etc/containerd/certs.d); pushes go to the registry")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="show progress (default: when stderr is a terminal)")
    add_json_flag(p, "what was written (references, digests and sizes)")
    p.set_defaults(func=run)


def _read_prefetch(path: str | None) -> list[Entry]:
    """The entries of a prefetch list file (``rafs.prefetchlist``: paths, ranges or
    JSON, as ``rafs trace`` prints them). OptionError names the line of the first
    entry that is not an absolute path inside the image or not a range."""
    if path is None:
        return []
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise OptionError(f"{path}: {e.strerror}") from None
    try:
        return parse_prefetch_list(data, path)
    except PrefetchListError as e:
        raise OptionError(str(e)) from None


def describe_result(result: ConvertResult) -> dict[str, Any]:
    """What ``rafs convert --json`` prints: every reference, digest and size written."""
    manifest = result.manifest
    return {
        "reference": str(result.target),
        "digest": manifest.digest,
        "manifest": {"mediaType": manifest.media_type, "digest": manifest.digest,
                     "size": len(manifest.raw)},
        "config": manifest.config.to_json(),
        "blobs": [d.to_json() for d in result.blobs],
        "bootstrap": result.bootstrap.to_json(),
        "chunks": result.chunks,
        "file_bytes": result.file_bytes,
        "layer_bytes": result.layer_bytes,
        "seconds": round(result.seconds, 3),
    }


def run(args: argparse.Namespace) -> int:
    from rafs.credentials import parse_creds
    from rafs.hosts import use_hosts_dir

    from .convert import ConvertOptions, convert  # heavy: only when converting

    if args.hosts_dir:
        use_hosts_dir(args.hosts_dir)  # every registry client of this process reads it

    transports.CONVERT_SRC.parse(args.src)
    transports.CONVERT_DST.parse(args.dst)
    if args.chunk_dict:
        transports.CONVERT_CHUNK_DICT.parse(args.chunk_dict)
    options = ConvertOptions(
        chunk_size=args.chunk_size, compression=args.compression, level=args.level,
        bootstrap_level=args.bootstrap_level, startup_level=args.startup_level,
        dictionary=args.dictionary,
        workers=args.jobs,
        prefetch=_read_prefetch(args.prefetch), progress=args.progress,
        chunk_dict=args.chunk_dict, creds=parse_creds(args.creds),
        insecure=True if args.insecure else None)
    result = convert(args.src, args.dst, options)
    if args.json:
        print_json(describe_result(result) | {"source": args.src})
    else:
        print(f"{result.target}@{result.manifest.digest}")
    log.info("%d blobs, %d chunks, %.1f MiB of layers in %.1fs", len(result.blobs),
             result.chunks, result.layer_bytes / (1 << 20), result.seconds)
    return 0


__all__ = ["describe_result", "register", "run"]
