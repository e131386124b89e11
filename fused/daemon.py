"""The daemon: open an image, mount it, serve it until unmounted or told to stop.

One ``trio.run`` owns everything through an ``AsyncExitStack`` and one nursery:
the backend, the verified bootstrap (fetched through the backend, checked
against the manifest and the uncompressed-digest annotation, stored in the
cache directory, then mmapped), the chunk cache and its committer task, the
fetcher and its fetch tasks, the control socket, the signal watcher and
pyfuse3's main loop. ``pyfuse3.close(unmount=True)`` runs in ``finally``.

Readiness: ``rafs mount`` passes the write end of a pipe as ``--ready-fd``.
Once the mount answers a ``stat`` of its root and the control socket listens,
the daemon writes ``OK <pid>\\n``; if it fails before that, it writes
``ERR <one-line message>\\n`` and exits non-zero after cleaning up, so the
CLI never leaves a half mount behind.

Stopping: SIGTERM or SIGINT end the main loop and unmount (lazily, as libfuse
does; files still open then fail with ENOTCONN). The control command
``shutdown`` tries a plain unmount and refuses while the mount is busy; with
``lazy`` it detaches the mount and keeps serving the files still open, exiting
when the kernel ends the session after the last one is closed. An external
``fusermount3 -u`` also ends the daemon. In kernel mode the EROFS mount goes
first (plainly, or detached with ``lazy``: then the blob filesystem stays
until the detached mount lets go of it), the blob filesystem after it; on a
signal or an error EROFS is detached before the blob filesystem ends.

Supervised (``fused.supervisor`` starts it as ``python -m fused.worker``, see
``fused.takeover``): the supervisor has mounted already and owns the mounts
and the state file; the daemon serves the connection it is handed, never
touches the mount point before serving it, mounts EROFS only as the first
worker of a mount, and unmounts nothing when it stops.

Run as ``python -m fused.daemon IMAGE MOUNTPOINT --cache-dir DIR``.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import signal
import time
import stat
import sys
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from rafs.bootstrap import Bootstrap
from rafs.errors import RafsError
from rafs.oci import parse_image_ref
from rafs.trust import bootstrap_layer, raw_bootstrap_digest, verify_bootstrap

from . import takeover
from .backend import Backend, BackendOptions, open_backend
from .cli import CREDS_ENV
from .cache import ChunkCache, cached_bootstrap, store_bootstrap
from .control import ensure_run_dir, paths_for
from .control_server import serve as serve_control
from .errors import MountError
from .fetcher import DEFAULT_AMPLIFY, DEFAULT_FETCH_TIMEOUT, DEFAULT_RETRIES, Fetcher
from .blobfs import BlobFs, blob_file_name
from .blobops import BLOB_MOUNT_OPTIONS, BlobOperations
from .fuseops import MOUNT_OPTIONS, Operations
from .kernelmount import MODES, mount_erofs, resolve_mode
from .kernelmount import umount as kernel_umount
from .mounts import BLOB_FSTYPE, canonical, find_mount, fusermount_unmount
from .stats import Stats
from .trace import AccessTrace, ChunkTrace
from .vfs import ROOT_INO, Vfs

__all__ = ["DaemonConfig", "load_bootstrap", "main", "run", "serve"]

log = logging.getLogger("fused.daemon")  # also when run as __main__

DEFAULT_READAHEAD_KB = 4096


@dataclass(slots=True)
class DaemonConfig:
    image: str
    mountpoint: str
    cache_dir: str
    readahead_kb: int = DEFAULT_READAHEAD_KB
    max_requests: int = 8
    prefetch: bool = True
    amplify_bytes: int = DEFAULT_AMPLIFY
    fetch_timeout: float = DEFAULT_FETCH_TIMEOUT  # idle seconds before a fetch is retried
    retries: int = DEFAULT_RETRIES  # per backend request, then EIO
    metrics_address: str | None = None
    backend: BackendOptions = field(default_factory=BackendOptions)
    mode: str = "auto"  # auto | fuse | kernel (see fused.kernelmount)


# -- the image ----------------------------------------------------------------


async def load_bootstrap(backend: Backend, cache_dir: str) -> Path:
    """Path of the verified raw bootstrap of the backend's image, fetched into the cache
    if needed (the chain of digests is ``rafs.trust``'s; the backend retries)."""
    manifest = await backend.resolve()
    desc = bootstrap_layer(manifest, backend.name)
    expected = raw_bootstrap_digest(desc)
    if expected is not None:
        path = await trio.to_thread.run_sync(cached_bootstrap, cache_dir, expected)
        if path is not None:
            log.info("using cached bootstrap %s", path)
            return path
    payload = await backend.read_blob(desc.digest, desc.size)
    boot = await trio.to_thread.run_sync(
        functools.partial(verify_bootstrap, manifest, payload, name=backend.name))
    path = await trio.to_thread.run_sync(store_bootstrap, cache_dir, boot.digest, boot.raw)
    log.info("bootstrap %s stored at %s", boot.digest, path)
    return path


# -- serving ------------------------------------------------------------------


def _mount_options() -> set[str]:
    options = set(MOUNT_OPTIONS)
    if os.geteuid() != 0:
        try:
            conf = Path("/etc/fuse.conf").read_text()
        except OSError:
            conf = ""
        if not any(line.strip() == "user_allow_other" for line in conf.splitlines()):
            log.warning("not root and /etc/fuse.conf lacks user_allow_other: mounting "
                        "without allow_other, only you can see the files")
            options.discard("allow_other")
    return options


def _check_mountpoint(mountpoint: str) -> None:
    try:
        st = os.stat(mountpoint)
    except OSError as e:
        raise MountError(f"mount point {mountpoint}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise MountError(f"mount point {mountpoint} is not a directory")
    entry = find_mount(mountpoint)
    if entry is not None and entry.is_rafs:
        raise MountError(f"{mountpoint} is already a rafs mount (`rafs umount` it first)")


def _erofs_bdis() -> set[str]:
    try:
        return {name for name in os.listdir("/sys/class/bdi") if name.startswith("erofs-")}
    except OSError:
        return set()


def _tune_readahead(mountpoint: str, kb: int, bdi: str | None = None) -> None:
    """Let the kernel read ahead further than its 128 KiB default (best effort)."""
    if kb <= 0:
        return
    if bdi is None:
        dev = os.stat(mountpoint).st_dev
        bdi = f"{os.major(dev)}:{os.minor(dev)}"
    path = Path(f"/sys/class/bdi/{bdi}/read_ahead_kb")
    try:
        path.write_text(f"{kb}\n")
    except OSError as e:
        log.info("cannot set %s: %s", path, e.strerror)
    else:
        log.debug("set %s to %d", path, kb)


async def serve(cfg: DaemonConfig, ready: Callable[[str | None], None]) -> None:
    """Mount ``cfg.image`` and serve it; call ``ready(None)`` once it answers.

    Raises RafsError for anything a user can fix; ``ready`` is then not called
    (the caller reports the error).
    """
    started = time.perf_counter()
    attached = takeover.attachment()  # supervised worker: the supervisor mounted (fused.takeover)
    if attached is None:
        mountpoint = canonical(cfg.mountpoint)
        paths = paths_for(mountpoint)
        _check_mountpoint(mountpoint)
    else:  # never touch the mount before serving it (a stat would wait for us forever)
        mountpoint = cfg.mountpoint
        paths = takeover.worker_paths(mountpoint, attached)
    stats = Stats()
    timing: dict[str, float] = {}
    ref = parse_image_ref(cfg.image)
    mode, why = resolve_mode(cfg.mode)
    log.info("%s mode: %s", mode, why)
    ensure_run_dir()
    async with AsyncExitStack() as stack:
        backend = await stack.enter_async_context(open_backend(ref, cfg.backend))
        backend.stats = stats
        boot_path = await load_bootstrap(backend, cfg.cache_dir)
        bootstrap = Bootstrap.open(boot_path)
        stack.callback(bootstrap.close)
        cache = ChunkCache(cfg.cache_dir, bootstrap.blobs, bootstrap.chunk, stats)
        stack.callback(cache.close)
        nursery = await stack.enter_async_context(trio.open_nursery())
        await nursery.start(cache.run)
        fetcher = Fetcher(cache, backend, stats, max_requests=cfg.max_requests,
                          amplify_bytes=cfg.amplify_bytes, timeout=cfg.fetch_timeout,
                          retries=cfg.retries)
        await stack.enter_async_context(fetcher.running())
        vfs = Vfs(bootstrap, fetcher, stats)
        ops: pyfuse3.Operations
        trace: AccessTrace | ChunkTrace
        if mode == "fuse":
            trace = vfs.trace
            ops = Operations(vfs, stats)
            fuse_dir, fuse_options = mountpoint, _mount_options()
            kernel: _KernelMount | None = None
        else:
            trace = ChunkTrace()
            ops = BlobOperations(BlobFs(bootstrap, fetcher, stats, trace), stats)
            fuse_dir, fuse_options = str(paths.blobs), set(BLOB_MOUNT_OPTIONS)
            kernel = _KernelMount(boot_path, mountpoint, paths.blobs, len(bootstrap.blobs))
            if attached is None:
                await trio.to_thread.run_sync(kernel.prepare)
        if attached is not None:
            fuse_dir = takeover.arm(attached).mountpoint
        labels = {"mountpoint": mountpoint}
        if cfg.metrics_address:
            from .metrics import new_registry, serve_http  # prometheus_client: only if used

            host, port = serve_http(cfg.metrics_address, new_registry(stats, labels))
            timing["metrics_address"] = f"{host}:{port}"  # type: ignore[assignment]
            log.info("serving Prometheus metrics on http://%s:%d/metrics", host, port)

        shutdown_lock = trio.Lock()
        serving = [False]  # pyfuse3.terminate() is only safe while main() runs

        def terminate() -> None:
            if serving[0]:
                pyfuse3.terminate()

        async def on_stats(_: dict[str, Any]) -> dict[str, Any]:
            return {"ok": True, "pid": os.getpid(), "mountpoint": mountpoint, "mode": mode,
                    "image": cfg.image, "cache_dir": cfg.cache_dir, "stats": stats.snapshot(),
                    **timing}

        async def on_metrics(_: dict[str, Any]) -> dict[str, Any]:
            from .metrics import new_registry, render

            return {"ok": True, "text": render(new_registry(stats, labels))}

        async def on_trace(_: dict[str, Any]) -> dict[str, Any]:
            result = await trio.to_thread.run_sync(trace.to_json, bootstrap)
            return {"ok": True, **result}

        async def on_ping(_: dict[str, Any]) -> dict[str, Any]:
            return {"ok": True, "pid": os.getpid()}

        async def on_shutdown(message: dict[str, Any]) -> dict[str, Any]:
            lazy = bool(message.get("lazy"))
            async with shutdown_lock:
                log.info("shutdown requested (lazy=%s)", lazy)
                if kernel is not None:
                    await trio.to_thread.run_sync(lambda: kernel.unmount_erofs(lazy=lazy))
                    if lazy:
                        # The detached EROFS mount still reads the blob files until its
                        # last user goes; serve them until the blob mount can go too.
                        nursery.start_soon(_release_blobs_when_free, kernel, terminate)
                        log.info("detached; serving blob data until the last user is gone")
                    else:
                        await trio.to_thread.run_sync(kernel.unmount_blobs)
                        terminate()
                    return {"ok": True, "pid": os.getpid(), "detached": lazy}
                await trio.to_thread.run_sync(
                    lambda: fusermount_unmount(mountpoint, lazy=lazy)
                )
                if lazy:
                    # Detached, but open files still use the connection: keep serving
                    # until the kernel drops the last reference and ends the session.
                    log.info("detached; serving open files until they are closed")
                else:
                    terminate()  # the kernel has ended the session already; make sure
            return {"ok": True, "pid": os.getpid(), "detached": lazy}

        handlers = {"stats": on_stats, "metrics": on_metrics, "trace": on_trace,
                    "ping": on_ping, "shutdown": on_shutdown}

        log.info("mounting %s on %s", cfg.image, mountpoint)
        try:
            pyfuse3.init(ops, fuse_dir, fuse_options)
        except RuntimeError as e:
            raise MountError(f"cannot mount on {fuse_dir}: {e}") from None
        try:
            await nursery.start(serve_control, paths.socket, handlers)
            nursery.start_soon(_watch_signals, terminate)
            def announced() -> None:
                timing["ready_seconds"] = round(time.perf_counter() - started, 4)
                ready(None)

            nursery.start_soon(_announce, cfg, mountpoint, paths.state, mode, kernel, announced,
                               attached)
            if cfg.prefetch and bootstrap.prefetch:
                nursery.start_soon(takeover.after_init, _prefetch, fetcher, vfs,
                                   bootstrap.prefetch, stats)  # a standby: once it serves
            serving[0] = True
            try:
                await pyfuse3.main()
            finally:
                serving[0] = False
            log.info("main loop ended")
        finally:
            nursery.cancel_scope.cancel()
            if attached is not None:  # the mounts and the state are the supervisor's
                pyfuse3.close(unmount=False)
                log.info("stopped serving %s", mountpoint)
            else:
                if kernel is not None:
                    # Never leave an EROFS mount over a dead blob filesystem in sight.
                    kernel.unmount_erofs_quietly()
                pyfuse3.close(unmount=True)
                if kernel is not None:
                    kernel.remove_dir()
                paths.state.unlink(missing_ok=True)
                log.info("unmounted %s", mountpoint)


class _KernelMount:
    """The two mounts of kernel mode: the blob filesystem, and EROFS over it."""

    def __init__(self, bootstrap: Path, mountpoint: str, blob_dir: Path, blobs: int) -> None:
        self.bootstrap = bootstrap
        self.mountpoint = mountpoint
        self.blob_dir = blob_dir
        self.devices = [str(blob_dir / blob_file_name(k)) for k in range(blobs)]
        self.erofs_mounted = False
        self.erofs_dev: str | None = None  # MAJOR:MINOR of our EROFS mount
        self.bdi: str | None = None

    def prepare(self) -> None:
        """An empty private directory for the blob filesystem (a stale mount goes)."""
        entry = find_mount(self.blob_dir)
        if entry is not None and entry.fstype == BLOB_FSTYPE:
            log.warning("removing a stale blob mount on %s", self.blob_dir)
            fusermount_unmount(self.blob_dir, lazy=True)
        try:
            self.blob_dir.mkdir(mode=0o700, exist_ok=True)
        except OSError as e:
            raise MountError(f"cannot create {self.blob_dir}: {e.strerror}") from None

    def mount_erofs(self) -> None:
        before = _erofs_bdis()
        mount_erofs(self.bootstrap, self.mountpoint, self.devices)
        self.erofs_mounted = True
        entry = find_mount(self.mountpoint)
        self.erofs_dev = entry.major_minor if entry is not None else None
        # A file-backed EROFS mount has a bdi of its own named by a counter, not by
        # st_dev; the one that appeared is ours unless another mount raced us.
        new = _erofs_bdis() - before
        self.bdi = new.pop() if len(new) == 1 else None
        log.info("kernel EROFS mount of %s on %s with %d blob devices", self.bootstrap,
                 self.mountpoint, len(self.devices))

    def unmount_erofs(self, *, lazy: bool) -> None:
        """MountError (busy) leaves it mounted. Someone may have unmounted it already
        (and mounted something else there): only our own mount is touched."""
        if not self.erofs_mounted:
            return
        entry = find_mount(self.mountpoint)
        if entry is None or entry.major_minor != self.erofs_dev:
            self.erofs_mounted = False
            return
        kernel_umount(self.mountpoint, lazy=lazy)
        self.erofs_mounted = False

    def unmount_erofs_quietly(self) -> None:
        try:
            self.unmount_erofs(lazy=True)
        except MountError as e:
            log.error("cannot detach the EROFS mount on %s: %s", self.mountpoint, e)

    def unmount_blobs(self) -> None:
        """Unmount the blob filesystem; the EROFS driver may hold it for a moment
        (its device files are released after its unmount returns)."""
        for _attempt in range(50):
            if not self.blobs_busy():
                return
            time.sleep(0.02)
        log.warning("blob mount %s stays busy; detaching it", self.blob_dir)
        kernel_umount(self.blob_dir, lazy=True)

    def blobs_busy(self) -> bool:
        """Try to unmount the blob filesystem: True while something still uses it."""
        try:
            kernel_umount(self.blob_dir)  # root only, like kernel mode itself
        except MountError:
            return True
        return False

    def remove_dir(self) -> None:
        try:
            self.blob_dir.rmdir()
        except OSError as e:
            log.debug("cannot remove %s: %s", self.blob_dir, e.strerror)


async def _release_blobs_when_free(kernel: _KernelMount, terminate: Callable[[], None]) -> None:
    """After a lazy unmount: end the blob mount (and the daemon) once EROFS lets go of it."""
    while await trio.to_thread.run_sync(kernel.blobs_busy):
        await trio.sleep(0.5)
    log.info("the detached EROFS mount is gone; stopping")
    terminate()


async def _watch_signals(terminate: Callable[[], None]) -> None:
    """Stop on SIGTERM, SIGINT or SIGHUP; keep catching them (a second Ctrl-C) until the end."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        stopping = False
        async for signum in signals:
            name = signal.Signals(signum).name
            if stopping:
                log.info("got %s: already unmounting", name)
                continue
            log.info("got %s: unmounting", name)
            stopping = True
            terminate()


async def _prefetch(fetcher: Fetcher, vfs: Vfs, nids: list[int], stats: Stats) -> None:
    """Fetch the prefetch list in the background; cancelled (cleanly) by unmount."""
    try:
        chunks = await trio.to_thread.run_sync(lambda: list(vfs.chunks_of_nids(nids)))
    except RafsError as e:  # a corrupt bootstrap entry: reads will report it too
        log.warning("prefetch skipped: %s", e)
        stats.prefetch_state = "stopped"
        return
    stats.prefetch_planned = len(chunks)
    stats.prefetch_state = "running"
    log.info("prefetching %d entries of the prefetch list (%d chunks)", len(nids), len(chunks))
    try:
        done = await fetcher.prefetch(chunks)
    except RafsError as e:
        log.warning("prefetch stopped: %s", e)
        stats.prefetch_state = "stopped"
        return
    except trio.Cancelled:
        stats.prefetch_state = "stopped"
        raise
    stats.prefetch_state = "done"
    log.info("prefetch done: %d chunks fetched", done)


async def _announce(
    cfg: DaemonConfig, mountpoint: str, state: Path, mode: str, kernel: _KernelMount | None,
    ready: Callable[[], None], attached: takeover.Attachment | None = None,
) -> None:
    """Mount EROFS (kernel mode), check the mount answers, record the state, report ready.

    The EROFS mount opens the blob files, so it runs in a worker thread while
    the FUSE main loop answers. A supervised worker that takes over a running
    mount finds EROFS mounted already, and the supervisor keeps the state.
    """
    mounting = attached is None or attached.first
    if kernel is not None and mounting:
        await trio.to_thread.run_sync(kernel.mount_erofs)
        _tune_readahead(str(kernel.blob_dir), cfg.readahead_kb)
    st = await trio.to_thread.run_sync(os.stat, mountpoint)
    if st.st_ino != ROOT_INO:
        raise MountError(f"{mountpoint} does not show the rafs root after mounting")
    if not mounting:
        pass
    elif kernel is None:
        _tune_readahead(mountpoint, cfg.readahead_kb)
    elif kernel.bdi is not None:
        _tune_readahead(mountpoint, cfg.readahead_kb, kernel.bdi)
    if attached is not None:
        log.info("serving %s on %s (%s mode, supervised)", cfg.image, mountpoint, mode)
        ready()
        return
    info = {"pid": os.getpid(), "mountpoint": mountpoint, "image": cfg.image, "mode": mode,
            "cache_dir": cfg.cache_dir, "log": str(paths_for(mountpoint).log)}
    tmp = state.with_suffix(".tmp")
    tmp.write_text(json.dumps(info) + "\n")
    tmp.replace(state)
    log.info("serving %s on %s (%s mode)", cfg.image, mountpoint, mode)
    ready()


def run(cfg: DaemonConfig, ready: Callable[[str | None], None]) -> None:
    """Serve until unmounted; RafsError escapes after ``ready(message)`` if not yet ready."""
    announced = False

    def once(error: str | None) -> None:
        nonlocal announced
        if not announced:
            announced = True
            ready(error)

    try:
        trio.run(serve, cfg, once)
    except BaseException as e:
        cause = _first_rafs_error(e)
        if cause is not None:
            once(str(cause))
            raise cause from None
        if _contains(e, KeyboardInterrupt):
            once("interrupted")
            raise KeyboardInterrupt from None
        once(f"internal error: {type(e).__name__}: {e}")
        raise


def _contains(exc: BaseException, kind: type[BaseException]) -> bool:
    if isinstance(exc, BaseExceptionGroup):
        return any(_contains(sub, kind) for sub in exc.exceptions)
    return isinstance(exc, kind)


def _first_rafs_error(exc: BaseException) -> RafsError | None:
    """The RafsError in ``exc``, looking inside nursery exception groups."""
    if isinstance(exc, RafsError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for sub in exc.exceptions:
            found = _first_rafs_error(sub)
            if found is not None:
                return found
    return None


# -- python -m fused.daemon -------------------------------------------------------------


def _pipe_reporter(fd: int | None) -> Callable[[str | None], None]:
    def report(error: str | None) -> None:
        if fd is None:
            return
        line = f"OK {os.getpid()}\n" if error is None else "ERR " + " ".join(error.split()) + "\n"
        try:
            os.write(fd, line.encode("utf-8", "replace"))
            os.close(fd)
        except OSError:
            pass  # the CLI went away; keep serving

    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fused.daemon")
    parser.add_argument("image")
    parser.add_argument("mountpoint")
    parser.add_argument("--cache-dir", required=True)
    parser.add_argument("--ready-fd", type=int)
    parser.add_argument("--readahead-kb", type=int, default=DEFAULT_READAHEAD_KB)
    parser.add_argument("--no-prefetch", action="store_true",
                        help="do not fetch the image's prefetch list in the background")
    parser.add_argument("--amplify-bytes", type=int, default=DEFAULT_AMPLIFY)
    parser.add_argument("--fetch-timeout", type=float, default=DEFAULT_FETCH_TIMEOUT)
    parser.add_argument("--retries", type=int, default=DEFAULT_RETRIES)
    parser.add_argument("--metrics-address")
    parser.add_argument("--insecure", action="store_true")
    parser.add_argument("--hosts-dir")
    parser.add_argument("--mode", choices=MODES, default="auto")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s",
    )
    creds = None
    if secret := os.environ.pop(CREDS_ENV, None):  # from `rafs mount --creds`
        user, _, password = secret.partition(":")
        creds = (user, password)
    cfg = DaemonConfig(args.image, args.mountpoint, os.path.abspath(args.cache_dir),
                       readahead_kb=args.readahead_kb, prefetch=not args.no_prefetch,
                       amplify_bytes=args.amplify_bytes, fetch_timeout=args.fetch_timeout,
                       retries=args.retries, metrics_address=args.metrics_address,
                       mode=args.mode,
                       backend=BackendOptions(insecure=True if args.insecure else None,
                                              creds=creds, timeout=args.fetch_timeout,
                                              hosts_dir=args.hosts_dir))
    try:
        run(cfg, _pipe_reporter(args.ready_fd))
    except RafsError as e:
        log.error("%s", e)
        return 1
    except KeyboardInterrupt:
        return 130
    except BaseException:
        log.exception("daemon failed")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
