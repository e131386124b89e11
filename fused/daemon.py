"""The daemon: open an image, mount it, serve it until it goes or is told to stop.

``Daemon.serve`` is the whole life of one mount; ``_FuseMode`` and
``_KernelMode`` hold what differs between the modes (what FUSE serves and
where, what happens once FUSE answers, how the mount is undone and how its
disappearance is noticed). One ``trio.run`` owns everything through an
``AsyncExitStack`` and one nursery: the backend, the verified bootstrap
(fetched through the backend, checked against the manifest and the
uncompressed-digest annotation, stored in the cache directory, then mmapped),
the chunk cache and its committer task, the fetcher, the control socket, the
signal and mount watchers and pyfuse3's main loop.

The run state is an ``OwnedInstance`` (``fused.runstate``): its lock is held
for the daemon's whole life, its state file says what is mounted (the
mounts' identities, both pids), and it is removed last. This process is both
the instance's owner and its worker; the two roles are kept apart (the owner
creates the instance before the worker serves) so a supervisor can take the
owner's part.

Supervised (``fused.supervisor`` starts it as ``python -m fused.worker``, see
``fused.takeover``): the daemon is then only the *worker*. Its ``owner`` is a
``takeover.WorkerSeat``: the supervisor owns the run state and the mounts and
has mounted FUSE already; the worker serves the connection it is handed
(``/dev/fd/N``), never touches the mount point before serving it, mounts
EROFS only as the first worker of a kernel-mode mount (and reports the mount
in its readiness report), answers its own control socket, and on SIGTERM or
the end of the connection stops serving without unmounting anything.

Start: ``python -m fused.daemon --config-fd N --ready-fd M [--mountpoint MP]``
(the mount point only for ``ps`` to show). The client
writes one ``fused.wire`` frame to N (``image``, ``mountpoint``, ``instance``,
``log_level``, ``options``: ``MountOptions.to_wire()``, credentials included,
so they never show in argv). Once the mount answers a ``stat`` of its root and
the control socket listens, the daemon writes ``{"ok": true, "pid"}`` to M;
if it fails before that, ``{"ok": false, "error": one line}``, and exits
non-zero after cleaning up, so the client never sees a half mount.

Stopping, all ways ending in one teardown (EROFS detached while the blob
filesystem still answers, the FUSE mount undone, the run state removed):

- control ``shutdown``: a plain unmount, refused while busy; ``lazy`` detaches
  and keeps serving open files, exiting once the kernel lets go of the mount.
- the mount disappears outside rafs (``umount``, ``umount -l``, a runtime's
  cleanup): in fuse mode the kernel ends the session (after the last open file
  is closed); in kernel mode a watcher sees our EROFS mount (by mount id and
  device, not path) leave the mount table, and the daemon serves blob data
  until the EROFS driver releases the blob files, then exits.
- SIGTERM, SIGINT, SIGHUP: stop now. Kernel mode detaches EROFS while still
  serving; the EROFS driver waits for its reads in flight, so if that takes
  longer than ``UNMOUNT_GRACE`` the blob connection is aborted (fusectl) and
  those reads fail. Then the main loop ends; requests still running after
  ``UNMOUNT_GRACE`` are cancelled (their readers get an error when the
  connection closes). Nothing waits for an answer that may never come.

Whatever happens below (a worker thread stuck in a system call cannot be
cancelled), the process ends at most ``EXIT_DEADLINE`` seconds after serving
ends: a watchdog thread then aborts the FUSE connection, detaches what is
still mounted, removes the run state and exits.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import signal
import stat
import sys
import threading
import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyfuse3
import trio

import rafs
from rafs.bootstrap import Bootstrap
from rafs.errors import RafsError
from rafs.oci import ImageRef, parse_image_ref
from rafs.trust import bootstrap_layer, raw_bootstrap_digest, verify_bootstrap

from . import takeover, wire
from .backend import Backend, open_backend
from .blobfs import BlobFs, blob_file_name
from .blobops import BLOB_MOUNT_OPTIONS, BlobOperations
from .cache import ChunkCache, cached_bootstrap, store_bootstrap
from .cachehost import held_bootstrap, open_cache, resolve_config
from .control_server import serve as serve_control
from .errors import MountError
from .fetcher import Fetcher
from .fuseops import MOUNT_OPTIONS, Operations
from .kernelmount import KernelMounts, resolve_mode
from .mounts import (
    MountEntry,
    MountTableWatch,
    abort_connection,
    canonical,
    find_mount,
    read_mounts,
    umount2,
    unmount,
)
from .options import MountOptions
from .readahead import FileMap
from .runstate import OwnedInstance, instance
from .stats import Stats
from .trace import AccessTrace, ChunkTrace
from .vfs import ROOT_INO, Vfs

__all__ = ["Daemon", "load_bootstrap", "main", "run"]

log = logging.getLogger("fused.daemon")  # also when run as __main__

UNMOUNT_GRACE = 5.0  # seconds for reads in flight before their connection is aborted
EXIT_DEADLINE = 10.0  # seconds from the end of serving to the end of the process, at most
WATCH_PERIOD = 5.0  # the mount table is also checked this often without an event


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


@dataclass
class _Image:
    """The open image: what both modes serve from."""

    boot_path: Path
    bootstrap: Bootstrap
    cache: ChunkCache
    fetcher: Fetcher
    vfs: Vfs

    async def start(self, stack: AsyncExitStack, nursery: trio.Nursery) -> None:
        """Start the cache committer and the fetcher in ``nursery``; both end before
        the files they use are closed (the stack closes those after the nursery)."""
        await nursery.start(self.cache.run)
        await stack.enter_async_context(self.fetcher.running())


async def _open_image(stack: AsyncExitStack, ref: ImageRef, image: str,
                      options: MountOptions, stats: Stats, *, kernel: bool) -> _Image:
    backend = await stack.enter_async_context(open_backend(ref, options.backend()))
    backend.stats = stats
    cache_dir = str(options.cache_dir)
    # -- the chunk cache (fused.cachehost): bootstrap held in use, index, evictor --
    boot_path, held = await held_bootstrap(lambda: load_bootstrap(backend, cache_dir))
    stack.callback(os.close, held)
    bootstrap = Bootstrap.open(boot_path, stamp=True, fsck=kernel)  # validated
    stack.callback(bootstrap.close)
    cache = open_cache(cache_dir, bootstrap, boot_path, stats,
                       resolve_config(options.cache_max, options.cache_min_free), image)
    stack.callback(cache.close)
    # -- end of the chunk cache --
    fetcher = Fetcher(cache, backend, stats, max_requests=options.max_requests,
                      amplify_bytes=options.amplify_bytes, timeout=options.fetch_timeout,
                      retries=options.retries, dictionaries=bootstrap.dictionary,
                      # read-ahead follows the reader (fused.readahead); across files
                      # only in blobs laid out by observed access (a start-up set)
                      files=functools.partial(FileMap.from_bootstrap, bootstrap),
                      placed_by_access=bool(bootstrap.prefetch or bootstrap.prefetch_ranges))
    return _Image(boot_path, bootstrap, cache, fetcher, Vfs(bootstrap, fetcher, stats))


# -- serving ------------------------------------------------------------------


class Daemon:
    """One mount, from opening its image to removing its run state."""

    def __init__(self, image: str, mountpoint: str, options: MountOptions,
                 owner: OwnedInstance | takeover.WorkerSeat,
                 ready: Callable[[str | None], None]) -> None:
        self.image_ref = image
        self.mountpoint = canonical(mountpoint)
        self.options = options
        self.owner = owner
        self.ready = ready
        self.stats = Stats()
        self.info: dict[str, Any] = {}  # ready_seconds, metrics_address
        self.started = time.perf_counter()
        self._stopping = False
        self._fuse_up = False
        self._main_scope: trio.CancelScope | None = None
        self._shutdown_lock = trio.Lock()
        self.attached = takeover.attachment()  # a supervised worker (fused.takeover)

    async def serve(self) -> None:
        """Mount the image and serve it until it goes; RafsError for what a user can fix
        (``ready`` is then not called: the caller reports the error)."""
        ref = parse_image_ref(self.image_ref)
        if self.attached is None:  # a worker: the mount waits for us, a stat would hang
            _check_mountpoint(self.mountpoint)
        mode, why = resolve_mode(self.options.mode)
        log.info("%s mode: %s", mode, why)
        self.owner.write_state(**self._identity(mode), phase="starting")
        async with AsyncExitStack() as stack:
            self.image = await _open_image(stack, ref, self.image_ref, self.options,
                                           self.stats, kernel=mode == "kernel")
            self.nursery = await stack.enter_async_context(trio.open_nursery())
            await self.image.start(stack, self.nursery)
            self.mode: _Mode = (_KernelMode if mode == "kernel" else _FuseMode)(self)
            self._serve_metrics()
            self.mode.mount_fuse()
            try:
                await self.nursery.start(serve_control, self.owner.control_socket,
                                         self.handlers())
                self.nursery.start_soon(self._watch_signals)
                self.nursery.start_soon(self._become_ready)
                boot = self.image.bootstrap
                if self.options.prefetch and (boot.prefetch or boot.prefetch_ranges):
                    # a standby worker: once it serves, not beside the one that does
                    self.nursery.start_soon(takeover.after_init, _prefetch, self.image,
                                            self.stats)
                await self._main_loop()
            finally:
                self.nursery.cancel_scope.cancel()
                self.mode.teardown()
        log.info("unmounted %s", self.mountpoint)

    def _identity(self, mode: str) -> dict[str, Any]:
        return {"owner_pid": os.getpid(), "worker_pid": os.getpid(), "mode": mode,
                "mountpoint": self.mountpoint, "image": self.image_ref,
                "cache_dir": self.options.cache_dir, "log": str(self.owner.instance.log),
                "rafs_version": rafs.version(), "started": time.time()}

    def _serve_metrics(self) -> None:
        if not self.options.metrics_address:
            return
        from .metrics import new_registry, serve_http  # prometheus_client: only if used

        registry = new_registry(self.stats, {"mountpoint": self.mountpoint})
        host, port = serve_http(self.options.metrics_address, registry)
        self.info["metrics_address"] = f"{host}:{port}"
        log.info("serving Prometheus metrics on http://%s:%d/metrics", host, port)

    async def _become_ready(self) -> None:
        """Finish mounting (kernel mode: EROFS), check the mount answers, report ready."""
        await self.mode.after_fuse_mount()
        st = await trio.to_thread.run_sync(os.stat, self.mountpoint)
        if st.st_ino != ROOT_INO:
            raise MountError(f"{self.mountpoint} does not show the rafs root after mounting")
        self.info["ready_seconds"] = round(time.perf_counter() - self.started, 4)
        self.owner.write_state(phase="serving")
        log.info("serving %s on %s (%s mode)", self.image_ref, self.mountpoint, self.mode.name)
        self.ready(None)
        await self.mode.watch()

    async def _main_loop(self) -> None:
        with trio.CancelScope() as self._main_scope:
            try:
                await pyfuse3.main()
            finally:
                self._fuse_up = False
                self._arm_watchdog()
        log.info("main loop ended")

    def end_main_loop(self) -> None:
        """End the FUSE main loop: idle workers now, requests still running after the grace."""
        self._arm_watchdog()
        if self._fuse_up:
            pyfuse3.terminate()
            self.nursery.start_soon(self._cancel_requests_after, UNMOUNT_GRACE)

    def _arm_watchdog(self) -> None:
        if getattr(self, "_watchdog", None) is None:
            self._watchdog = threading.Timer(EXIT_DEADLINE, self._exit_now)
            self._watchdog.daemon = True
            self._watchdog.start()

    def _exit_now(self) -> None:
        """The last resort (watchdog thread): something below does not end."""
        log.error("still not done %gs after serving ended (a worker thread is stuck); "
                  "tearing down and exiting", EXIT_DEADLINE)
        if self.attached is not None:  # the mounts are the supervisor's
            logging.shutdown()
            os._exit(3)
        try:
            self.mode.abort()
            self.mode.detach_everything()
            self.owner.close()
        finally:
            logging.shutdown()
            os._exit(3)

    async def _cancel_requests_after(self, delay: float) -> None:
        await trio.sleep(delay)
        if self._fuse_up and self._main_scope is not None:
            log.warning("requests still running %gs after the stop; cancelling them", delay)
            self._main_scope.cancel()

    async def stop(self, why: str) -> None:
        """Stop now: take the mounts down while FUSE still answers, then end."""
        if self._stopping:
            log.info("%s: already stopping", why)
            return
        self._stopping = True
        log.info("%s: unmounting", why)
        self.owner.write_state(phase="stopping")
        if self.attached is None:  # a worker leaves the mounts to its supervisor
            await self.mode.detach_now()
        self.end_main_loop()

    async def _watch_signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                self.nursery.start_soon(self.stop, f"got {signal.Signals(signum).name}")

    # -- control handlers ------------------------------------------------------

    def handlers(self) -> dict[str, Callable[[dict[str, Any]], Any]]:
        return {"ping": self.on_ping, "status": self.on_status, "stats": self.on_stats,
                "metrics": self.on_metrics, "trace": self.on_trace,
                "shutdown": self.on_shutdown}

    async def on_ping(self, _: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True, "pid": os.getpid()}

    async def on_status(self, _: dict[str, Any]) -> dict[str, Any]:
        state = self.owner.state
        cache_bytes = await trio.to_thread.run_sync(self._cache_bytes)
        return {"ok": True, "pid": os.getpid(), "owner_pid": state.get("owner_pid"),
                "mode": self.mode.name, "image": self.image_ref, "phase": state.get("phase"),
                "cache_bytes": cache_bytes, "version": state.get("rafs_version")}

    def _cache_bytes(self) -> int:
        """Disk space of this image's blobs in the cache (shared with other images)."""
        total = 0
        for k in range(len(self.image.bootstrap.blobs)):
            with contextlib.suppress(OSError, RafsError):
                fd = self.image.cache.blob_file(k).data_fd
                total += os.fstat(fd).st_blocks * 512 if fd >= 0 else 0
        return total

    async def on_stats(self, _: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True, "pid": os.getpid(), "mountpoint": self.mountpoint,
                "mode": self.mode.name, "image": self.image_ref,
                "cache_dir": self.options.cache_dir, "stats": self.stats.snapshot(), **self.info}

    async def on_metrics(self, _: dict[str, Any]) -> dict[str, Any]:
        from .metrics import new_registry, render

        return {"ok": True, "text": render(new_registry(self.stats,
                                                        {"mountpoint": self.mountpoint}))}

    async def on_trace(self, _: dict[str, Any]) -> dict[str, Any]:
        result = await trio.to_thread.run_sync(self.mode.trace.to_json, self.image.bootstrap)
        return {"ok": True, **result}

    async def on_shutdown(self, message: dict[str, Any]) -> dict[str, Any]:
        if self.attached is not None:
            return {"ok": False, "error": "a supervised worker: ask its supervisor"}
        lazy = bool(message.get("lazy"))
        async with self._shutdown_lock:
            log.info("shutdown requested (lazy=%s)", lazy)
            await self.mode.unmount(lazy=lazy)
            self.owner.write_state(phase="stopping")
            if not lazy:
                self.end_main_loop()
        return {"ok": True, "pid": os.getpid(), "detached": lazy}


class _Mode:
    """What differs between the modes; the defaults are fuse mode's."""

    name: str
    trace: AccessTrace | ChunkTrace

    def __init__(self, daemon: Daemon) -> None:
        self.d = daemon
        self.fuse_mount: dict[str, object] | None = None  # identity of our FUSE mount
        self.fuse_dev: str | None = None  # its MAJOR:MINOR: the connection in fusectl

    def _fuse_options(self, base: frozenset[str]) -> set[str]:
        """``base`` with ``fsname`` naming this instance (``df`` and ``rafs ls`` show it)."""
        fsname = str(self.d.owner.instance.dir)
        options = {o for o in base if not o.startswith("fsname=")}
        options.add(f"fsname={fsname}" if not set(",\\ \t\n") & set(fsname) else "fsname=rafs")
        return options

    def mount_fuse(self) -> None:
        attached = self.d.attached
        if attached is not None:  # the supervisor mounted: serve its connection
            self._serve_handed_over(attached)
            return
        log.info("mounting %s on %s", self.d.image_ref, self.d.mountpoint)
        try:
            pyfuse3.init(self.ops, str(self.fuse_dir), self.fuse_options)
        except RuntimeError as e:
            raise MountError(f"cannot mount on {self.fuse_dir}: {e}") from None
        self.d._fuse_up = True
        entry = find_mount(self.fuse_dir, resolve=False)
        self.fuse_mount = entry.identity if entry is not None else None
        self.fuse_dev = entry.major_minor if entry is not None else None
        self.d.owner.write_state(fuse_dev=self.fuse_dev, **self._mount_record(entry))

    def _serve_handed_over(self, attached: takeover.Attachment) -> None:
        """libfuse takes ``/dev/fd/N`` as mounted already; the device is swapped in at
        INIT (``fused.takeover``). Nothing here looks at the mount point."""
        handover = takeover.arm(attached)
        try:
            pyfuse3.init(self.ops, handover.mountpoint, self.fuse_options)
        except RuntimeError as e:
            raise MountError(f"cannot serve the connection handed over: {e}") from None
        self.d._fuse_up = True
        self.fuse_dev = attached.fuse_dev
        log.info("serving the connection of %s handed over by the supervisor%s",
                 self.d.mountpoint, " (standing by)" if attached.standby else "")

    def _mount_record(self, entry: MountEntry | None) -> dict[str, Any]:
        return {"mount": entry.identity if entry is not None else None}

    def detach_everything(self) -> None:
        """Detach what is still mounted, from any thread (the watchdog's last resort)."""
        entry = find_mount(self.fuse_dir, resolve=False)
        if entry is not None and entry.is_same(self.fuse_mount):
            with contextlib.suppress(MountError):
                umount2(self.fuse_dir, lazy=True)

    def abort(self) -> None:
        """Fail every request of our FUSE connection now (fusectl), quietly. Only while
        our mount is in the table: once it is gone its device number may be another
        mount's (closing /dev/fuse at exit ends a connection that has no mount left)."""
        if not any(e.is_same(self.fuse_mount) for e in read_mounts()):
            return
        try:
            abort_connection(str(self.fuse_dev))
        except MountError as e:
            log.warning("%s", e)

    async def after_fuse_mount(self) -> None:
        if self.d.attached is None or self.d.attached.first:
            _tune_readahead(self.fuse_dev, self.d.options.readahead_kb)

    async def watch(self) -> None:
        """Fuse mode: nothing to watch; the kernel ends the session when the mount goes."""

    async def detach_now(self) -> None:
        """Fuse mode: nothing to do first; ending the loop detaches the mount."""

    async def unmount(self, *, lazy: bool) -> None:
        # Lazy: detached, but open files still use the connection; the kernel ends
        # the session when the last one is closed. Plain: the session ends now.
        await trio.to_thread.run_sync(lambda: unmount(self.d.mountpoint, lazy=lazy))

    def teardown(self) -> None:
        if self.d.attached is not None:  # the mounts are the supervisor's
            pyfuse3.close(unmount=False)
            return
        pyfuse3.close(unmount=True)
        # After an abort libfuse leaves the mount alone: detach it ourselves.
        entry = find_mount(self.fuse_dir, resolve=False)
        if entry is not None and entry.is_same(self.fuse_mount):
            with contextlib.suppress(MountError):
                umount2(self.fuse_dir, lazy=True)


class _FuseMode(_Mode):
    name = "fuse"

    def __init__(self, daemon: Daemon) -> None:
        super().__init__(daemon)
        self.trace = daemon.image.vfs.trace
        self.ops: pyfuse3.Operations = Operations(daemon.image.vfs, daemon.stats)
        self.fuse_dir = Path(daemon.mountpoint)
        self.fuse_options = self._fuse_options(_user_mount_options())


class _KernelMode(_Mode):
    """EROFS over the blob filesystem; FUSE serves only blob data."""

    name = "kernel"

    def __init__(self, daemon: Daemon) -> None:
        super().__init__(daemon)
        img = daemon.image
        self.trace = ChunkTrace()
        self.ops = BlobOperations(BlobFs(img.bootstrap, img.fetcher, daemon.stats, self.trace),
                                  daemon.stats)
        blobs = daemon.owner.instance.blobs  # a worker's: mounted, not answering yet
        self.fuse_dir = blobs if daemon.attached is not None else Path(canonical(blobs))
        self.fuse_options = self._fuse_options(BLOB_MOUNT_OPTIONS)
        self.mounts = KernelMounts(img.boot_path, daemon.mountpoint, self.fuse_dir,
                                   [blob_file_name(k) for k in range(len(img.bootstrap.blobs))])
        if daemon.attached is None:  # a worker's blob directory is mounted already
            self.mounts.prepare()

    def _mount_record(self, entry: MountEntry | None) -> dict[str, Any]:
        return {}  # the mount users see is EROFS, recorded once it exists

    async def after_fuse_mount(self) -> None:
        attached = self.d.attached
        if attached is not None and not attached.first:
            return  # EROFS is mounted over the connection already
        # The EROFS mount opens the blob files: a worker thread, while FUSE answers.
        self.d.owner.write_state(mount=None, erofs_pending=True)
        await trio.to_thread.run_sync(self.mounts.mount_erofs)
        self.d.owner.write_state(mount=self.mounts.erofs, erofs_pending=False)
        _tune_readahead(self.fuse_dev, self.d.options.readahead_kb)
        _tune_readahead(self.mounts.bdi, self.d.options.readahead_kb)

    async def watch(self) -> None:
        """Notice our EROFS mount leaving the mount table outside rafs, then stop once
        the kernel lets go of the blob files (a supervisor does that for its workers)."""
        if self.d.attached is not None:
            return
        watch = MountTableWatch()
        try:
            while self.mounts.erofs is not None:
                with trio.move_on_after(WATCH_PERIOD):
                    await trio.lowlevel.wait_readable(watch.fileno())
                if self.mounts.erofs is not None and not self.mounts.erofs_present():
                    log.info("the EROFS mount on %s is gone (unmounted outside rafs)",
                             self.d.mountpoint)
                    self.mounts.erofs = None
                    self.d.owner.write_state(phase="stopping")
                    self.d.nursery.start_soon(self._release_blobs_when_free)
        finally:
            watch.close()

    async def _bounded(self, fn: Callable[[], None]) -> None:
        """Run an EROFS unmount in a thread while FUSE answers. The driver waits for its
        reads in flight; if they get no answer within the grace, abort the blob
        connection so that they fail and the unmount completes."""
        with trio.move_on_after(UNMOUNT_GRACE) as timer:
            await trio.to_thread.run_sync(fn, abandon_on_cancel=True)
        if timer.cancelled_caught:
            log.warning("unmounting EROFS on %s waits for reads that get no answer; "
                        "aborting the blob connection", self.d.mountpoint)
            self.abort()

    async def detach_now(self) -> None:
        await self._bounded(lambda: self._quietly(lambda: self.mounts.unmount_erofs(lazy=True)))

    @staticmethod
    def _quietly(fn: Callable[[], None]) -> None:
        try:
            fn()
        except MountError as e:
            log.error("%s", e)

    async def unmount(self, *, lazy: bool) -> None:
        """MountError (busy) keeps everything mounted. Lazy: EROFS is detached and the
        blob filesystem served until the detached mount lets go of it."""
        errors: list[MountError] = []

        def erofs() -> None:
            try:
                self.mounts.unmount_erofs(lazy=lazy)
            except MountError as e:
                errors.append(e)

        await self._bounded(erofs)
        if errors:
            raise errors[0]
        if lazy:
            log.info("detached; serving blob data until the last user is gone")
            self.d.nursery.start_soon(self._release_blobs_when_free)
        else:
            await trio.to_thread.run_sync(self.mounts.unmount_blobs)

    async def _release_blobs_when_free(self) -> None:
        """End the blob mount (and the daemon) once EROFS lets go of it."""
        while await trio.to_thread.run_sync(self.mounts.blobs_busy):
            await trio.sleep(0.25)
        log.info("the EROFS driver let go of the blob files; stopping")
        self.d.end_main_loop()

    def detach_everything(self) -> None:
        self._quietly(lambda: self.mounts.unmount_erofs(lazy=True))
        super().detach_everything()

    def teardown(self) -> None:
        if self.d.attached is None and self.mounts.erofs is not None \
                and self.mounts.erofs_present():
            # Never leave EROFS over a dead blob filesystem, and never unmount it once
            # nothing answers its reads: abort them first, then detach.
            self.abort()
            self._quietly(lambda: self.mounts.unmount_erofs(lazy=True))
        super().teardown()


def _user_mount_options() -> frozenset[str]:
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
    return frozenset(options)


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


def _tune_readahead(bdi: str | None, kb: int) -> None:
    """Let the kernel read ahead further than its 128 KiB default (best effort). ``bdi``
    is a mount's backing device name: its MAJOR:MINOR, or EROFS's own ``erofs-N``.
    (Never ``stat`` our own FUSE mount here: the trio thread would wait for itself.)"""
    if kb <= 0 or bdi is None:
        return
    path = Path(f"/sys/class/bdi/{bdi}/read_ahead_kb")
    try:
        path.write_text(f"{kb}\n")
    except OSError as e:
        log.info("cannot set %s: %s", path, e.strerror)
    else:
        log.debug("set %s to %d", path, kb)


async def _prefetch(image: _Image, stats: Stats) -> None:
    """Fetch the start-up set in the background (its chunk ranges; for images without
    them, the files of the prefetch list); cancelled (cleanly) by unmount."""
    nids = image.bootstrap.prefetch
    ranges = image.bootstrap.prefetch_ranges
    try:
        chunks = (image.bootstrap.prefetch_chunks() if ranges else
                  await trio.to_thread.run_sync(lambda: list(image.vfs.chunks_of_nids(nids))))
    except RafsError as e:  # a corrupt bootstrap entry: reads will report it too
        log.warning("prefetch skipped: %s", e)
        stats.prefetch_state = "stopped"
        return
    stats.prefetch_planned = len(chunks)
    stats.prefetch_state = "running"
    log.info("prefetching %d chunks (%s)", len(chunks),
             f"{len(ranges)} ranges" if ranges else f"{len(nids)} files of the prefetch list")
    try:
        done = await image.fetcher.prefetch(chunks)
    except RafsError as e:
        log.warning("prefetch stopped: %s", e)
        stats.prefetch_state = "stopped"
        return
    except trio.Cancelled:
        stats.prefetch_state = "stopped"
        raise
    stats.prefetch_state = "done"
    log.info("prefetch done: %d chunks fetched", done)


def run(image: str, mountpoint: str, options: MountOptions,
        owner: OwnedInstance | takeover.WorkerSeat, ready: Callable[[str | None], None]) -> None:
    """Serve until unmounted; RafsError escapes after ``ready(message)`` if not yet ready."""
    announced = False

    def once(error: str | None) -> None:
        nonlocal announced
        if not announced:
            announced = True
            ready(error)

    try:
        trio.run(Daemon(image, mountpoint, options, owner, once).serve)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fused.daemon")
    parser.add_argument("--config-fd", type=int, required=True)
    parser.add_argument("--ready-fd", type=int)
    parser.add_argument("--mountpoint", help="for ps(1) only; the configuration says")
    args = parser.parse_args(argv)
    attached = takeover.attachment()
    seat: takeover.WorkerSeat | None = None
    report = wire.ready_reporter(args.ready_fd)
    owner: OwnedInstance | takeover.WorkerSeat
    try:
        config = wire.read_config(args.config_fd, "daemon")
        logging.basicConfig(
            level=str(config.get("log_level", "INFO")).upper(),
            format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s",
        )
        options = MountOptions.from_wire(config["options"])
        if attached is not None:
            owner = seat = takeover.WorkerSeat(instance(config["instance"]), attached)
            report = wire.ready_reporter(args.ready_fd, lambda: {"state": seat.state})
        else:
            owner = OwnedInstance.create(config["instance"])
    except (RafsError, KeyError, TypeError, ValueError) as e:
        report(f"bad daemon configuration: {e}")
        return 1
    status = 0
    try:
        run(config["image"], config["mountpoint"], options, owner, report)
    except RafsError as e:
        log.error("%s", e)
        status = 1
    except KeyboardInterrupt:
        status = 130
    except BaseException:
        log.exception("daemon failed")
        status = 2
    finally:
        owner.close()
    if status == 0 and seat is None:  # a clean exit: its log is not worth keeping
        owner.instance.log.unlink(missing_ok=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
