"""The `rafs` command line: one console script, subcommands registered by each package.

Each package that offers commands has a ``cli`` module with
``register(subparsers)``; every subparser sets ``func`` (a callable taking the
parsed ``argparse.Namespace`` and returning an exit status). What every
command gets without doing anything (one-line errors, exit statuses, ``-v``
after the subcommand, a closed stdout) is ``runtime.console``'s; which image
transports a command takes is ``rafs.transports``'; ``--json`` output is
``rafs.output``'s.

This module also registers the runtime's own commands: ``run``, ``ps``,
``rm``, ``optimize``, ``image ls|prune`` and ``bench``.

``REGISTRARS`` names the module that registers each command, so that ``rafs CMD``
imports CMD's module only (the converter, the snapshotter and the bench harness
cost 50-100 ms of imports that no other command needs); ``--help``, ``--version``
and an unknown command build the whole parser. tests/test_cli_contract.py
checks the table against what the modules register.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import TYPE_CHECKING

from fused.options import DEFAULT_SUPERVISE
from rafs import sizes, transports, version
from rafs.errors import RafsError
from rafs.output import add_json_flag, print_json

from .console import Parser, add_verbosity, error, run_command, setup_logging, verbosity
from .errors import exit_status

if TYPE_CHECKING:
    from .unpacked import Unpacked

DEFAULT_STOP_TIMEOUT = 10.0


def _container_args(p: argparse.ArgumentParser) -> None:
    """The options of the container that `run` starts and `optimize` traces."""
    p.add_argument("-e", "--env", action="append", default=[], metavar="K=V",
                   help="set an environment variable (K alone: take it from here)")
    p.add_argument("-w", "--workdir", metavar="DIR", help="working directory in the container")
    p.add_argument("-u", "--user", metavar="USER[:GROUP]",
                   help="user (and group), names resolved in the image's /etc/passwd and "
                   "/etc/group (default: the image's User, else root)")
    p.add_argument("--net", choices=("host", "none"), default="host",
                   help="host network, or a network namespace with loopback only "
                   "(default %(default)s)")


# module -> the commands its ``register`` adds, in the order `rafs --help` lists them
REGISTRARS: dict[str, tuple[str, ...]] = {
    "converter.cli": ("convert",),
    "fused.cli": ("mount", "upgrade", "daemon", "umount", "ls", "stats", "trace"),
    "fused.cachecli": ("cache",),
    "rafs.cli": ("inspect", "check"),
    "runtime.cli": ("run", "ps", "rm", "optimize", "image"),
    "runtime.benchcli": ("bench",),
    "snapshotter.cli": ("snapshotter",),
}


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    image = transports.RUN_IMAGE
    p = sub.add_parser(
        "run", help="run a command in a new container on an image",
        description=f"Run CMD (default: the image's Entrypoint/Cmd) in a container on IMAGE "
        f"({image.syntax}). A RAFS image is mounted lazily, shared with the other "
        "containers of the same image; a plain OCI image is pulled and unpacked whole "
        "first. Exits with the container's status; 125: rafs run failed, 126: the command "
        "cannot be executed, 127: it is not in the image. Needs root.",
    )
    p.add_argument("--rm", action="store_true", help="remove the container when it exits")
    p.add_argument("--name", metavar="NAME", help="name the container (default rafs-<id>)")
    _container_args(p)
    p.add_argument("--mode", default="auto", metavar="MODE",
                   help="how a RAFS image is mounted: fuse (the daemon answers every "
                   "request), kernel (the kernel mounts the bootstrap as EROFS; the daemon "
                   "serves blob data only) or auto (kernel where the host can, else fuse; "
                   "the default); the daemon already serving the image keeps its mode")
    p.add_argument("--supervise", action=argparse.BooleanOptionalAction,
                   default=DEFAULT_SUPERVISE,
                   help="serve the image through a supervisor that replaces a daemon that "
                   "dies without unmounting, as `rafs mount --supervise` (default: "
                   f"{'on' if DEFAULT_SUPERVISE else 'off'})")
    p.add_argument("--keep-mounted", action="store_true",
                   help="keep the image mounted (and its daemon running) after the last "
                   "container using it has exited; stderr's last line names the mount "
                   "point to `rafs umount` later")
    p.add_argument("--cache-dir", metavar="DIR",
                   help="chunk cache of lazily mounted images (default: the host's, as for "
                   "`rafs mount`)")
    p.add_argument("--stop-timeout", type=float, default=DEFAULT_STOP_TIMEOUT,
                   metavar="SECONDS", help="after a SIGTERM, kill a container still "
                   "running after this long (default %(default)g)")
    p.add_argument("-t", "--tty", action=argparse.BooleanOptionalAction, default=None,
                   help="give the container a terminal (default: when stdin is one)")
    p.add_argument("--hosts-dir", metavar="DIR",
                   help="registry mirrors, containerd's layout (DIR/HOST[:PORT]/hosts.toml; "
                   "default $RAFS_HOSTS_DIR or /etc/containerd/certs.d), for the pull and "
                   "the image's daemon")
    image.add_argument(p, "image")
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="CMD")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("ps", help="list containers")
    p.add_argument("-q", "--quiet", action="store_true", help="print names only")
    add_json_flag(p, "the containers (name, id, image, digest, status, exit code, pid, "
                  "lazy, created)")
    p.set_defaults(func=_cmd_ps)

    p = sub.add_parser("rm", help="remove containers")
    p.add_argument("-f", "--force", action="store_true", help="kill running ones first")
    p.add_argument("names", nargs="+", metavar="NAME")
    p.set_defaults(func=_cmd_rm)

    src, dst = transports.OPTIMIZE_SRC, transports.OPTIMIZE_DST
    p = sub.add_parser(
        "optimize", help="trace a workload and write an image that prefetches what it reads",
        description=f"Run CMD in a container on SRC ({src.syntax}) with access tracing, then "
        f"write DST ({dst.syntax}) converted with the traced files as its prefetch list and "
        "first in blob order. SRC is a plain OCI image, or a RAFS image whose original "
        "(named by its io.rafs.source.digest annotation) is in the same OCI layout or "
        "registry repository. Prints DST@DIGEST, as `rafs convert` does. Needs root.",
    )
    src.add_argument(p, "src")
    dst.add_argument(p, "dst")
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD")
    _container_args(p)
    p.add_argument("--chunk-size", type=sizes.size_arg, default=None, metavar="BYTES",
                   help="chunk size of DST (default: the converter's, 1M)")
    p.add_argument("--mode", choices=("auto", "kernel", "fuse"), default="auto",
                   help="mount mode of the traced run (default auto: as `rafs run` mounts)")
    p.add_argument("--whole-files", action="store_true",
                   help="prefetch every file the workload read, whole, not only the "
                   "byte ranges it read")
    add_json_flag(p, "what was written (as `rafs convert --json`, and the traced files)")
    p.set_defaults(func=_cmd_optimize)

    p = sub.add_parser(
        "image", help="the plain images `rafs run` has unpacked",
        description="`rafs run` of a plain (non-RAFS) image unpacks it whole into "
        "<root>/rootfs/<digest> and keeps it for the next run; these commands list and "
        "remove those unpacks.")
    images = p.add_subparsers(dest="image_command", required=True, metavar="COMMAND")
    q = images.add_parser("ls", help="list unpacked images, their disk use and containers")
    add_json_flag(q, "the unpacked images")
    q.set_defaults(func=_cmd_image_ls)
    q = images.add_parser(
        "prune", help="remove unpacked images no container uses",
        description="Remove the unpacked images no container (`rafs ps`) uses; with --all "
        "also those only stopped containers use. Never one a running container uses, nor "
        "one being unpacked.")
    q.add_argument("-a", "--all", action="store_true",
                   help="also the images of stopped containers")
    add_json_flag(q, "what was removed")
    q.set_defaults(func=_cmd_image_prune)



def _cmd_run(args: argparse.Namespace) -> int:
    from rafs.hosts import use_hosts_dir

    from .run import RunOptions, run_container

    transports.RUN_IMAGE.parse(args.image)
    if args.hosts_dir:
        use_hosts_dir(args.hosts_dir)  # this process's pulls and the daemons it starts
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    return run_container(RunOptions(
        image=args.image, cmd=cmd, name=args.name, rm=args.rm, env=args.env,
        workdir=args.workdir, user=args.user, net=args.net, mode=args.mode,
        supervise=args.supervise, keep_mounted=args.keep_mounted, cache_dir=args.cache_dir,
        stop_timeout=args.stop_timeout, tty=args.tty))


def _cmd_ps(args: argparse.Namespace) -> int:
    from .manage import format_table, list_rows

    rows = list_rows()
    if args.json:
        print_json([r.to_json() for r in rows])
    elif args.quiet:
        for r in rows:
            print(r.name)
    else:
        print(format_table(rows))
    return 0


def _cmd_rm(args: argparse.Namespace) -> int:
    from .manage import remove

    status = 0
    for name in args.names:
        try:
            print(remove(name, args.force))
        except RafsError as e:
            error(str(e))
            status = exit_status(e, "rm")
    return status


def _cmd_optimize(args: argparse.Namespace) -> int:
    from converter.cli import describe_result

    from .optimize import optimize

    transports.OPTIMIZE_SRC.parse(args.src)
    transports.OPTIMIZE_DST.parse(args.dst)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    done = optimize(args.src, args.dst, cmd, env=args.env, user=args.user,
                    workdir=args.workdir, net=args.net, chunk_size=args.chunk_size,
                    mode=args.mode, whole_files=args.whole_files)
    if done.result is not None:
        if args.json:
            print_json(describe_result(done.result) | {"traced_files": done.traced})
        else:
            print(f"{done.result.target}@{done.result.manifest.digest}")
    return done.status


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def _cmd_image_ls(args: argparse.Namespace) -> int:
    from .unpacked import list_unpacked

    found = list_unpacked()
    if args.json:
        print_json([_unpacked_json(u) for u in found])
        return 0
    rows = [("DIGEST", "SIZE", "CONTAINERS")]
    for u in found:
        users = ", ".join(u.containers) or ("-" if u.complete else "(interrupted unpack)")
        rows.append((u.digest, _mib(u.bytes), users))
    widths = [max(len(r[i]) for r in rows) for i in range(2)]
    for r in rows:
        print(f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]}".rstrip())
    return 0


def _unpacked_json(u: Unpacked) -> dict[str, object]:
    return {"digest": u.digest, "path": str(u.path), "bytes": u.bytes, "complete": u.complete,
            "containers": u.containers, "running": u.running}


def _cmd_image_prune(args: argparse.Namespace) -> int:
    from .unpacked import prune

    removed = prune(all_unused=args.all)
    if args.json:
        print_json([_unpacked_json(u) for u in removed])
        return 0
    for u in removed:
        print(f"removed {u.digest} ({_mib(u.bytes)})")
    print(f"{len(removed)} unpacked images removed, {_mib(sum(u.bytes for u in removed))} "
          "freed")
    return 0


class _Version(argparse.Action):
    """``--version``; the package metadata is read only when it is asked for (15 ms)."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS,
                 **kwargs: object) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="show the version and exit")

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: object, option_string: str | None = None) -> None:
        print(f"rafs {version()}")
        parser.exit()


def _registrars(argv: list[str]) -> list[str]:
    """The modules to register for ``argv``: the one that owns its command, else all."""
    command = argv[0] if argv else ""
    owners = [m for m, commands in REGISTRARS.items() if command in commands]
    return owners or list(REGISTRARS)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The `rafs` parser; given ``argv``, with only the commands that parsing it needs."""
    parser = Parser(prog="rafs", description="Lazy-loading container image filesystem.")
    parser.add_argument("--version", action=_Version)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in _registrars([] if argv is None else argv):
        importlib.import_module(module).register(sub)
    add_verbosity(parser)  # last: every subcommand, whoever registered it
    return parser


def _parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    try:
        return parser.parse_args(argv)
    except SystemExit:  # --help, --version: printed; a closed stdout is found here
        sys.stdout.flush()
        raise


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(sys.argv[1:] if argv is None else argv)
    parsed: list[argparse.Namespace] = []
    status = run_command(lambda: parsed.append(_parse(parser, argv)), None, 0)
    if not parsed:
        return status  # a usage error, already reported
    args = parsed[0]
    verbose = verbosity(args)
    setup_logging(verbose)
    return run_command(lambda: args.func(args), args.command, verbose)


if __name__ == "__main__":
    sys.exit(main())
