"""`rafs bench`: the cold-start benchmark of a checkout's ``bench`` package, as a command.

Registered apart from the runtime's commands because ``bench.coldstart`` imports
the registry client and the harness (50 ms) that no other command needs.
"""

from __future__ import annotations

import argparse

from .errors import RunError


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "bench", help="measure cold start: rafs against OCI through containerd",
        description="Push the benchmark images (bench.corpus) to a local registry as plain "
        "OCI, RAFS and RAFS optimized, then time cold starts of five scenarios through a "
        "link emulator; write coldstart.json, coldstart.md and plots to --out. Needs root "
        "and a checkout (the bench package).",
    )
    try:
        from bench.coldstart import add_arguments
    except ImportError:  # an installed rafs without the bench package
        p.set_defaults(func=_no_bench)
    else:
        add_arguments(p)
        p.set_defaults(func=_cmd_bench)


def _cmd_bench(args: argparse.Namespace) -> int:
    from bench.coldstart import cmd_bench

    return cmd_bench(args)


def _no_bench(args: argparse.Namespace) -> int:
    raise RunError("rafs bench needs the bench package of a rafs checkout")
