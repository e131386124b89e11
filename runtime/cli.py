"""The `rafs` command line: one console script, subcommands registered by each package.

Each package that offers commands has a ``cli`` module with
``register(subparsers)``; every subparser sets ``func`` (a callable taking the
parsed ``argparse.Namespace`` and returning an exit status). A ``RafsError`` is
a user error: it is printed as one line, without a traceback, and the process
exits with ``runtime.errors.exit_status`` of it.

This module also registers the runtime's own commands: ``run``, ``ps``,
``rm`` and ``optimize``.
"""

from __future__ import annotations

import argparse
import logging
import sys

from rafs.errors import RafsError

from .errors import RunError

DEFAULT_STOP_TIMEOUT = 10.0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "run", help="run a command in a new container on an image",
        description="Run CMD (default: the image's Entrypoint/Cmd) in a container on IMAGE "
        "(oci:DIR[:TAG] or docker://HOST/REPO:TAG). A RAFS image is mounted lazily, shared "
        "with the other containers of the same image; a plain OCI image is pulled and "
        "unpacked whole first. Exits with the container's status (125: rafs run failed).",
    )
    p.add_argument("--rm", action="store_true", help="remove the container when it exits")
    p.add_argument("--name", metavar="NAME", help="name the container (default rafs-<id>)")
    p.add_argument("-e", "--env", action="append", default=[], metavar="K=V",
                   help="set an environment variable (K alone: take it from here)")
    p.add_argument("-w", "--workdir", metavar="DIR", help="working directory in the container")
    p.add_argument("-u", "--user", metavar="USER[:GROUP]",
                   help="user (and group), names resolved in the image's /etc/passwd and "
                   "/etc/group (default: the image's User, else root)")
    p.add_argument("--net", choices=("host", "none"), default="host",
                   help="host network, or a network namespace with loopback only "
                   "(default %(default)s)")
    p.add_argument("--mode", default="auto", metavar="MODE",
                   help="how a RAFS image is mounted: fuse (the daemon answers every "
                   "request), kernel (the kernel mounts the bootstrap as EROFS; the daemon "
                   "serves blob data only) or auto (kernel where the host can, else fuse; "
                   "the default); the daemon already serving the image keeps its mode")
    p.add_argument("--keep-mounted", action="store_true",
                   help="keep the image mounted (and its daemon running) after the last "
                   "container using it has exited; `rafs umount` it later")
    p.add_argument("--cache-dir", metavar="DIR",
                   help="chunk cache of lazily mounted images (default <root>/cache)")
    p.add_argument("--stop-timeout", type=float, default=DEFAULT_STOP_TIMEOUT,
                   metavar="SECONDS", help="after a SIGTERM, kill a container still "
                   "running after this long (default %(default)g)")
    p.add_argument("-t", "--tty", action=argparse.BooleanOptionalAction, default=None,
                   help="give the container a terminal (default: when stdin is one)")
    p.add_argument("--hosts-dir", metavar="DIR",
                   help="registry mirrors, containerd's layout (DIR/HOST[:PORT]/hosts.toml; "
                   "default $RAFS_HOSTS_DIR or /etc/containerd/certs.d), for the pull and "
                   "the image's daemon")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="CMD")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("ps", help="list containers")
    p.add_argument("-q", "--quiet", action="store_true", help="print names only")
    p.set_defaults(func=_cmd_ps)

    p = sub.add_parser("rm", help="remove containers")
    p.add_argument("-f", "--force", action="store_true", help="kill running ones first")
    p.add_argument("names", nargs="+", metavar="NAME")
    p.set_defaults(func=_cmd_rm)

    p = sub.add_parser(
        "optimize", help="trace a workload and write an image that prefetches what it reads",
        description="Run CMD in a container on SRC with access tracing, then write DST "
        "converted with the traced files as its prefetch list and first in blob order. SRC "
        "is a plain OCI image (oci:DIR[:TAG] or docker://...), or a RAFS image whose "
        "original (named by its io.rafs.source.digest annotation) is in the same OCI "
        "layout or registry repository.",
    )
    p.add_argument("src", metavar="SRC")
    p.add_argument("dst", metavar="DST")
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD")
    p.add_argument("-e", "--env", action="append", default=[], metavar="K=V")
    p.add_argument("-u", "--user", metavar="USER[:GROUP]")
    p.add_argument("-w", "--workdir", metavar="DIR")
    p.add_argument("--net", choices=("host", "none"), default="host")
    p.add_argument("--chunk-size", type=int, default=None, metavar="BYTES",
                   help="chunk size of DST (default: the converter's)")
    p.set_defaults(func=_cmd_optimize)

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


def _cmd_run(args: argparse.Namespace) -> int:
    from rafs.hosts import use_hosts_dir

    from .run import RunOptions, run_container

    if args.hosts_dir:
        use_hosts_dir(args.hosts_dir)  # this process's pulls and the daemons it starts
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    return run_container(RunOptions(
        image=args.image, cmd=cmd, name=args.name, rm=args.rm, env=args.env,
        workdir=args.workdir, user=args.user, net=args.net, mode=args.mode,
        keep_mounted=args.keep_mounted, cache_dir=args.cache_dir,
        stop_timeout=args.stop_timeout, tty=args.tty))


def _cmd_ps(args: argparse.Namespace) -> int:
    from .manage import format_table, list_rows

    rows = list_rows()
    if args.quiet:
        for r in rows:
            print(r.name)
    else:
        print(format_table(rows))
    return 0


def _cmd_rm(args: argparse.Namespace) -> int:
    from .manage import remove

    failed = 0
    for name in args.names:
        try:
            print(remove(name, args.force))
        except RafsError as e:
            print(f"rafs: error: {e}", file=sys.stderr)
            failed += 1
    return 1 if failed else 0


def _cmd_optimize(args: argparse.Namespace) -> int:
    from .optimize import optimize

    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    return optimize(args.src, args.dst, cmd, env=args.env, user=args.user,
                    workdir=args.workdir, net=args.net, chunk_size=args.chunk_size)


def _cmd_bench(args: argparse.Namespace) -> int:
    from bench.coldstart import cmd_bench

    return cmd_bench(args)


def _no_bench(args: argparse.Namespace) -> int:
    raise RunError("rafs bench needs the bench package of a rafs checkout")


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
    register(sub)
    snapshotter_cli.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .errors import exit_status

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
        return exit_status(e, args.command)
    except KeyboardInterrupt:
        print("rafs: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
