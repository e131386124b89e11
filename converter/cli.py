"""The ``rafs convert`` subcommand."""

from __future__ import annotations

import argparse
import logging
import re

from rafs.codec import BOOTSTRAP_LEVEL, DEFAULT_LEVEL

from .chunker import DEFAULT_CHUNK_SIZE
from .errors import OptionError

log = logging.getLogger(__name__)

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def parse_size(text: str) -> int:
    """``4096``, ``64K``, ``1M``, ``1MiB`` -> bytes."""
    m = re.fullmatch(r"\s*(\d+)\s*([kmg]?)(?:i?b)?\s*", text.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}")
    return int(m.group(1)) * _UNITS[m.group(2)]


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "convert", help="convert an OCI image into a RAFS image",
        description="Convert SRC (oci:DIR[:TAG] or docker-archive:FILE[:REPO:TAG]) into a "
                    "RAFS image tagged in the OCI layout DST (oci:DIR[:TAG], tag defaults "
                    "to latest).")
    p.add_argument("src", metavar="SRC")
    p.add_argument("dst", metavar="DST")
    p.add_argument("--chunk-size", type=parse_size, default=DEFAULT_CHUNK_SIZE,
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
                   help="absolute paths to prefetch, one per line (`rafs trace` output): "
                   "stored in the bootstrap, and those files are laid out first in the blobs")
    p.add_argument("--chunk-dict", metavar="IMAGE",
                   help="an earlier RAFS image (oci:, docker://): chunks it already has are "
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
    p.set_defaults(func=run)


def _read_prefetch(path: str | None) -> list[bytes]:
    if path is None:
        return []
    try:
        with open(path, "rb") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise OptionError(f"{path}: {e.strerror}") from None
    return [line.strip() for line in lines if line.strip() and not line.startswith(b"#")]


def run(args: argparse.Namespace) -> int:
    from rafs.credentials import parse_creds
    from rafs.hosts import use_hosts_dir

    from .convert import ConvertOptions, convert  # heavy: only when converting

    if args.hosts_dir:
        use_hosts_dir(args.hosts_dir)  # every registry client of this process reads it

    options = ConvertOptions(
        chunk_size=args.chunk_size, compression=args.compression, level=args.level,
        bootstrap_level=args.bootstrap_level, workers=args.jobs,
        prefetch=_read_prefetch(args.prefetch), progress=args.progress,
        chunk_dict=args.chunk_dict, creds=parse_creds(args.creds),
        insecure=True if args.insecure else None)
    result = convert(args.src, args.dst, options)
    print(f"{result.target}@{result.manifest.digest}")
    log.info("%d blobs, %d chunks, %.1f MiB of layers in %.1fs", len(result.blobs),
             result.chunks, result.layer_bytes / (1 << 20), result.seconds)
    return 0


__all__ = ["parse_size", "register", "run"]
