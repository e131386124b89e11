"""The `rafs` command line: one console script, subcommands registered by each package.

Each package that offers commands has a ``cli`` module with
``register(subparsers)``; every subparser sets ``func`` (a callable taking the
parsed ``argparse.Namespace`` and returning an exit status). A ``RafsError`` is
a user error: it is printed as one line, without a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys

from rafs.errors import RafsError


def build_parser() -> argparse.ArgumentParser:
    from converter import cli as converter_cli
    from fused import cli as fused_cli
    from rafs import cli as rafs_cli
    from snapshotter import cli as snapshotter_cli

    parser = argparse.ArgumentParser(
        prog="rafs", description="Lazy-loading container image filesystem."
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    converter_cli.register(sub)
    fused_cli.register(sub)
    rafs_cli.register(sub)
    snapshotter_cli.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.verbose < 2:  # one line per HTTP request only at -vv
        logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        return int(args.func(args) or 0)
    except RafsError as e:
        print(f"rafs: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("rafs: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
