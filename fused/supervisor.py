"""The supervisor: owns a mount and its FUSE connection; workers come and go under it.

``python -m fused.supervisor IMAGE MOUNTPOINT --cache-dir DIR [daemon options]``
mounts the FUSE filesystem itself (``fused.fusedev``: the image in fuse mode,
the blob filesystem in kernel mode), takes the kernel's ``FUSE_INIT`` off the
device and starts a worker (``python -m fused.worker``, the daemon on an
inherited connection, see ``fused.takeover``). The worker reads and answers
``/dev/fuse`` directly; the supervisor sleeps in ``poll`` on the workers'
pidfds, its signals, its control commands and the device (POLLERR: the
connection ended). Steady state costs the read path nothing.

Failover: a worker that dies (SIGKILL, OOM, a crash) is replaced at once by a
fresh one on the same connection: the mount stays, and readers see a delay.
Each worker serves its own device of the connection (the first the one that
was mounted, which holds the kernel's INIT; each later one a
``FUSE_DEV_IOC_CLONE`` of it), and the supervisor keeps a reference to every
device. When a worker dies, the supervisor writes ``FUSE_NOTIFY_RESEND``
(Linux >= 6.9): the requests it had read but not answered go back in the
input queue and the next worker answers them. Where the kernel lacks that
(``--no-resend`` simulates it), closing the dead worker's device makes the
kernel end exactly those requests with ECONNABORTED: their readers get that
error at once, nothing hangs, and the mount serves on. Without access to
``/dev/fuse`` (a user whose host keeps it root's only) workers share the
mounted device; an old kernel then leaves those requests waiting.

Crash loops: after ``--max-crashes`` crashes within ``--crash-window``
seconds the supervisor gives up: it closes every device, which aborts the
connection (readers get ENOTCONN, never a hang), unmounts and exits 1.

Hot upgrade (control command ``upgrade``): a new worker starts from a fresh
interpreter (so new code) on a clone of the device; once it serves, the old
one gets SIGTERM, answers what it has in hand and exits; after a bound it is
killed and its requests resent.

The control socket (``fused.control``) is the supervisor's: it answers
``ping``, ``shutdown`` (unmount, then the worker ends with the connection)
and ``upgrade`` itself and forwards everything else (stats, metrics, trace)
to the worker's private socket, adding its own view under ``"supervisor"``.
The state file carries the same view (state ``serving`` or ``recovering``,
worker pid, version, restarts).

Stopping: SIGTERM or SIGINT unmount lazily (kernel mode: EROFS, then the blob
filesystem) and stop the worker. SIGHUP is ignored. The supervisor lowers its
own ``oom_score_adj`` so that the kernel's OOM killer picks a worker instead.
If it is killed anyway, the worker keeps serving its connection; lost then are
failover, upgrade and the control socket (``rafs umount`` falls back to
unmounting without it, which ends the worker too).

Imports: the standard library and the light parts of fused only, no trio or
pyfuse3 (a small, quick process).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import queue
import select
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rafs.errors import RafsError

from . import fusedev
from .control import MAX_MESSAGE, SUN_PATH_MAX, ControlPaths, daemon_alive, ensure_run_dir
from .control import paths_for, request
from .errors import ControlError, MountError
from .kernelmount import MODES, resolve_mode
from .kernelmount import umount as kernel_umount
from .mounts import BLOB_FSTYPE, canonical, find_mount, fusermount_unmount
from .options import BLOB_MOUNT_OPTIONS, MOUNT_OPTIONS

__all__ = ["Supervisor", "SupervisorConfig", "code_version", "main"]

log = logging.getLogger("fused.supervisor")  # also when run as __main__

CREDS_ENV = "RAFS_REGISTRY_CREDS"  # as fused.cli (not imported: it would pull the daemon's)
DEFAULT_MAX_CRASHES = 5
DEFAULT_CRASH_WINDOW = 60.0
DRAIN_TIMEOUT = 30.0  # an old worker's grace after an upgrade, then SIGKILL and resend
READY_TIMEOUT = 120.0
OOM_SCORE_ADJ = -900


def code_version() -> str:
    """The package version and a digest of the code a new worker would run."""
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for package in ("rafs", "fused"):
        for path in sorted((root / package).glob("*.py")):
            with contextlib.suppress(OSError):
                h.update(path.name.encode() + b"\0" + path.read_bytes())
    try:
        from importlib.metadata import version

        base = version("rafs")
    except Exception:  # not installed as a distribution
        base = "0"
    return f"{base}+{h.hexdigest()[:12]}"


@dataclass(slots=True)
class SupervisorConfig:
    image: str
    mountpoint: str  # canonical
    cache_dir: str
    mode: str = "auto"
    worker_args: list[str] = field(default_factory=list)  # daemon options, passed on
    log_level: str = "INFO"
    resend: bool = True  # False: behave as on a kernel without FUSE_NOTIFY_RESEND
    max_crashes: int = DEFAULT_MAX_CRASHES
    crash_window: float = DEFAULT_CRASH_WINDOW
    drain_timeout: float = DRAIN_TIMEOUT
    creds: str | None = None
    standby: bool = True  # keep a started worker ready to take over at once


@dataclass(slots=True)
class Worker:
    serial: int
    proc: subprocess.Popen[bytes] | _Forked
    pidfd: int
    device: int  # the supervisor's reference to this worker's device
    ready_fd: int | None  # read end of the worker's readiness pipe
    control_socket: Path
    version: str
    role: str = "current"  # current | standby | upgrade (replaces the current once it serves)
    session_w: int | None = None  # standby: where its INIT goes when it is needed
    state: str = "starting"  # starting | standby | serving | draining
    started: float = field(default_factory=time.monotonic)
    ready_buf: bytes = b""
    killed_at: float | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid


class GiveUp(Exception):
    """The supervisor cannot keep the mount served."""


class Supervisor:
    def __init__(self, cfg: SupervisorConfig, ready: Callable[[str | None], None]) -> None:
        self.cfg = cfg
        self.ready = ready
        self.paths: ControlPaths = paths_for(cfg.mountpoint)
        self.mode = "fuse"
        self.fuse_dir = cfg.mountpoint
        self.init_request = b""
        self.workers: dict[int, Worker] = {}  # by pidfd
        self.current: Worker | None = None
        self.serial = 0
        self.restarts = 0
        self.crashes: deque[float] = deque()
        self.state = "starting"
        self.stopping = False
        self.announced = False
        self.upgraded = False
        self.resend_ok = cfg.resend and fusedev.kernel_has_resend()
        self.commands: queue.Queue[tuple[str, dict[str, Any], queue.Queue[dict[str, Any]]]] = (
            queue.Queue())
        self.pending_upgrade: list[queue.Queue[dict[str, Any]]] = []
        self.pending_shutdown: list[tuple[queue.Queue[dict[str, Any]], dict[str, Any]]] = []
        self.lock = threading.Lock()  # guards what the control threads read
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._cmd_r, self._cmd_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._signals: list[int] = []
        self._listener: socket.socket | None = None
        self._sessions: list[threading.Thread] = []

    # -- setup ------------------------------------------------------------

    def run(self) -> int:
        try:
            self._mount()
            self._serve_control()
            self._start_worker(first=True)
            return self._loop()
        except (GiveUp, RafsError) as e:
            log.error("%s", e)
            self._report(str(e))
            self._teardown(abort=True)
            return 1
        except BaseException as e:
            log.exception("supervisor failed")
            self._report(f"internal error: {type(e).__name__}: {e}")
            self._teardown(abort=True)
            return 2

    def _report(self, error: str | None) -> None:
        if not self.announced:
            self.announced = True
            self.ready(error)

    def _mount(self) -> None:
        cfg = self.cfg
        try:
            st = os.stat(cfg.mountpoint)
        except OSError as e:
            raise MountError(f"mount point {cfg.mountpoint}: {e.strerror}") from None
        if not stat.S_ISDIR(st.st_mode):
            raise MountError(f"mount point {cfg.mountpoint} is not a directory")
        entry = find_mount(cfg.mountpoint)
        if entry is not None and entry.is_rafs:
            raise MountError(f"{cfg.mountpoint} is already a rafs mount (`rafs umount` it first)")
        self.mode, why = resolve_mode(cfg.mode)
        log.info("%s mode: %s", self.mode, why)
        ensure_run_dir()
        if self.mode == "kernel":
            blobs = self.paths.blobs
            entry = find_mount(blobs)
            if entry is not None and entry.fstype == BLOB_FSTYPE:
                log.warning("removing a stale blob mount on %s", blobs)
                kernel_umount(blobs, lazy=True)
            try:
                blobs.mkdir(mode=0o700, exist_ok=True)
            except OSError as e:
                raise MountError(f"cannot create {blobs}: {e.strerror}") from None
            self.fuse_dir, options = str(blobs), set(BLOB_MOUNT_OPTIONS)
        else:
            options = set(MOUNT_OPTIONS)
            if os.geteuid() != 0 and not _user_allow_other():
                log.warning("not root and /etc/fuse.conf lacks user_allow_other: mounting "
                            "without allow_other, only you can see the files")
                options.discard("allow_other")
        self.device = fusedev.mount(self.fuse_dir, options)
        log.info("mounted the FUSE connection on %s", self.fuse_dir)
        self.init_request = fusedev.read_init(self.device)
        if not self.resend_ok:
            log.info("requests in flight when a worker dies fail with ECONNABORTED "
                     "(%s)", "--no-resend" if not cfg.resend else "kernel without "
                     "FUSE_NOTIFY_RESEND")

    def _serve_control(self) -> None:
        sock_path = self.paths.socket
        if len(str(sock_path)) > SUN_PATH_MAX:
            raise MountError(f"control socket path is too long: {sock_path} (set RAFS_RUN_DIR)")
        if sock_path.exists() or sock_path.is_symlink():
            if daemon_alive(sock_path):
                raise MountError(f"another daemon already answers on {sock_path}")
            sock_path.unlink(missing_ok=True)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old_umask = os.umask(0o177)
        try:
            listener.bind(str(sock_path))
        except OSError as e:
            listener.close()
            raise MountError(f"cannot bind control socket {sock_path}: {e.strerror}") from None
        finally:
            os.umask(old_umask)
        listener.listen(16)
        self._listener = listener
        threading.Thread(target=self._accept, name="control", daemon=True).start()

    # -- workers ----------------------------------------------------------

    def _start_worker(self, *, first: bool = False, device: int | None = None,
                      role: str = "current") -> Worker:
        cfg = self.cfg
        if device is None:
            device = self.device
        self.serial += 1
        session_r, session_w = os.pipe2(os.O_CLOEXEC)
        if role != "standby":
            os.write(session_w, self.init_request)  # < a pipe buffer: never blocks
            os.close(session_w)
        ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
        control = self.paths.socket.with_name(
            f"{self.paths.socket.stem}.worker{self.serial}.sock")
        args = [sys.executable, "-m", "fused.worker",
                "--session-fd", str(session_r), "--device-fd", str(device),
                "--control-socket", str(control), "--blob-dir",
                str(self.paths.blobs) if self.mode == "kernel" else "",
                *(["--first"] if first else []), *(["--standby"] if role == "standby" else []),
                cfg.image, cfg.mountpoint, "--cache-dir", cfg.cache_dir,
                "--mode", self.mode, "--ready-fd", str(ready_w),
                "--log-level", cfg.log_level, *cfg.worker_args]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(Path(__file__).resolve().parent.parent), env.get("PYTHONPATH")]))
        if cfg.creds is not None:
            env[CREDS_ENV] = cfg.creds
        from . import node  # light; set when this process was forked by the node service

        forking = node.preloaded_version is not None and role != "upgrade" and not self.upgraded
        version = node.preloaded_version if forking else code_version()
        try:
            if forking:  # everything is imported already: no interpreter to start
                proc: subprocess.Popen[bytes] | _Forked = _fork_worker(
                    args[3:], (session_r, device, ready_w), cfg.creds)
            else:
                # Its own process group: a signal to the supervisor's group does not reach it.
                proc = subprocess.Popen(args, pass_fds=(session_r, device, ready_w),
                                        stdin=subprocess.DEVNULL, cwd="/", env=env,
                                        process_group=0)
        finally:
            os.close(session_r)
            os.close(ready_w)
        try:
            pidfd = os.pidfd_open(proc.pid)
        except OSError:
            proc.kill()
            proc.wait()
            os.close(ready_r)
            raise
        worker = Worker(self.serial, proc, pidfd, device, ready_r, control, str(version), role,
                        session_w if role == "standby" else None)
        with self.lock:
            self.workers[pidfd] = worker
        if role == "current":
            with self.lock:
                self.current = worker
        log.info("worker %d started (pid %d, version %s%s)", worker.serial, worker.pid, version,
                 ", standby" if role == "standby" else "")
        return worker

    def _standby(self) -> Worker | None:
        return next((w for w in self.workers.values() if w.role == "standby"), None)

    def _start_standby(self) -> None:
        cur = self.current
        if not self.cfg.standby or self.stopping or cur is None or self._standby() is not None:
            return
        self._start_worker(device=self._next_device(cur), role="standby")

    def _activate(self, worker: Worker) -> None:
        """Hand the connection to a standby worker: it gets its INIT now."""
        assert worker.session_w is not None
        os.write(worker.session_w, self.init_request)
        os.close(worker.session_w)
        worker.session_w = None
        worker.role = "current"
        if worker.state == "standby":
            worker.state = "serving"
        with self.lock:
            self.current = worker
        log.info("worker %d (pid %d) takes over %s", worker.serial, worker.pid,
                 self.cfg.mountpoint)

    def _next_device(self, old: Worker) -> int:
        """A device for the next worker: a clone of the connection (shares nothing with
        the old worker's queue), else the mounted device itself."""
        try:
            return fusedev.clone(old.device)
        except MountError as e:
            log.warning("%s; the next worker shares the mounted device", e)
            return self.device

    def _release_device(self, worker: Worker, *, resend: bool) -> None:
        """After a worker is gone: resend what it had read but not answered (if asked
        and possible), then close its device unless another worker serves on it.
        Closing a device ends its unanswered requests with ECONNABORTED; after a
        resend it has none. The supervisor watches the current worker's device."""
        if resend and self.resend_ok and not fusedev.resend(worker.device):
            log.warning("the kernel refused FUSE_NOTIFY_RESEND: requests in flight fail")
            self.resend_ok = False
        if any(w.device == worker.device for w in self.workers.values()):
            return
        fusedev.close_quietly(worker.device)
        if worker.device == self.device:
            self.device = self.current.device if self.current is not None else -1

    def _worker_ready(self, worker: Worker) -> None:
        fd = worker.ready_fd
        assert fd is not None
        try:
            piece = os.read(fd, 4096)
        except BlockingIOError:
            return
        worker.ready_buf += piece
        if piece and not worker.ready_buf.endswith(b"\n"):
            return
        os.close(fd)
        worker.ready_fd = None
        line = worker.ready_buf.decode("utf-8", "replace").strip()
        if not line.startswith("OK"):
            log.warning("worker %d did not get ready: %s", worker.serial, line or "no answer")
            return  # it exits; the exit is handled as a crash
        if worker.role == "standby":
            worker.state = "standby"
            log.info("worker %d (pid %d) stands by", worker.serial, worker.pid)
            self._write_state()
            return
        worker.state = "serving"
        log.info("worker %d (pid %d) serves %s", worker.serial, worker.pid,
                 self.cfg.mountpoint)
        if worker.role == "upgrade":
            worker.role = "current"
            self.upgraded = True  # later workers start from the new code too, not forked
            for other in list(self.workers.values()):
                if other is not worker and other.role != "standby":
                    self._drain(other)
                elif other.role == "standby":  # old code: make way for a new standby
                    self._retire(other)
            with self.lock:
                self.current = worker
        self.state = "serving"
        self._write_state()
        self._report(None)
        self._start_standby()
        for reply in self.pending_upgrade:
            reply.put({"ok": True, "pid": os.getpid(), "worker_pid": worker.pid,
                       "version": worker.version})
        self.pending_upgrade.clear()

    def _retire(self, worker: Worker) -> None:
        """Stop a standby that is no longer wanted (it never served: nothing to resend)."""
        worker.role = "retired"
        worker.killed_at = time.monotonic()
        fusedev.close_quietly(worker.session_w)
        worker.session_w = None
        with contextlib.suppress(ProcessLookupError):
            worker.proc.send_signal(signal.SIGTERM)

    def _drain(self, worker: Worker) -> None:
        log.info("worker %d (pid %d): finishing its requests, then exiting", worker.serial,
                 worker.pid)
        worker.state = "draining"
        worker.killed_at = time.monotonic()
        with contextlib.suppress(ProcessLookupError):
            worker.proc.send_signal(signal.SIGTERM)

    def _worker_exited(self, worker: Worker) -> None:
        with self.lock:
            del self.workers[worker.pidfd]
        os.close(worker.pidfd)
        if worker.ready_fd is not None:
            os.close(worker.ready_fd)
            worker.ready_fd = None
        fusedev.close_quietly(worker.session_w)
        worker.session_w = None
        code = worker.proc.wait()
        clean = code == 0
        worker.control_socket.unlink(missing_ok=True)  # a killed worker leaves it
        was_current = self.current is worker
        if was_current:
            with self.lock:
                self.current = None
        log.log(logging.INFO if clean else logging.WARNING, "worker %d (pid %d) exited: %s",
                worker.serial, worker.pid, _describe(code))
        if self.stopping or fusedev.gone(worker.device):
            self._release_device(worker, resend=False)
            if was_current or not self.workers:
                self.stopping = True
                self._retire_standbys()
            return
        if worker.role in ("standby", "retired", "upgrade"):  # it never served
            self._release_device(worker, resend=False)
            if worker.role == "retired":
                return
            if worker.role == "upgrade":
                for reply in self.pending_upgrade:
                    reply.put({"ok": False, "error": f"the new worker exited ({_describe(code)}) "
                               "before it served; the old one serves on"})
                self.pending_upgrade.clear()
            self._count_crash(code)
            self._start_standby()
            return
        if not was_current:
            # An old worker after an upgrade. Even a clean exit can leave requests
            # behind: libfuse drops a request it read just as the session was told to
            # exit (fuse_session_receive_buf_int), so resend them to the new worker.
            self._release_device(worker, resend=True)
            return
        # The current worker died under a live connection: replace it.
        if not self.announced:
            raise GiveUp(f"the first worker exited ({_describe(code)}) before it was ready")
        self._count_crash(code)
        self.state = "recovering"
        self.restarts += 1
        standby = self._standby()
        if standby is not None:
            self._activate(standby)
        else:
            self._start_worker(device=self._next_device(worker))
        self._release_device(worker, resend=True)
        if self.current is not None and self.current.state == "serving":
            self.state = "serving"
            self._start_standby()
        self._write_state()

    def _count_crash(self, code: int) -> None:
        now = time.monotonic()
        self.crashes.append(now)
        while self.crashes and self.crashes[0] < now - self.cfg.crash_window:
            self.crashes.popleft()
        if len(self.crashes) >= self.cfg.max_crashes:
            raise GiveUp(f"{len(self.crashes)} worker crashes within "
                         f"{self.cfg.crash_window:g}s (the last: {_describe(code)}): "
                         "giving up the mount")

    # -- the loop -----------------------------------------------------------

    def _loop(self) -> int:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.set_wakeup_fd(self._wake_w)
        deadline_ready = time.monotonic() + READY_TIMEOUT
        while True:
            if self.stopping and not self.workers:
                break
            poller = select.poll()
            poller.register(self._wake_r, select.POLLIN)
            poller.register(self._cmd_r, select.POLLIN)
            if self.device >= 0 and not self.stopping:
                poller.register(self.device, 0)  # POLLERR: the connection ended
            for w in self.workers.values():
                poller.register(w.pidfd, select.POLLIN)
                if w.ready_fd is not None:
                    poller.register(w.ready_fd, select.POLLIN)
            timeout = self._next_timeout(deadline_ready)
            events = poller.poll(None if timeout is None else max(0, timeout) * 1000)
            for fd, ev in events:
                if fd == self._wake_r:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._wake_r, 256)
                elif fd == self._cmd_r:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._cmd_r, 256)
                elif fd == self.device:
                    if ev & (select.POLLERR | select.POLLHUP | select.POLLNVAL):
                        still = find_mount(self.fuse_dir)
                        log.info("the FUSE connection of %s has ended (poll 0x%x; %s)",
                                 self.cfg.mountpoint, ev, "still mounted" if still is not None
                                 and still.fstype.startswith("fuse") else
                                 f"{self.fuse_dir} was unmounted")
                        self._stop_workers()
                elif fd in self.workers:
                    self._worker_exited(self.workers[fd])
                else:
                    for w in self.workers.values():
                        if w.ready_fd == fd:
                            self._worker_ready(w)
                            break
            self._handle_signals()
            self._handle_commands()
            self._check_deadlines(deadline_ready)
        self._teardown(abort=False)
        return 0

    def _next_timeout(self, deadline_ready: float) -> float | None:
        now = time.monotonic()
        times = [w.killed_at + self.cfg.drain_timeout - now
                 for w in self.workers.values() if w.killed_at is not None]
        times += [w.started + READY_TIMEOUT - now
                  for w in self.workers.values() if w.state == "starting"]
        if not self.announced:
            times.append(deadline_ready - now)
        return min(times) if times else None

    def _check_deadlines(self, deadline_ready: float) -> None:
        now = time.monotonic()
        if not self.announced and now > deadline_ready:
            raise GiveUp(f"the worker did not get ready within {READY_TIMEOUT:g}s")
        for w in self.workers.values():
            if w.state == "starting" and self.announced and now > w.started + READY_TIMEOUT:
                log.warning("worker %d (pid %d) did not get ready in %gs; killing it",
                            w.serial, w.pid, READY_TIMEOUT)
                w.started = now
                with contextlib.suppress(ProcessLookupError):
                    w.proc.kill()
            if w.killed_at is not None and now > w.killed_at + self.cfg.drain_timeout:
                log.warning("worker %d (pid %d) did not finish in %gs; killing it",
                            w.serial, w.pid, self.cfg.drain_timeout)
                w.killed_at = None
                with contextlib.suppress(ProcessLookupError):
                    w.proc.kill()

    def _on_signal(self, signum: int, _frame: object) -> None:
        self._signals.append(signum)

    def _handle_signals(self) -> None:
        while self._signals:
            signum = self._signals.pop(0)
            name = signal.Signals(signum).name
            if self.stopping:
                log.info("got %s: already stopping", name)
                continue
            log.info("got %s: unmounting", name)
            self._unmount(lazy=True)
            self._stop_workers()

    def _stop_workers(self) -> None:
        self.stopping = True
        for w in self.workers.values():
            with contextlib.suppress(ProcessLookupError):
                w.proc.send_signal(signal.SIGTERM)
            if w.killed_at is None:
                w.killed_at = time.monotonic()

    def _retire_standbys(self) -> None:
        """A standby never sees the connection end (it reads only its pipe): stop it."""
        for w in list(self.workers.values()):
            if w.role in ("standby", "upgrade"):
                self._retire(w)

    def _unmount(self, *, lazy: bool) -> None:
        """Unmount what is ours; MountError (busy) leaves it mounted."""
        mp = self.cfg.mountpoint
        entry = find_mount(mp)
        if entry is not None and entry.is_rafs:
            fusermount_unmount(mp, lazy=lazy)
        elif self.mode == "kernel":
            blobs = self.paths.blobs
            entry = find_mount(blobs)
            if entry is not None and entry.fstype == BLOB_FSTYPE:
                kernel_umount(blobs, lazy=True)
            with contextlib.suppress(OSError):
                blobs.rmdir()

    def _teardown(self, *, abort: bool) -> None:
        """Nothing left behind: workers, devices (the last one closed aborts the
        connection), mounts, socket, state."""
        for w in list(self.workers.values()):
            with contextlib.suppress(ProcessLookupError):
                w.proc.kill()
            w.proc.wait()
            fusedev.close_quietly(w.device)
            fusedev.close_quietly(w.session_w)
            os.close(w.pidfd)
        with self.lock:
            self.workers.clear()
        if abort:
            fusedev.close_quietly(self.device)
            self.device = -1
        try:
            self._unmount(lazy=True)
        except MountError as e:
            log.error("cannot unmount %s: %s", self.cfg.mountpoint, e)
        fusedev.close_quietly(self.device)
        if self._listener is not None:
            self._listener.close()
            self.paths.socket.unlink(missing_ok=True)
        self.paths.state.unlink(missing_ok=True)
        for reply in self.pending_upgrade:
            reply.put({"ok": False, "error": "the mount went away"})
        for reply, result in self.pending_shutdown:
            reply.put(result)
        with self.lock:
            sessions = list(self._sessions)
        deadline = time.monotonic() + 5
        for thread in sessions:  # let the replies just queued reach their clients
            thread.join(max(0.0, deadline - time.monotonic()))
        log.info("supervisor of %s done", self.cfg.mountpoint)

    def _write_state(self) -> None:
        info = self.view()
        info.update({"pid": os.getpid(), "mountpoint": self.cfg.mountpoint,
                     "image": self.cfg.image, "mode": self.mode,
                     "cache_dir": self.cfg.cache_dir, "log": str(self.paths.log)})
        tmp = self.paths.state.with_suffix(".tmp")
        tmp.write_text(json.dumps(info) + "\n")
        tmp.replace(self.paths.state)

    def view(self) -> dict[str, Any]:
        """What the supervisor adds to stats and the state file."""
        with self.lock:
            cur = self.current
            standby = self._standby()
        return {"supervised": True, "state": self.state, "supervisor_pid": os.getpid(),
                "worker_pid": cur.pid if cur else None,
                "version": cur.version if cur else None, "restarts": self.restarts,
                "resend": self.resend_ok,
                "standby_pid": standby.pid if standby is not None and
                standby.state == "standby" else None}

    # -- control ------------------------------------------------------------

    def _handle_commands(self) -> None:
        while True:
            try:
                cmd, message, reply = self.commands.get_nowait()
            except queue.Empty:
                return
            try:
                if cmd == "shutdown":
                    self._cmd_shutdown(message, reply)
                elif cmd == "upgrade":
                    self._cmd_upgrade(reply)
            except RafsError as e:
                reply.put({"ok": False, "error": str(e)})

    def _cmd_shutdown(self, message: dict[str, Any], reply: queue.Queue[dict[str, Any]]) -> None:
        lazy = bool(message.get("lazy"))
        if self.stopping:
            reply.put({"ok": True, "pid": os.getpid(), "detached": False})
            return
        log.info("shutdown requested (lazy=%s)", lazy)
        self._unmount(lazy=lazy)  # MountError (busy): refused, still serving
        result = {"ok": True, "pid": os.getpid(), "detached": lazy}
        if lazy:
            reply.put(result)  # the worker serves the open files until the connection ends
            return
        self.pending_shutdown.append((reply, result))
        # The connection ends with the unmount and the worker with it; the drain bound
        # covers one that does not notice.
        self.stopping = True
        self._retire_standbys()
        for w in self.workers.values():
            if w.killed_at is None:
                w.killed_at = time.monotonic()

    def _cmd_upgrade(self, reply: queue.Queue[dict[str, Any]]) -> None:
        cur = self.current
        if cur is None or cur.state != "serving" or self.stopping:
            reply.put({"ok": False, "error": f"cannot upgrade while {self.state}"})
            return
        log.info("upgrade requested: starting a new worker beside worker %d", cur.serial)
        if any(w.role == "upgrade" for w in self.workers.values()):
            reply.put({"ok": False, "error": "an upgrade is already under way"})
            return
        self.pending_upgrade.append(reply)
        self._start_worker(device=self._next_device(cur), role="upgrade")

    def _accept(self) -> None:
        assert self._listener is not None
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            thread = threading.Thread(target=self._session, args=(conn,), daemon=True)
            with self.lock:
                self._sessions = [t for t in self._sessions if t.is_alive()]
                self._sessions.append(thread)
            thread.start()

    def _session(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(30)
            buf = bytearray()
            try:
                while not buf.endswith(b"\n") and len(buf) <= MAX_MESSAGE:
                    piece = conn.recv(65536)
                    if not piece:
                        break
                    buf += piece
                message = json.loads(buf)
                cmd = message["cmd"]
            except (OSError, ValueError, KeyError, TypeError):
                reply: dict[str, Any] = {"ok": False, "error": "bad request"}
            else:
                reply = self._answer(cmd, message)
            conn.settimeout(None)
            with contextlib.suppress(OSError):
                conn.sendall(json.dumps(reply).encode() + b"\n")

    def _answer(self, cmd: str, message: dict[str, Any]) -> dict[str, Any]:
        if cmd == "ping":
            return {"ok": True, "pid": os.getpid(), **self.view()}
        if cmd in ("shutdown", "upgrade"):
            box: queue.Queue[dict[str, Any]] = queue.Queue()
            self.commands.put((cmd, message, box))
            with contextlib.suppress(BlockingIOError):
                os.write(self._cmd_w, b"c")
            return box.get()
        with self.lock:
            cur = self.current
        if cur is None or cur.state == "starting":
            if cmd == "stats":
                return {"ok": True, "pid": os.getpid(), "mountpoint": self.cfg.mountpoint,
                        "mode": self.mode, "image": self.cfg.image,
                        "supervisor": self.view()}
            return {"ok": False, "error": f"the mount is {self.state}"}
        try:
            reply = request(cur.control_socket, message, timeout=120)
        except (ControlError, OSError) as e:
            return {"ok": False, "error": f"worker {cur.pid} did not answer: {e}"}
        if cmd == "stats" and reply.get("ok"):
            reply["worker_pid"] = reply.get("pid")
            reply["pid"] = os.getpid()
            reply["supervisor"] = self.view()
        return reply


class _Forked:
    """A worker forked from this process (see ``fused.node``), as much of Popen as we use."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def wait(self) -> int:
        if self.returncode is None:
            _, status = os.waitpid(self.pid, 0)
            self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def _fork_worker(argv: list[str], keep: tuple[int, ...], creds: str | None) -> _Forked:
    """Fork and run ``fused.worker`` in the child with only ``keep`` (and 0-2) open.

    The supervisor has threads (the control socket); the child uses none of their
    state, and logging re-creates its locks at fork. The child never returns.
    """
    from .worker import main as worker_main  # imported already (fused.node preloads it)

    pid = os.fork()
    if pid:
        return _Forked(pid)
    code = 70
    try:
        signal.set_wakeup_fd(-1)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, signal.SIG_DFL)
        os.setpgid(0, 0)
        for name in os.listdir("/proc/self/fd"):
            fd = int(name)
            if fd > 2 and fd not in keep:
                with contextlib.suppress(OSError):
                    os.close(fd)
        for fd in keep:
            os.set_inheritable(fd, False)
        if creds is not None:
            os.environ[CREDS_ENV] = creds
        os.chdir("/")
        code = worker_main(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 2
    except BaseException:
        with contextlib.suppress(Exception):
            log.exception("forked worker failed")
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _describe(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
        return f"killed by signal {-code}"
    return f"exit status {code}"


def _user_allow_other() -> bool:
    try:
        conf = Path("/etc/fuse.conf").read_text()
    except OSError:
        return False
    return any(line.strip() == "user_allow_other" for line in conf.splitlines())


def _lower_oom_score() -> None:
    try:
        Path("/proc/self/oom_score_adj").write_text(f"{OOM_SCORE_ADJ}\n")
    except OSError as e:  # lowering needs CAP_SYS_RESOURCE
        log.debug("cannot lower oom_score_adj: %s", e.strerror)


# -- python -m fused.supervisor ----------------------------------------------------


def _pipe_reporter(fd: int | None) -> Callable[[str | None], None]:
    def report(error: str | None) -> None:
        if fd is None:
            return
        line = f"OK {os.getpid()}\n" if error is None else "ERR " + " ".join(error.split()) + "\n"
        try:
            os.write(fd, line.encode("utf-8", "replace"))
            os.close(fd)
        except OSError:
            pass

    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fused.supervisor",
        description="Mount IMAGE on MOUNTPOINT and keep it served by a worker; any other "
        "option is the daemon's (python -m fused.daemon --help).")
    parser.add_argument("image")
    parser.add_argument("mountpoint")
    parser.add_argument("--cache-dir", required=True)
    parser.add_argument("--ready-fd", type=int)
    parser.add_argument("--mode", choices=MODES, default="auto")
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--no-resend", action="store_true",
                        help="do not resend the requests of a dead worker (what a kernel "
                        "older than 6.9 does): they fail with ECONNABORTED")
    parser.add_argument("--max-crashes", type=int, default=DEFAULT_MAX_CRASHES)
    parser.add_argument("--crash-window", type=float, default=DEFAULT_CRASH_WINDOW)
    parser.add_argument("--drain-timeout", type=float, default=DRAIN_TIMEOUT)
    parser.add_argument("--no-standby", action="store_true",
                        help="no worker standing by: a failover starts a fresh one (slower, "
                        "half the memory)")
    args, worker_args = parser.parse_known_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s",
    )
    _lower_oom_score()
    cfg = SupervisorConfig(args.image, canonical(args.mountpoint), os.path.abspath(args.cache_dir),
                           mode=args.mode, worker_args=worker_args, log_level=args.log_level,
                           resend=not args.no_resend, max_crashes=max(1, args.max_crashes),
                           crash_window=args.crash_window, drain_timeout=args.drain_timeout,
                           creds=os.environ.pop(CREDS_ENV, None), standby=not args.no_standby)
    if args.ready_fd is not None:
        os.set_inheritable(args.ready_fd, False)
    return Supervisor(cfg, _pipe_reporter(args.ready_fd)).run()


if __name__ == "__main__":
    sys.exit(main())
