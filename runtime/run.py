"""``rafs run``: one container, from image to exit status, and everything undone after.

The order of work, each step registering its undo on one ``ExitStack``:

1. find runc, resolve the image, work out the command (fail early: nothing is
   mounted yet);
2. create the container record (``store``);
3. the lower dir: a RAFS image is mounted lazily and shared (``imagemount``);
   a plain image is pulled and unpacked whole (``unpack``), with a note on
   stderr that it is not lazy;
4. resolve the user in the image, write hosts/hostname/resolv.conf and the
   OCI spec, mount the overlay (``overlay``), and find the command in it
   (``executable``: 127 if it is not there, 126 if it cannot be executed, as
   docker says, instead of runc's 1);
5. ``runc run`` attached to our stdio (with a terminal when stdin is one);
   signals are forwarded to runc, which forwards them to the container.
   SIGTERM also starts a stop timer: a container still running after
   ``--stop-timeout`` seconds is killed (a PID 1 without a handler ignores
   SIGTERM). A signal that arrives before runc runs aborts the setup.
6. unwind: runc's state, the overlay, the image mount; ``--rm`` (or a failure
   before the container started) removes the container's directory, otherwise
   its status and exit code are recorded.

The exit status is the container's (128 + N when a signal N ended it).
``rafs run`` needs root (``NeedsRootError`` says so before anything is touched).
With ``--keep-mounted`` the last line on stderr names the mount point the
image stays mounted on.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from fused.options import DEFAULT_SUPERVISE
from rafs.oci import canonical_json

from . import imagemount, overlay, store
from .errors import NeedsRootError, RunError
from .executable import check_command
from .image import ResolvedImage, resolve_image
from .paths import cache_dir as default_cache_dir
from .runc import Runc
from .spec import SpecInput, build_spec, command_of
from .unpack import ensure_rootfs
from .users import resolve_user

__all__ = ["RunOptions", "require_root", "run_container"]

log = logging.getLogger(__name__)

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
             signal.SIGUSR2)


@dataclass
class RunOptions:
    image: str
    cmd: list[str] = field(default_factory=list)
    name: str | None = None
    rm: bool = False
    env: list[str] = field(default_factory=list)
    workdir: str | None = None
    user: str | None = None
    net: str = "host"
    mode: str = "auto"
    supervise: bool = DEFAULT_SUPERVISE  # the image's daemon under a supervisor (failover)
    keep_mounted: bool = False
    cache_dir: str | None = None
    stop_timeout: float = 10.0
    tty: bool | None = None  # None: when stdin is a terminal


class _Aborted(BaseException):
    """A signal arrived before the container started: unwind the setup."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class _Forwarder:
    """Signal handlers: abort the setup, forward to runc, or ignore during cleanup."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.stop_deadline: float | None = None
        self.cleaning = False
        self.deferring = False
        self.pending: int | None = None
        self.stop_timeout = 10.0
        self.old: dict[int, object] = {}

    def install(self) -> None:
        for sig in FORWARDED:
            self.old[sig] = signal.signal(sig, self.handle)

    def restore(self) -> None:
        for sig, old in self.old.items():
            signal.signal(sig, old)  # type: ignore[arg-type]

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """Hold back an abort while a mount is made and its undo registered (the signal
        mask is not used: the daemon started meanwhile would inherit it)."""
        self.deferring = True
        try:
            yield
        finally:
            self.deferring = False
        if self.pending is not None:
            raise _Aborted(self.pending)

    def handle(self, signum: int, frame: FrameType | None) -> None:
        if self.cleaning:
            log.info("signal %d during cleanup: finishing the cleanup first", signum)
            return
        if self.proc is None:
            if self.deferring:
                self.pending = signum
                return
            raise _Aborted(signum)
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signum)
        if signum == signal.SIGTERM and self.stop_deadline is None:
            self.stop_deadline = time.monotonic() + self.stop_timeout


def _env_items(items: list[str]) -> list[str]:
    out = []
    for item in items:
        if "=" in item:
            out.append(item)
        elif item in os.environ:
            out.append(f"{item}={os.environ[item]}")
    return out


def _write_files(files: Path, hostname: str, net: str) -> None:
    hosts = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
    resolv = ""
    if net == "host":
        with contextlib.suppress(OSError):
            hosts = Path("/etc/hosts").read_text()
        with contextlib.suppress(OSError):
            resolv = Path("/etc/resolv.conf").read_text()
    (files / "hosts").write_text(hosts.rstrip("\n") + f"\n127.0.1.1\t{hostname}\n")
    (files / "hostname").write_text(hostname + "\n")
    (files / "resolv.conf").write_text(resolv)


def _lower_dir(image: ResolvedImage, c: store.Container, opts: RunOptions,
               stack: contextlib.ExitStack, forwarder: _Forwarder) -> Path:
    if image.is_rafs:
        cache = opts.cache_dir or str(default_cache_dir())
        with forwarder.deferred():
            mnt = imagemount.acquire(image, c.id, os.getpid(), os.path.abspath(cache),
                                     mode=opts.mode, keep=opts.keep_mounted,
                                     supervise=opts.supervise)
            stack.callback(imagemount.release, image.key, c.id)
        return mnt
    print(f"rafs: note: {image.ref} is not a RAFS image: it is pulled and unpacked whole "
          "before the container starts (not lazy)", file=sys.stderr)
    return ensure_rootfs(image)


def require_root(command: str) -> None:
    """NeedsRootError unless this process runs as root."""
    if os.geteuid() != 0:
        raise NeedsRootError(f"{command} needs root: it mounts the image and an overlay and "
                             "starts runc (run it as root, e.g. with sudo)")


def run_container(opts: RunOptions, *, image: ResolvedImage | None = None,
                  lower: Path | None = None) -> int:
    """Run one container to its end; return its exit status.

    ``image``/``lower`` let a caller (``rafs optimize``) run on an image it has
    resolved and mounted itself.
    """
    require_root("rafs run")
    if opts.net not in ("host", "none"):
        raise RunError(f"--net {opts.net}: only host and none are supported")
    runc = Runc()
    forwarder = _Forwarder()
    forwarder.stop_timeout = opts.stop_timeout
    forwarder.install()
    try:
        with contextlib.ExitStack() as stack:
            try:
                return _setup_and_run(opts, runc, forwarder, stack, image, lower)
            finally:
                forwarder.cleaning = True  # from here on, signals wait for the cleanup
    except _Aborted as e:
        log.info("aborted by signal %d before the container started", e.signum)
        return 128 + e.signum
    finally:
        forwarder.restore()


def _setup_and_run(opts: RunOptions, runc: Runc, forwarder: _Forwarder,
                   stack: contextlib.ExitStack, image: ResolvedImage | None,
                   lower: Path | None) -> int:
    image = image or resolve_image(opts.image)
    args = command_of(image.run_config, opts.cmd)
    terminal = sys.stdin.isatty() if opts.tty is None else opts.tty
    if terminal and not sys.stdin.isatty():
        raise RunError("--tty needs a terminal on stdin (runc hands it to the container)")
    c = store.create(opts.name, str(image.ref), image.digest,
                     lazy=image.is_rafs and lower is None,
                     keep_mounted=opts.keep_mounted)
    stack.callback(_finish, c, opts.rm)
    if lower is None:
        lower = _lower_dir(image, c, opts, stack, forwarder)
    config = image.run_config
    user = resolve_user(lower, opts.user if opts.user is not None
                        else str(config.get("User") or ""))
    hostname = c.id[:12]
    _write_files(c.dir, hostname, opts.net)
    spec = build_spec(config, SpecInput(
        args=args, user=user, hostname=hostname, files_dir=c.dir,
        env=_env_items(opts.env), workdir=opts.workdir, terminal=terminal,
        net=opts.net))
    (c.dir / "config.json").write_bytes(canonical_json(spec))
    with forwarder.deferred():
        stack.callback(overlay.unmount, c.rootfs)
        overlay.mount_overlay(lower, c.upper, c.work, c.rootfs)
    process = spec["process"]
    check_command(c.rootfs, process["args"], process["env"], process["cwd"], user)
    if opts.keep_mounted and c.lazy:
        stack.callback(_say_kept, lower)
    stack.callback(_delete_runc_state, runc, c.id)
    status = _run_runc(runc, c, forwarder, terminal)
    forwarder.cleaning = True
    c.status, c.exit_code = "exited", status
    return status


def _run_runc(runc: Runc, c: store.Container, forwarder: _Forwarder, terminal: bool) -> int:
    argv = runc.run_argv(str(c.dir), c.id)
    log.info("starting %s", " ".join(argv))
    try:
        proc = subprocess.Popen(argv, process_group=None if terminal else 0)
    except OSError as e:
        raise RunError(f"cannot start {runc.path}: {e.strerror}") from None
    forwarder.proc = proc
    c.status = "running"
    c.save()
    killed = False
    while True:
        try:
            return proc.wait(timeout=0.2)
        except subprocess.TimeoutExpired:
            pass
        deadline = forwarder.stop_deadline
        if deadline is not None and not killed and time.monotonic() > deadline:
            log.info("container %s did not stop on SIGTERM; killing it", c.name)
            runc.kill(c.id, "KILL")
            killed = True


def _say_kept(mnt: Path) -> None:
    print(f"rafs: the image stays mounted on {mnt} (`rafs umount {mnt}` when done)",
          file=sys.stderr)


def _delete_runc_state(runc: Runc, cid: str) -> None:
    if not runc.may_know(cid):  # `runc run` deleted it as the container exited
        return
    if runc.state(cid) is not None:
        runc.kill(cid, "KILL")
        runc.delete(cid)


def _finish(c: store.Container, rm: bool) -> None:
    if rm or c.status == "created":  # --rm, or it never started: leave nothing behind
        store.remove_dir(c)
        return
    if c.status != "exited":
        c.status = "exited"
    with contextlib.suppress(OSError):
        c.save()


