"""The supervisor: owns a mount and its FUSE connection; workers come and go under it.

``python -m fused.supervisor --config-fd N --ready-fd M`` (the same
configuration frame and readiness report as ``fused.daemon``, see
``fused.client``) is the *owner* of the daemon instance (``fused.runstate``):
it holds the instance's lock for its whole life, writes its state file, mounts
the FUSE filesystem itself (``fused.fusedev``: the image in fuse mode, the
blob filesystem in kernel mode, ``fsname`` naming the instance), takes the
kernel's ``FUSE_INIT`` off the device and starts a worker (``python -m
fused.worker``, the daemon on an inherited connection, see ``fused.takeover``).
The worker reads and answers ``/dev/fuse`` directly; the supervisor sleeps in
``poll`` on the workers' pidfds, its signals, its control commands, the mount
table (kernel mode) and the device (POLLERR: the connection ended). Steady
state costs the read path nothing.

Failover: a worker that dies (SIGKILL, OOM, a crash) is replaced at once by a
fresh one on the same connection: the mount stays, and readers see a delay.
Each worker serves its own device of the connection (the first the one that
was mounted, which holds the kernel's INIT; each later one a
``FUSE_DEV_IOC_CLONE`` of it), and the supervisor keeps a reference to every
device. When a worker dies, the supervisor writes ``FUSE_NOTIFY_RESEND``
(Linux >= 6.9): the requests it had read but not answered go back in the
input queue and the next worker answers them. Where the kernel lacks that
(``resend=False`` in the options simulates it), closing the dead worker's
device makes the kernel end exactly those requests with ECONNABORTED: their
readers get that error at once, nothing hangs, and the mount serves on.
Without access to ``/dev/fuse`` (a user whose host keeps it root's only)
workers share the mounted device; an old kernel then leaves those requests
waiting. A standby worker, started and set up beforehand, takes over at once
(``standby``); the state says ``recovering`` until the new worker serves.

A worker stopped by a signal (SIGSTOP) answers nothing: its readers wait,
and once that is longer than a read may wait for its answer
(``MountOptions.answer_bound``) the supervisor kills it and the next worker
answers the resent requests. A plain ``shutdown`` that the mount refuses as
busy says when the worker is stopped (``--force`` ends it); every worker told
to stop also gets SIGCONT, so a stopped one ends at once.

Crash loops: after ``max_crashes`` crashes within ``crash_window`` seconds the
supervisor gives up: it closes every device, which aborts the connection
(readers get ENOTCONN, never a hang), unmounts and exits 1.

Hot upgrade (control command ``upgrade``): a new worker starts from a fresh
interpreter (so new code) on a clone of the device; once it serves, the old
one gets SIGTERM, answers what it has in hand and exits; after a bound it is
killed and its requests resent.

The control socket (the instance's ``sock``, ``fused.control`` protocol) is
the supervisor's: it answers ``ping``, ``shutdown`` and ``upgrade`` itself and
forwards everything else (status, stats, metrics, trace) to the serving
worker's private socket, adding its own view (``owner_pid``, the worker's
``version``, ``supervisor``). The state file carries the same view.

Stopping, one teardown whatever the cause (EROFS detached before the blob
filesystem, the connection aborted if a worker is still on it, the workers
stopped, the run state removed): ``shutdown`` (plain: refused while busy;
``lazy``: detached, served until the last open file is closed), SIGTERM or
SIGINT (detached now; kernel mode: EROFS waits for its reads in flight, and
after ``UNMOUNT_GRACE`` the blob connection is aborted so those fail), the
mount disappearing outside rafs (fuse mode: the device reports the end of the
connection; kernel mode: the mount table
watch sees our EROFS mount go, then the blob mount is undone once the EROFS
driver lets go of it). SIGHUP is ignored. The supervisor lowers its own
``oom_score_adj`` so that the kernel's OOM killer picks a worker instead. If
it is killed anyway, its lock goes with it: ``fused.client`` then sees the
instance as dead and undoes it (aborting the connection ends the workers;
the ones still alive, checked by pid and start time, are killed).

Imports: the standard library and the light parts of fused only, no trio or
pyfuse3 (a small, quick process).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
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

from . import fusedev, wire
from .control import SUN_PATH_MAX, request
from .errors import ControlError, MountError
from .kernelmount import resolve_mode
from .mounts import MountTableWatch, abort_connection, find_mount, read_mounts, umount2
from .mounts import unmount as unmount_path
from .options import BLOB_MOUNT_OPTIONS, MOUNT_OPTIONS, MountOptions
from .runstate import OwnedInstance, pid_start

__all__ = ["Supervisor", "SupervisorConfig", "code_version", "main"]

log = logging.getLogger("fused.supervisor")  # also when run as __main__

DRAIN_TIMEOUT = 30.0  # an old worker's grace after an upgrade, then SIGKILL and resend
READY_TIMEOUT = 120.0
BLOBS_POLL = 0.25  # kernel mode, EROFS gone: how often to try the blob mount again
UNMOUNT_GRACE = 5.0  # kernel mode, stopping: EROFS's reads in flight, then the blob
# connection is aborted (as fused.daemon does)
OOM_SCORE_ADJ = -900
STOPPED_CHECK = 1.0  # how often the serving worker is checked for being stopped (SIGSTOP)

# Set by the node service (``fused.node.preload``) before it forks supervisors: the
# version of the code it has imported. A supervisor forked from it forks its workers.
preloaded_version: str | None = None


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
    options: MountOptions
    config: dict[str, Any]  # the configuration frame, passed on to every worker
    drain_timeout: float = DRAIN_TIMEOUT


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
    start_time: int | None = None  # /proc start time: names this process, not its pid
    stopped_since: float | None = None  # first seen stopped (SIGSTOP)

    @property
    def pid(self) -> int:
        return self.proc.pid


class GiveUp(Exception):
    """The supervisor cannot keep the mount served."""


class Supervisor:
    def __init__(self, cfg: SupervisorConfig, owner: OwnedInstance,
                 ready: Callable[[str | None], None]) -> None:
        self.cfg = cfg
        self.opts = cfg.options
        self.owner = owner
        self.inst = owner.instance
        self.ready = ready
        self.mode = "fuse"
        self.fuse_dir = cfg.mountpoint
        self.fuse_dev: str | None = None
        self.erofs: dict[str, object] | None = None  # kernel mode: identity of EROFS
        self.device = -1
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
        self.releasing_blobs = False  # kernel mode: EROFS gone, the blob mount goes next
        self.resend_ok = self.opts.resend and fusedev.kernel_has_resend()
        self.answer_bound = self.opts.answer_bound()
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
        self._watch: MountTableWatch | None = None

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
        self.mode, why = resolve_mode(self.opts.mode)
        log.info("%s mode: %s", self.mode, why)
        self.owner.write_state(
            owner_pid=os.getpid(), worker_pid=None, mode=self.mode, mountpoint=cfg.mountpoint,
            image=cfg.image, cache_dir=self.opts.cache_dir, log=str(self.inst.log),
            rafs_version=code_version(), started=time.time(), phase="starting",
            supervised=True, resend=self.resend_ok, restarts=0, workers=[], standby_pid=None)
        if self.mode == "kernel":
            blobs = self.inst.blobs
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
        fsname = str(self.inst.dir)  # df and `rafs ls` name the instance
        options = {o for o in options if not o.startswith("fsname=")}
        options.add(f"fsname={fsname}" if not set(",\\ \t\n") & set(fsname) else "fsname=rafs")
        self.device = fusedev.mount(self.fuse_dir, options)
        entry = find_mount(self.fuse_dir, resolve=False)  # no stat: nobody answers yet
        self.fuse_dev = entry.major_minor if entry is not None else None
        if self.mode == "kernel":
            self.owner.write_state(fuse_dev=self.fuse_dev, mount=None, erofs_pending=True)
        else:
            self.owner.write_state(fuse_dev=self.fuse_dev,
                                   mount=entry.identity if entry is not None else None)
        log.info("mounted the FUSE connection on %s", self.fuse_dir)
        self.init_request = fusedev.read_init(self.device)
        if not self.resend_ok:
            log.info("requests in flight when a worker dies fail with ECONNABORTED "
                     "(%s)", "resend is off" if not self.opts.resend else "kernel without "
                     "FUSE_NOTIFY_RESEND")

    def _serve_control(self) -> None:
        sock_path = self.inst.socket
        if len(str(sock_path)) > SUN_PATH_MAX:
            raise MountError(f"control socket path is too long: {sock_path} (set RAFS_RUN_DIR)")
        sock_path.unlink(missing_ok=True)  # the instance is ours alone: a leftover of ours
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
        if device is None:
            device = self.device
        self.serial += 1
        session_r, session_w = os.pipe2(os.O_CLOEXEC)
        if role != "standby":
            os.write(session_w, self.init_request)  # < a pipe buffer: never blocks
            os.close(session_w)
        ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
        config_r, config_w = os.pipe2(os.O_CLOEXEC)
        try:  # a few hundred bytes: fits the pipe, never blocks
            os.write(config_w, wire.frame(self.cfg.config))
        finally:
            os.close(config_w)
        # No longer than the instance's own "sock": both must fit a unix socket address.
        control = self.inst.dir / f"w{self.serial % 1000}"
        args = [sys.executable, "-m", "fused.worker",
                "--session-fd", str(session_r), "--device-fd", str(device),
                "--control-socket", str(control),
                *(["--fuse-dev", self.fuse_dev] if self.fuse_dev else []),
                *(["--first"] if first else []), *(["--standby"] if role == "standby" else []),
                "--config-fd", str(config_r), "--ready-fd", str(ready_w),
                "--mountpoint", self.cfg.mountpoint]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(Path(__file__).resolve().parent.parent), env.get("PYTHONPATH")]))
        forking = preloaded_version is not None and role != "upgrade" and not self.upgraded
        version = preloaded_version if forking else code_version()
        keep = (session_r, device, ready_w, config_r)
        try:
            if forking:  # everything is imported already: no interpreter to start
                proc: subprocess.Popen[bytes] | _Forked = _fork_worker(args[3:], keep)
            else:
                # Its own process group: a signal to the supervisor's group does not reach it.
                proc = subprocess.Popen(args, pass_fds=keep, stdin=subprocess.DEVNULL, cwd="/",
                                        env=env, process_group=0)
        finally:
            os.close(session_r)
            os.close(ready_w)
            os.close(config_r)
        try:
            pidfd = os.pidfd_open(proc.pid)
        except OSError:
            proc.kill()
            proc.wait()
            os.close(ready_r)
            raise
        os.set_blocking(ready_r, False)
        worker = Worker(self.serial, proc, pidfd, device, ready_r, control, str(version), role,
                        session_w if role == "standby" else None,
                        start_time=pid_start(proc.pid))
        with self.lock:
            self.workers[pidfd] = worker
        if role == "current":
            with self.lock:
                self.current = worker
        log.info("worker %d started (pid %d, version %s%s)", worker.serial, worker.pid, version,
                 ", standby" if role == "standby" else "")
        self._write_state()
        return worker

    def _standby(self) -> Worker | None:
        return next((w for w in self.workers.values() if w.role == "standby"), None)

    def _start_standby(self) -> None:
        cur = self.current
        if not self.opts.standby or self.stopping or cur is None or self._standby() is not None:
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

    @staticmethod
    def _read_ready(worker: Worker) -> dict[str, Any] | None:
        """The worker's readiness report once it is whole (``{}`` at EOF without one),
        None while more is to come."""
        fd = worker.ready_fd
        assert fd is not None
        try:
            piece = os.read(fd, 4096)
        except BlockingIOError:
            return None
        worker.ready_buf += piece
        buf = worker.ready_buf
        size = wire.payload_size(buf[:wire.HEADER.size]) if len(buf) >= wire.HEADER.size else -1
        if piece and (size < 0 or len(buf) < wire.HEADER.size + size):
            return None
        os.close(fd)
        worker.ready_fd = None
        try:
            reply = wire.decode(buf[wire.HEADER.size:]) if size >= 0 else {}
        except wire.WireError:
            return {}
        return reply if isinstance(reply, dict) else {}

    def _worker_ready(self, worker: Worker) -> None:
        reply = self._read_ready(worker)
        if reply is None:
            return
        if not reply.get("ok"):
            error = reply.get("error")
            log.warning("worker %d did not get ready: %s", worker.serial,
                        error or "no answer")
            if not self.announced and error:
                raise GiveUp(error)  # the first worker: the mount cannot be served
            return  # it exits; the exit is handled as a crash
        recorded = reply.get("state")
        if self.mode == "kernel" and isinstance(recorded, dict) and "mount" in recorded \
                and recorded.get("erofs_pending") is False:
            self.erofs = recorded["mount"]  # the first worker mounted EROFS
            self.owner.write_state(mount=self.erofs, erofs_pending=False)
        if worker.role == "standby":
            worker.state = "standby"
            log.info("worker %d (pid %d) stands by", worker.serial, worker.pid)
            self._write_state()
            return
        worker.state = "serving"
        log.info("worker %d (pid %d) serves %s", worker.serial, worker.pid,
                 self.cfg.mountpoint)
        if worker.role == "upgrade":
            self._promote(worker)
        self.state = "serving"
        self._write_state()
        self._report(None)
        self._start_standby()
        for box in self.pending_upgrade:
            box.put({"ok": True, "pid": worker.pid, "owner_pid": os.getpid(),
                     "version": worker.version})
        self.pending_upgrade.clear()

    def _promote(self, worker: Worker) -> None:
        """An upgrade's new worker serves: the old ones drain, the old standby goes."""
        worker.role = "current"
        self.upgraded = True  # later workers start from the new code too, not forked
        for other in list(self.workers.values()):
            if other is not worker and other.role != "standby":
                self._drain(other)
            elif other.role == "standby":  # old code: make way for a new standby
                self._retire(other)
        with self.lock:
            self.current = worker

    def _retire(self, worker: Worker) -> None:
        """Stop a standby that is no longer wanted (it never served: nothing to resend)."""
        worker.role = "retired"
        worker.killed_at = time.monotonic()
        fusedev.close_quietly(worker.session_w)
        worker.session_w = None
        _terminate(worker)

    def _drain(self, worker: Worker) -> None:
        log.info("worker %d (pid %d): finishing its requests, then exiting", worker.serial,
                 worker.pid)
        worker.state = "draining"
        worker.killed_at = time.monotonic()
        _terminate(worker)

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
        if worker.role in ("standby", "retired", "upgrade"):
            self._lost_unserved(worker, code)
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

    def _lost_unserved(self, worker: Worker, code: int) -> None:
        """A worker that never served exited: nothing to resend; a new standby."""
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

    def _count_crash(self, code: int) -> None:
        now = time.monotonic()
        self.crashes.append(now)
        while self.crashes and self.crashes[0] < now - self.opts.crash_window:
            self.crashes.popleft()
        if len(self.crashes) >= self.opts.max_crashes:
            raise GiveUp(f"{len(self.crashes)} worker crashes within "
                         f"{self.opts.crash_window:g}s (the last: {_describe(code)}): "
                         "giving up the mount")

    # -- the loop -----------------------------------------------------------

    def _loop(self) -> int:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.set_wakeup_fd(self._wake_w)
        if self.mode == "kernel":
            self._watch = MountTableWatch()
        deadline_ready = time.monotonic() + READY_TIMEOUT
        while True:
            if self.stopping and not self.workers:
                break
            timeout = self._next_timeout(deadline_ready)
            events = self._poller().poll(None if timeout is None else max(0, timeout) * 1000)
            for fd, ev in events:
                self._dispatch(fd, ev)
            self._handle_signals()
            self._handle_commands()
            self._check_deadlines(deadline_ready)
        self._teardown(abort=False)
        return 0

    def _poller(self) -> select.poll:
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        poller.register(self._cmd_r, select.POLLIN)
        if self.device >= 0 and not self.stopping:
            poller.register(self.device, 0)  # POLLERR: the connection ended
        if self._watch is not None and self.erofs is not None:
            poller.register(self._watch.fileno(), select.POLLIN)
        for w in self.workers.values():
            poller.register(w.pidfd, select.POLLIN)
            if w.ready_fd is not None:
                poller.register(w.ready_fd, select.POLLIN)
        return poller

    def _dispatch(self, fd: int, ev: int) -> None:
        if fd in (self._wake_r, self._cmd_r):
            with contextlib.suppress(BlockingIOError):
                os.read(fd, 256)
        elif fd == self.device:
            if ev & (select.POLLERR | select.POLLHUP | select.POLLNVAL):
                log.info("the FUSE connection of %s has ended (%s)", self.cfg.mountpoint,
                         "unmounted" if find_mount(self.fuse_dir, resolve=False) is None
                         else "aborted")
                self._stop_workers()
        elif self._watch is not None and fd == self._watch.fileno():
            self._watch.wait(0)
            self._check_erofs()
        elif fd in self.workers:
            self._worker_exited(self.workers[fd])
        else:
            for w in list(self.workers.values()):
                if w.ready_fd == fd:
                    self._worker_ready(w)
                    break

    def _check_erofs(self) -> None:
        """Kernel mode: our EROFS mount left the mount table outside rafs (``umount``,
        a runtime's cleanup): the blob mount goes once the driver lets go of it."""
        if self.erofs is None or any(e.is_same(self.erofs) for e in read_mounts()):
            return
        log.info("the EROFS mount on %s is gone (unmounted outside rafs)", self.cfg.mountpoint)
        self.erofs = None
        self.owner.write_state(mount=None)
        self._set_state("stopping")
        self.releasing_blobs = True

    def _try_release_blobs(self) -> None:
        """Unmount the blob filesystem unless the (detached) EROFS mount still uses it;
        the end of the connection then stops the workers."""
        try:
            umount2(self.fuse_dir)
        except MountError:
            return  # busy: the EROFS driver still holds the blob files
        log.info("the EROFS driver let go of the blob files; stopping")
        self.releasing_blobs = False

    def _next_timeout(self, deadline_ready: float) -> float | None:
        now = time.monotonic()
        times = [w.killed_at + self.cfg.drain_timeout - now
                 for w in self.workers.values() if w.killed_at is not None]
        times += [w.started + READY_TIMEOUT - now
                  for w in self.workers.values() if w.state == "starting"]
        if not self.announced:
            times.append(deadline_ready - now)
        if self.releasing_blobs:
            times.append(BLOBS_POLL)
        if self.current is not None and self.current.state == "serving" and not self.stopping:
            times.append(STOPPED_CHECK)
        return min(times) if times else None

    def _check_deadlines(self, deadline_ready: float) -> None:
        now = time.monotonic()
        if not self.announced and now > deadline_ready:
            raise GiveUp(f"the worker did not get ready within {READY_TIMEOUT:g}s")
        if self.releasing_blobs:
            self._try_release_blobs()
        self._check_stopped(now)
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

    def _check_stopped(self, now: float) -> None:
        """A serving worker stopped (SIGSTOP) answers nothing and its readers wait: once
        that is longer than a read may wait for its answer (``answer_bound``), it is
        killed, and the next worker answers its requests (resent). A tracing stop (a
        debugger) is left alone."""
        w = self.current
        if w is None or w.state != "serving" or self.stopping:
            return
        if not _stopped(w.pid):
            w.stopped_since = None
            return
        if w.stopped_since is None:
            w.stopped_since = now
            log.warning("worker %d (pid %d) is stopped; its readers wait", w.serial, w.pid)
            return
        if now - w.stopped_since > self.answer_bound:
            log.warning("worker %d (pid %d) stopped for %.0fs, longer than a read may wait "
                        "(%.0fs): replacing it", w.serial, w.pid, now - w.stopped_since,
                        self.answer_bound)
            w.stopped_since = None
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
            self._set_state("stopping")
            self._unmount_bounded()
            self._stop_workers()

    def _unmount_bounded(self) -> None:
        """Unmount now (detached, open files fail). Kernel mode: detaching EROFS waits
        for its reads in flight, which a worker may never answer (a read stuck below
        it); after ``UNMOUNT_GRACE`` the blob connection is aborted, those reads fail
        and the unmount completes."""
        def undo() -> None:
            with contextlib.suppress(MountError):
                self._unmount(lazy=True, release=True)

        thread = threading.Thread(target=undo, name="unmount", daemon=True)
        thread.start()
        thread.join(UNMOUNT_GRACE if self.mode == "kernel" else None)
        if thread.is_alive():
            log.warning("EROFS still waits for reads %gs after the stop; aborting the blob "
                        "connection", UNMOUNT_GRACE)
            if self.fuse_dev is not None:
                with contextlib.suppress(MountError):
                    abort_connection(self.fuse_dev)
            thread.join(30)

    def _stop_workers(self) -> None:
        self.stopping = True
        self._set_state("stopping")
        for w in self.workers.values():
            _terminate(w)
            if w.killed_at is None:
                w.killed_at = time.monotonic()

    def _retire_standbys(self) -> None:
        """A standby never sees the connection end (it reads only its pipe): stop it."""
        for w in list(self.workers.values()):
            if w.role in ("standby", "upgrade"):
                self._retire(w)

    def _unmount(self, *, lazy: bool, release: bool = False) -> None:
        """Unmount what is ours, EROFS before the blob filesystem (while workers still
        answer: the driver waits for its reads). MountError (busy) leaves it mounted.
        Kernel mode, ``lazy``: the blob mount goes once the detached EROFS mount lets
        go of it, or now if ``release`` (its open files then fail)."""
        mp = self.cfg.mountpoint
        if self.mode == "kernel":
            if self.erofs is not None:
                entry = find_mount(mp, resolve=False)
                if entry is not None and entry.is_same(self.erofs):
                    umount2(mp, lazy=lazy)
                self.erofs = None
                self.owner.write_state(mount=None)
            if lazy and not release:
                self.releasing_blobs = True
                return
            for _attempt in range(50):  # the driver lets go of the files just after
                try:
                    umount2(self.fuse_dir)
                    return
                except MountError:
                    time.sleep(0.02)
            umount2(self.fuse_dir, lazy=True)
            return
        entry = find_mount(mp, resolve=False)
        recorded = self.owner.state.get("mount")
        if entry is not None and entry.is_same(recorded):
            unmount_path(mp, lazy=lazy)

    def _teardown(self, *, abort: bool) -> None:
        """Nothing left behind: workers, devices (the last one closed aborts the
        connection), mounts, the control socket. The run state goes after it
        (``main``, ``OwnedInstance.close``)."""
        self._set_state("stopping")
        for w in list(self.workers.values()):
            with contextlib.suppress(ProcessLookupError):
                w.proc.kill()
            w.proc.wait()
            fusedev.close_quietly(w.device)
            fusedev.close_quietly(w.session_w)
            os.close(w.pidfd)
            w.control_socket.unlink(missing_ok=True)
        with self.lock:
            self.workers.clear()
            self.current = None
        # No worker is left: abort the connection before detaching, so that nothing
        # (EROFS above all) waits for an answer that cannot come.
        fusedev.close_quietly(self.device)
        self.device = -1
        try:
            self._unmount(lazy=True, release=True)
        except MountError as e:
            log.error("cannot unmount %s: %s", self.cfg.mountpoint, e)
        if self.mode == "fuse":
            entry = find_mount(self.fuse_dir, resolve=False)
            if entry is not None and entry.is_same(self.owner.state.get("mount")):
                with contextlib.suppress(MountError):
                    umount2(self.fuse_dir, lazy=True)
        if self._watch is not None:
            self._watch.close()
            self._watch = None
        if self._listener is not None:
            self._listener.close()
            self.inst.socket.unlink(missing_ok=True)
        for box in self.pending_upgrade:
            box.put({"ok": False, "error": "the mount went away"})
        for box, result in self.pending_shutdown:
            box.put(result)
        with self.lock:
            sessions = list(self._sessions)
        deadline = time.monotonic() + 5
        for thread in sessions:  # let the replies just queued reach their clients
            thread.join(max(0.0, deadline - time.monotonic()))
        log.info("supervisor of %s done", self.cfg.mountpoint)

    def _set_state(self, state: str) -> None:
        if self.state != state:
            self.state = state
            self._write_state()

    def _write_state(self) -> None:
        view = self.view()
        with self.lock:
            workers = [{"pid": w.pid, "start": w.start_time} for w in self.workers.values()]
        phase = view["state"]
        self.owner.write_state(phase="stopping" if self.stopping else phase,
                               worker_pid=view["worker_pid"], standby_pid=view["standby_pid"],
                               restarts=self.restarts, resend=self.resend_ok, workers=workers,
                               **({"rafs_version": view["version"]} if view["version"] else {}))

    def view(self) -> dict[str, Any]:
        """What the supervisor adds to stats and the state file."""
        with self.lock:
            cur = self.current
            standby = self._standby()
        return {"supervised": True, "state": self.state, "owner_pid": os.getpid(),
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
        try:
            self._unmount(lazy=lazy)  # MountError (busy): refused, still serving
        except MountError as e:
            cur = self.current
            if cur is not None and _stopped(cur.pid):
                raise MountError(f"{e}; its worker {cur.pid} is stopped (SIGSTOP) and its "
                                 "readers wait for it: `rafs umount --force` ends it") from None
            raise
        self._set_state("stopping")
        result = {"ok": True, "pid": os.getpid(), "detached": lazy}
        if lazy:
            reply.put(result)  # the worker serves the open files until the connection ends
            return
        self.pending_shutdown.append((reply, result))
        # The connection ended with the unmount; the workers are told too (one that is
        # stopped would never notice), the drain bound covers one that does not end.
        self.stopping = True
        self._retire_standbys()
        for w in self.workers.values():
            _terminate(w)
            if w.killed_at is None:
                w.killed_at = time.monotonic()

    def _cmd_upgrade(self, reply: queue.Queue[dict[str, Any]]) -> None:
        cur = self.current
        if cur is None or cur.state != "serving" or self.stopping:
            reply.put({"ok": False, "error": f"cannot upgrade while {self.state}"})
            return
        if any(w.role == "upgrade" for w in self.workers.values()):
            reply.put({"ok": False, "error": "an upgrade is already under way"})
            return
        log.info("upgrade requested: starting a new worker beside worker %d", cur.serial)
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

            def read_exactly(n: int) -> bytes:
                buf = bytearray()
                while len(buf) < n:
                    piece = conn.recv(min(n - len(buf), 1 << 20))
                    if not piece:
                        break
                    buf += piece
                return bytes(buf)

            try:
                message = wire.read_frame(read_exactly)
                cmd = message["cmd"]
                if not isinstance(cmd, str):
                    raise TypeError(cmd)
            except (OSError, ControlError, KeyError, TypeError):
                reply: dict[str, Any] = {"ok": False, "error": "bad request"}
            else:
                try:
                    reply = self._answer(cmd, message)
                except Exception as e:  # a control thread must answer, whatever happens
                    log.exception("control command %r failed", cmd)
                    reply = {"ok": False, "error": f"internal error: {e}"}
            conn.settimeout(None)
            with contextlib.suppress(OSError):
                conn.sendall(wire.frame(reply))

    def _answer(self, cmd: str, message: dict[str, Any]) -> dict[str, Any]:
        view = self.view()
        if cmd == "ping":
            return {"ok": True, "pid": view["worker_pid"] or os.getpid(),
                    "owner_pid": os.getpid()}
        if cmd in ("shutdown", "upgrade"):
            box: queue.Queue[dict[str, Any]] = queue.Queue()
            self.commands.put((cmd, message, box))
            with contextlib.suppress(BlockingIOError):
                os.write(self._cmd_w, b"c")
            return box.get()
        with self.lock:
            cur = self.current
        if cur is None or cur.state == "starting":
            if cmd == "status":
                return {"ok": True, "pid": None, "owner_pid": os.getpid(), "mode": self.mode,
                        "image": self.cfg.image, "phase": self.state, "version": None}
            return {"ok": False, "error": f"the mount is {self.state}"}
        try:
            reply = request(cur.control_socket, message, timeout=120)
        except (ControlError, OSError) as e:
            return {"ok": False, "error": f"worker {cur.pid} did not answer: {e}"}
        if reply.get("ok") and cmd in ("status", "stats"):
            reply.update(owner_pid=os.getpid(), version=cur.version, supervisor=view)
            if cmd == "status":
                reply["phase"] = self.state
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


def _fork_worker(argv: list[str], keep: tuple[int, ...]) -> _Forked:
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


def _terminate(worker: Worker) -> None:
    """SIGTERM, and SIGCONT after it: a stopped worker (SIGSTOP) then ends as promptly as
    a running one instead of waiting out the drain bound."""
    for signum in (signal.SIGTERM, signal.SIGCONT):
        with contextlib.suppress(ProcessLookupError):
            worker.proc.send_signal(signum)


def _stopped(pid: int) -> bool:
    """Whether ``pid`` is stopped by a signal (SIGSTOP; not a debugger's tracing stop): it
    answers nothing until continued."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return False
    return bool(fields) and fields[0] == "T"


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fused.supervisor",
        description="Own a mount and keep it served by workers (started by fused.client).")
    parser.add_argument("--config-fd", type=int, required=True)
    parser.add_argument("--ready-fd", type=int)
    parser.add_argument("--mountpoint", help="for ps(1) only; the configuration says")
    args = parser.parse_args(argv)
    if args.ready_fd is not None:
        os.set_inheritable(args.ready_fd, False)
    report = wire.ready_reporter(args.ready_fd)
    try:
        config = wire.read_config(args.config_fd, "supervisor")
        logging.basicConfig(
            level=str(config.get("log_level", "INFO")).upper(),
            format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s",
        )
        options = MountOptions.from_wire(config["options"])
        cfg = SupervisorConfig(str(config["image"]), str(config["mountpoint"]), options, config)
        owner = OwnedInstance.create(config["instance"])
    except (RafsError, KeyError, TypeError, ValueError) as e:
        report(f"bad supervisor configuration: {e}")
        return 1
    _lower_oom_score()
    try:
        status = Supervisor(cfg, owner, report).run()
    finally:
        owner.close()
    if status == 0:  # a clean exit: its log is not worth keeping
        owner.instance.log.unlink(missing_ok=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
