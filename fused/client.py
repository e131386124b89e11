"""The one client API of the daemon: everything that starts, finds, asks or ends one.

The command line (``fused.cli``), the runtime (``rafs run``, ``rafs optimize``),
the snapshotter and the benchmarks call these plain synchronous functions and
nothing below them::

    mount(image, mountpoint, options, *, timeout=120) -> MountInfo
    serve_foreground(image, mountpoint, options, on_ready=None) -> None
    unmount(mountpoint, *, lazy=False, force=False, timeout=30) -> None
    unmount_all(*, lazy=False, force=False) -> list[str]
    find(mountpoint) -> MountInfo | None
    list_mounts() -> list[MountInfo]
    sweep() -> int
    ping(mountpoint) -> int
    stats(mountpoint) -> dict
    metrics(mountpoint) -> str
    trace(mountpoint) -> list[str]
    upgrade(mountpoint) -> MountInfo
    upgrade_all() -> tuple[list[MountInfo], list[str]]

**Mount**: under the mount point's lock (``runstate.mountpoint_lock``), leftovers
on the mount point are undone first (instances whose owner is dead, a dead
rafs mount nobody owns), then ``python -m fused.daemon`` is started detached
(its own session, output to its log) with its configuration on a pipe, and the
call returns once the daemon reports the mount ready. ``options.supervise``
(the default) starts ``python -m fused.supervisor`` instead, unless takeover
cannot work on this host (``fusedev.takeover_blocker``: no FUSE_NOTIFY_RESEND,
no access to /dev/fuse), which is logged once and gives a plain daemon: the supervisor owns the
instance and the mounts, and workers (``fused.worker``) serve it; a worker
that dies is replaced without unmounting, and ``upgrade`` hands the mount to
a worker running the code installed now. When the node service (``rafs
daemon``, ``fused.node``) answers, it forks the daemon or supervisor from a
process that has imported everything (no interpreter start); without it the
process is spawned as described. If the daemon reports an
error, dies, or is not ready in time, nothing stays mounted and MountError
says why, in one line.

**Teardown**, one path for every case, in both modes:

- a live daemon is asked to unmount (``shutdown``; busy is refused unless
  ``lazy``) and waited for; if it does not answer, or does not exit, the call
  fails and says to use ``force``;
- ``force``: the FUSE connection is aborted through fusectl (the FUSE mount's
  in fuse mode, the blob mount's in kernel mode: readers blocked on it fail at
  once, even when the daemon is stopped), the mounts are detached, EROFS
  before the blob mount, the daemon's processes get SIGKILL, and its run
  state goes once its lock is free;
- a dead instance (its owner's lock is free, however it died): the same
  without the kill, except for the workers of a supervisor that died, which
  outlive it: after their connection is aborted, those still alive (named by
  pid *and* start time in the state, never a pid alone) get SIGKILL;
  ``sweep`` does it for every dead instance.

**Another user's mount** (a FUSE mount's ``user_id``; EROFS is root's): a
caller who is neither root nor that user gets ``NotOwnerError`` ("MNT belongs
to root's rafs; run as root") from ``stats``, ``metrics``, ``trace`` and
``unmount``, and nothing is touched. A failed mount's error carries what
libfuse printed to the daemon's log (``failed to open /dev/fuse: ...``).

**States** ``list_mounts`` reports: ``serving`` (answers), ``starting``,
``stopping``, ``recovering`` (its owner lives, its worker does not: a
supervisor is replacing it),
``unresponsive`` (its owner lives but does not answer), ``dead`` (run state
or mount of a daemon that is gone), ``unknown`` (a rafs mount this run
directory knows nothing about: another ``$RAFS_RUN_DIR``'s, or its state was
removed by hand).

Nothing here imports trio or FUSE: ``rafs mount`` only spawns and talks.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from rafs.hosts import load_hosts
from rafs.oci import parse_image_ref

from . import mounts, node, wire
from .cacheconf import load_config
from .control import request
from .errors import ControlError, MountError, NotMountedError, NotOwnerError
from .kernelmount import resolve_mode
from .mounts import BLOB_FSTYPE, MountEntry, abort_connection, canonical, read_mounts
from .options import MountOptions
from .runstate import (
    Instance,
    MountpointLock,
    OwnedInstance,
    claim_dead,
    ensure_run_dir,
    instance,
    instances,
    lock_held,
    new_instance_id,
    pid_alive,
    pid_start,
    prune,
    wait_pids_gone,
)

__all__ = [
    "MountInfo",
    "find",
    "list_mounts",
    "metrics",
    "mount",
    "ping",
    "serve_foreground",
    "stats",
    "sweep",
    "trace",
    "trace_report",
    "unmount",
    "unmount_all",
    "upgrade",
    "upgrade_all",
]

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 120.0
STATUS_TIMEOUT = 2.0  # `rafs ls` does not wait longer for one daemon
EXIT_TIMEOUT = 30.0


@dataclass
class MountInfo:
    """One rafs mount (or the run state of one daemon) as ``rafs ls`` shows it."""

    mountpoint: str
    state: str
    mode: str | None = None
    image: str | None = None
    pid: int | None = None  # the worker: the process answering FUSE requests
    owner_pid: int | None = None  # holds the run state and the mounts
    version: str | None = None
    cache_bytes: int | None = None
    cache_dir: str | None = None
    mounted: bool = False
    id: str | None = None  # the daemon instance
    log: str | None = None
    supervised: bool = False  # owned by a supervisor (failover, upgrade)
    restarts: int | None = None  # supervised: workers replaced so far
    instance: Instance | None = field(default=None, repr=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("instance")
        return out


# -- finding ------------------------------------------------------------------------


def _state(inst: Instance) -> dict[str, Any]:
    return inst.state() or {}


def _owned_entries(inst: Instance, state: dict[str, Any],
                   entries: list[MountEntry]) -> list[MountEntry]:
    """The mounts of the mount table that belong to ``inst``: the one its state
    records, FUSE mounts named after its directory, its blob mount."""
    out = []
    for e in entries:
        if e.is_same(state.get("mount")) or (e.is_fuse and e.source == str(inst.dir)) \
                or (e.fstype == BLOB_FSTYPE and e.mountpoint == str(inst.blobs)):
            out.append(e)
    return out


def _user_mount(inst: Instance, state: dict[str, Any],
                entries: list[MountEntry]) -> MountEntry | None:
    for e in _owned_entries(inst, state, entries):
        if e.is_rafs:
            return e
    return None


def _describe(inst: Instance, entries: list[MountEntry], *, query: bool) -> MountInfo:
    state = _state(inst)
    user = _user_mount(inst, state, entries)
    info = MountInfo(mountpoint=str(state.get("mountpoint", "?")), state="dead",
                     mode=state.get("mode"), image=state.get("image"),
                     pid=state.get("worker_pid"), owner_pid=state.get("owner_pid"),
                     version=state.get("rafs_version"), cache_dir=state.get("cache_dir"),
                     mounted=user is not None, id=inst.id, log=state.get("log"),
                     supervised=bool(state.get("supervised")), restarts=state.get("restarts"),
                     instance=inst)
    if not inst.owner_alive():
        return info
    phase = state.get("phase", "starting")
    worker = state.get("worker_pid")
    if phase in ("starting", "stopping", "recovering"):
        info.state = phase
    elif isinstance(worker, int) and worker != info.owner_pid and not pid_alive(worker):
        info.state = "recovering"
    elif not query:
        info.state = "serving"
    else:
        try:
            reply = request(inst.socket, {"cmd": "status"}, timeout=STATUS_TIMEOUT)
        except (OSError, ControlError):
            info.state = "unresponsive"
        else:
            info.state = "serving" if reply.get("ok") else "unresponsive"
            if reply.get("phase") in ("recovering", "stopping"):
                info.state = reply["phase"]
            info.cache_bytes = reply.get("cache_bytes")
            info.pid = reply.get("pid") or info.pid
            info.version = reply.get("version") or info.version
    return info


def _instances_at(mp: str) -> list[Instance]:
    """Instances of mount point ``mp`` (its key, and its path in the state if known)."""
    out = []
    for inst in instances(mp):
        recorded = _state(inst).get("mountpoint")
        if recorded is None or recorded == mp:
            out.append(inst)
    return out


def list_mounts() -> list[MountInfo]:
    """Every rafs mount of this host (its mount table) and every daemon instance of this
    run directory, each with its state; live daemons are asked in parallel."""
    entries = read_mounts()
    insts = instances()
    with ThreadPoolExecutor(max_workers=8) as pool:
        infos = list(pool.map(lambda i: _describe(i, entries, query=True), insts))
    claimed = {e.mount_id for i in insts for e in _owned_entries(i, _state(i), entries)}
    for e in entries:
        if e.is_rafs and e.mount_id not in claimed:
            infos.append(_foreign(e))
    return sorted(infos, key=lambda i: (i.mountpoint, i.id or ""))


def _foreign(entry: MountEntry) -> MountInfo:
    """A rafs mount no instance of this run directory claims."""
    mode = "kernel" if entry.is_kernel else "fuse"
    info = MountInfo(entry.mountpoint, "unknown", mode=mode, mounted=True)
    source = Path(entry.source)
    if entry.is_fuse and source.is_absolute() and source.parent.name == "mounts":
        # fsname names the instance directory: another run directory's, or ours gone
        alive = lock_held(source / "lock")
        info.state = "unknown" if alive else "dead"
        info.id = source.name
    return info


def find(mountpoint: str | os.PathLike[str]) -> MountInfo | None:
    """The rafs mount on ``mountpoint`` (None if there is none and no daemon of it)."""
    mp = canonical(mountpoint)
    entries = read_mounts()
    top = next((e for e in reversed(entries) if e.mountpoint == mp), None)
    found = None
    for inst in _instances_at(mp):
        info = _describe(inst, entries, query=True)
        if info.state != "dead" or found is None:
            found = info
        if info.mounted and top is not None and top.is_same(_state(inst).get("mount")):
            return info
    if found is None and top is not None and top.is_rafs:
        return _foreign(top)
    return found


def _serving(mountpoint: str | os.PathLike[str]) -> Instance:
    """The live instance whose mount is on ``mountpoint``; NotMountedError if none is."""
    mp = canonical(mountpoint)
    info = find(mp)
    if info is None or (not info.mounted and info.state == "dead"):
        raise NotMountedError(f"{mp} is not a rafs mount")
    if info.instance is None or info.state == "dead":
        top = mounts.find_mount(mp, resolve=False)
        if top is not None:
            _refuse_foreign(top)
        raise ControlError(f"no daemon answers for {mp}")
    return info.instance


def _refuse_foreign(entry: MountEntry) -> None:
    """NotOwnerError if ``entry`` is another user's rafs mount and we are not root: its
    daemon, run state and control socket are that user's; nothing here may touch them."""
    uid = entry.owner_uid
    if os.geteuid() in (0, uid):
        return
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = f"uid {uid}"
    raise NotOwnerError(f"{entry.mountpoint} belongs to {user}'s rafs; run as {user}")


def _ask(mountpoint: str | os.PathLike[str], cmd: str, timeout: float = 30.0
         ) -> dict[str, Any]:
    inst = _serving(mountpoint)
    mp = canonical(mountpoint)
    try:
        reply = request(inst.socket, {"cmd": cmd}, timeout=timeout)
    except (ConnectionRefusedError, FileNotFoundError):
        raise ControlError(f"no daemon answers for {mp}") from None
    if not reply.get("ok"):
        raise ControlError(f"{cmd} of {mp}: {reply.get('error', 'unknown error')}")
    return reply


def ping(mountpoint: str | os.PathLike[str]) -> int:
    """The pid of the daemon answering for ``mountpoint``; ControlError if none answers."""
    return int(_ask(mountpoint, "ping", timeout=10)["pid"])


def stats(mountpoint: str | os.PathLike[str]) -> dict[str, Any]:
    """The daemon's stats reply for a rafs mount."""
    return _ask(mountpoint, "stats")


def metrics(mountpoint: str | os.PathLike[str]) -> str:
    """The mount's counters in the Prometheus text format."""
    return str(_ask(mountpoint, "metrics").get("text", ""))


def trace(mountpoint: str | os.PathLike[str]) -> list[str]:
    """The paths a mount has served, in first-access order."""
    return list(trace_report(mountpoint)["paths"])


def trace_report(mountpoint: str | os.PathLike[str]) -> dict[str, Any]:
    """A mount's whole trace (``fused.trace``: paths, byte ranges, chunk size, truncated)."""
    reply = dict(_ask(mountpoint, "trace", timeout=120))
    if reply.get("truncated"):
        log.warning("the trace of %s is truncated: the daemon keeps the first %d entries",
                    canonical(mountpoint), len(reply["paths"]))
    reply.pop("ok", None)
    return reply


# -- mounting ---------------------------------------------------------------------


def _absolute_ref(image: str) -> str:
    """The image reference with its path made absolute (the daemon runs in /)."""
    ref = parse_image_ref(image)
    if ref.transport in ("oci", "docker-archive"):
        path = os.path.abspath(ref.path)
        if ":" in path:
            raise MountError(f"image path {path} contains ':', which references cannot carry")
        return f"{ref.transport}:{path}" + (f":{ref.tag}" if ref.tag else "")
    return image


def _prepared(image: str, options: MountOptions) -> tuple[str, MountOptions]:
    """The image reference and options as the daemon gets them, checked here first so
    that what is wrong is one line before any daemon starts: kernel mode's host
    check, the cache settings (and the host's cache directory when none is given),
    a registry image's hosts.toml."""
    if options.mode == "kernel":
        resolve_mode("kernel")
    image = _absolute_ref(image)
    config = load_config().with_flags(options.cache_max, options.cache_min_free)
    if options.cache_dir is None:
        options = replace(options, cache_dir=str(config.dir))
    ref = parse_image_ref(image)
    if ref.transport == "docker":
        load_hosts(ref.registry, options.hosts_dir, insecure=options.insecure)
    return image, _supervision(options)


_fallback_logged = False


def _supervision(options: MountOptions) -> MountOptions:
    """``options``, unsupervised where a supervisor could not replace a worker without
    readers seeing errors (``fusedev.takeover_blocker``): one log line per process,
    not an error."""
    global _fallback_logged
    if not options.supervise:
        return options
    from .fusedev import takeover_blocker

    why = takeover_blocker()
    if why is None:
        return options
    if not _fallback_logged:
        _fallback_logged = True
        log.info("mounting without a supervisor: %s (a daemon that dies takes its "
                    "mount with it)", why)
    return replace(options, supervise=False)


def _log_level() -> str:
    return logging.getLevelName(min(logging.getLogger().getEffectiveLevel(), logging.INFO))


def _prepare_mountpoint(mp: str) -> None:
    """Undo what dead daemons left on ``mp``; MountError if a live one serves it."""
    for inst in _instances_at(mp):
        if inst.owner_alive():
            info = _describe(inst, read_mounts(), query=False)
            if info.mounted or info.state == "starting":
                raise MountError(f"{mp} is already a rafs mount (`rafs umount` it first)")
            continue  # a detached mount still serving its open files: not in the way
        _undo_if_dead(inst)
    entries = [e for e in read_mounts() if e.mountpoint == mp]
    top = entries[-1] if entries else None
    if top is None or not top.is_rafs:
        return
    info = _foreign(top)
    if info.state != "dead":
        raise MountError(f"{mp} is already a rafs mount (`rafs umount` it first)")
    log.warning("detaching the dead rafs mount on %s", mp)
    _detach(top, abort=True)


def mount(image: str, mountpoint: str | os.PathLike[str], options: MountOptions, *,
          timeout: float = DEFAULT_TIMEOUT) -> MountInfo:
    """Start a detached daemon serving ``image`` on ``mountpoint``; return once ready."""
    image, options = _prepared(image, options)
    assert options.cache_dir is not None
    mp = canonical(mountpoint)
    ensure_run_dir()
    prune()
    try:
        os.makedirs(options.cache_dir, mode=0o700, exist_ok=True)
    except OSError as e:
        raise MountError(f"cannot create cache directory {options.cache_dir}: "
                         f"{e.strerror}") from None
    with MountpointLock(mp, timeout):
        _prepare_mountpoint(mp)
        inst = instance(new_instance_id(mp))
        proc, ready_fd = _spawn(image, mp, inst, options)
        try:
            reply = _read_ready(ready_fd, timeout)
        finally:
            os.close(ready_fd)
        if reply.get("ok"):
            return _describe(inst, read_mounts(), query=False)
        # Not ready: make sure the daemon is gone and nothing stays mounted.
        timed_out = reply.get("timeout", False)
        _wait_or_kill(proc, 0 if timed_out else 30 if "error" in reply else 5)
        _undo_if_dead(inst)
        message = reply.get("error") or (
            f"the daemon did not get ready within {timeout:g}s" if timed_out
            else _last_line(inst.log) or f"the daemon exited with {proc.returncode}")
        message = _with_native_cause(message, inst.log)
        raise MountError(f"mounting {image} on {mp} failed: {message} (log: {inst.log})")


_NODE_ENV = ("RAFS_RUN_DIR", "RAFS_HOSTS_DIR", "REGISTRY_AUTH_FILE", "DOCKER_CONFIG", "HOME")


def _node_mount(module: str, mp: str, env: dict[str, str], fds: tuple[int, int, int]
                ) -> int | None:
    """The pid of ``module`` forked by the node service, None when none answers."""
    try:
        return node.request_mount(module, ["--mountpoint", mp],
                                  {k: env[k] for k in _NODE_ENV if k in env}, *fds)
    except ControlError as e:
        log.warning("%s; starting the daemon myself", e)
        return None


class _NodeChild:
    """A process the node service forked: not our child, so waited for by its pid."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while pid_alive(self.pid):
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired("node child", timeout or 0)
            time.sleep(0.02)
        self.returncode = 0
        return 0


def _spawn(image: str, mp: str, inst: Instance, options: MountOptions
           ) -> tuple[subprocess.Popen[bytes] | _NodeChild, int]:
    env = dict(os.environ)
    pkg_root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [pkg_root, env.get("PYTHONPATH")]))
    config = {"image": image, "mountpoint": mp, "instance": inst.id,
              "log_level": _log_level(), "options": options.to_wire()}
    module = "fused.supervisor" if options.supervise else "fused.daemon"
    config_r, config_w = os.pipe()
    ready_r, ready_w = os.pipe()
    proc: subprocess.Popen[bytes] | _NodeChild
    try:
        with open(inst.log, "ab") as logf:
            # A running node service (`rafs daemon`) forks it with everything imported.
            child = _node_mount(module, mp, env, (config_r, ready_w, logf.fileno()))
            if child is not None:
                proc = _NodeChild(child)
            else:
                proc = subprocess.Popen(
                    [sys.executable, "-m", module, "--config-fd", str(config_r),
                     "--ready-fd", str(ready_w), "--mountpoint", mp],
                    stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                    pass_fds=(config_r, ready_w), start_new_session=True, cwd="/", env=env,
                )
    except OSError as e:
        os.close(ready_r)
        inst.log.unlink(missing_ok=True)  # nothing was written: no reason to keep it
        raise MountError(f"cannot start the daemon ({sys.executable}): {e.strerror}") from None
    finally:
        os.close(config_r)
        os.close(ready_w)
    try:  # the credentials travel here, never in argv or the environment
        os.write(config_w, wire.frame(config))
    except OSError:
        pass  # it died at once; the ready pipe tells
    finally:
        os.close(config_w)
    return proc, ready_r


def _read_ready(fd: int, timeout: float) -> dict[str, Any]:
    """The daemon's readiness frame, ``{}`` on EOF, ``{"timeout": True}``."""
    deadline = time.monotonic() + timeout
    buf = bytearray()

    def read_exactly(n: int) -> bytes:
        while len(buf) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                piece = os.read(fd, 65536)
                if not piece:
                    break
                buf.extend(piece)
        out = bytes(buf[:n])
        del buf[:n]
        return out

    try:
        reply = wire.read_frame(read_exactly)
    except TimeoutError:
        return {"timeout": True}
    except wire.WireError:
        return {}
    return reply if isinstance(reply, dict) else {}


def _wait_or_kill(proc: subprocess.Popen[bytes] | _NodeChild, grace: float) -> None:
    try:
        proc.wait(timeout=grace)
        return
    except subprocess.TimeoutExpired:
        pass
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


#: A line libfuse or fusermount3 wrote to the daemon's stderr (its log), not our logging:
#: ``fuse: failed to open /dev/fuse: Permission denied``.
_NATIVE_LINE = re.compile(r"^(?:fuse|fusermount3?): (.+)$")


def _with_native_cause(message: str, log_path: Path) -> str:
    """``message`` with what libfuse said in the log: its own error (``fuse_session_mount
    failed``) names no cause, the line libfuse printed before it does."""
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return message
    causes = [m.group(1).strip() for line in lines if (m := _NATIVE_LINE.match(line.strip()))]
    causes = [c for c in dict.fromkeys(causes) if c not in message]
    return f"{message}: {'; '.join(causes)}" if causes else message


def _last_line(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return lines[-1] if lines else ""


def serve_foreground(image: str, mountpoint: str | os.PathLike[str], options: MountOptions,
                     on_ready: Callable[[], None] | None = None) -> None:
    """Serve in this process until unmounted (``rafs mount --foreground``)."""
    from . import daemon  # trio and pyfuse3: only now (a supervisor's workers need them too)

    image, options = _prepared(image, options)
    mp = canonical(mountpoint)
    ensure_run_dir()
    lock = MountpointLock(mp)
    try:
        _prepare_mountpoint(mp)
        owner = OwnedInstance.create(new_instance_id(mp))
    except BaseException:
        lock.release()
        raise

    def ready(error: str | None) -> None:
        lock.release()  # ready or failed: let others at the mount point
        if error is None and on_ready is not None:
            on_ready()

    try:
        if options.supervise:  # this process is the supervisor; workers are spawned
            from .supervisor import Supervisor, SupervisorConfig

            config = {"image": image, "mountpoint": mp, "instance": owner.instance.id,
                      "log_level": _log_level(), "options": options.to_wire()}
            status = Supervisor(SupervisorConfig(image, mp, options, config), owner,
                                ready).run()
            if status != 0:
                raise MountError(f"the supervised mount of {mp} failed (see the log above)")
        else:
            daemon.run(image, mp, options, owner, ready)
    finally:
        lock.release()
        owner.close()


# -- unmounting -------------------------------------------------------------------


def _detach(entry: MountEntry, *, abort: bool) -> None:
    """Detach one mount (abort its FUSE connection first if asked), quietly."""
    if abort and entry.is_fuse:
        with contextlib.suppress(MountError):
            abort_connection(entry.major_minor)
    top = next((e for e in reversed(read_mounts()) if e.mountpoint == entry.mountpoint), None)
    if top is None or top.mount_id != entry.mount_id:
        log.warning("not detaching %s: another mount covers it", entry.mountpoint)
        return
    try:
        mounts.unmount(entry.mountpoint, lazy=True)
    except MountError as e:
        log.warning("cannot detach %s: %s", entry.mountpoint, e)


def _undo(inst: Instance) -> None:
    """Undo the mounts of an instance whose processes are gone, then its run state:
    its FUSE connection aborted (nothing may wait on it), EROFS first, the blob mount
    after it."""
    state = _state(inst)
    entries = read_mounts()
    owned = _owned_entries(inst, state, entries)
    if state.get("erofs_pending") and not any(e.is_kernel for e in owned):
        top = next((e for e in reversed(entries) if e.mountpoint == state.get("mountpoint")),
                   None)
        if top is not None and top.is_kernel and _foreign(top).state == "unknown" \
                and not _claimed_elsewhere(top, inst):
            owned.append(top)  # it died between mounting EROFS and recording it
    for e in owned:
        if e.is_fuse:
            with contextlib.suppress(MountError):
                abort_connection(e.major_minor)
    for e in sorted(owned, key=lambda e: e.fstype == BLOB_FSTYPE):
        _detach(e, abort=False)
    _kill_workers(state)
    inst.remove_files()


def _workers(state: dict[str, Any]) -> list[int]:
    """The supervised workers the state names that are still the same processes."""
    out = []
    for w in state.get("workers") or []:
        pid, start = (w.get("pid"), w.get("start")) if isinstance(w, dict) else (None, None)
        if isinstance(pid, int) and pid > 0 and start is not None and pid_start(pid) == start:
            out.append(pid)
    return out


def _kill_workers(state: dict[str, Any]) -> None:
    """Workers outlive a supervisor that died; their connection is aborted by now, and
    those that still live (a stuck one, a standby that reads only its pipe) go."""
    pids = [p for p in _workers(state) if pid_alive(p)]
    if pids and not wait_pids_gone(pids, 2.0):
        for pid in _workers(state):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        wait_pids_gone(pids, 10.0)


def _claimed_elsewhere(entry: MountEntry, inst: Instance) -> bool:
    return any(other.id != inst.id and entry.is_same(_state(other).get("mount"))
               for other in instances())


def _undo_if_dead(inst: Instance) -> bool:
    with claim_dead(inst) as dead:
        if dead and inst.exists():
            log.info("cleaning up after the dead daemon instance %s (%s)", inst.id,
                     _state(inst).get("mountpoint", "?"))
            _undo(inst)
            return True
    return False


def _kill(inst: Instance, timeout: float) -> None:
    """SIGKILL the instance's processes; wait until its lock is free."""
    pids = _pids(_state(inst))
    if inst.owner_alive():
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while inst.owner_alive():
        if time.monotonic() > deadline:
            raise MountError(f"daemon instance {inst.id} (pids {pids}) does not die")
        time.sleep(0.02)
    wait_pids_gone(pids, max(0.0, deadline - time.monotonic()))


def _force(inst: Instance, timeout: float) -> None:
    """Abort, detach, kill, clean: works whatever state the daemon is in."""
    state = _state(inst)
    entries = read_mounts()
    owned = _owned_entries(inst, state, entries)
    for e in owned:  # readers blocked on the connection fail now, even if it is stopped
        if e.is_fuse:
            abort_connection(e.major_minor)
    dev = state.get("fuse_dev")  # a blob mount detached already (lazily) still serves EROFS
    if isinstance(dev, str) and inst.owner_alive() and \
            not any(e.is_fuse and e.major_minor == dev for e in owned):
        with contextlib.suppress(MountError):  # the owner lives: the number is still its own
            abort_connection(dev)
    for e in sorted(owned, key=lambda e: e.fstype == BLOB_FSTYPE):
        _detach(e, abort=False)
    _kill(inst, timeout)
    _undo_if_dead(inst)


def unmount(mountpoint: str | os.PathLike[str], *, lazy: bool = False, force: bool = False,
            timeout: float = EXIT_TIMEOUT) -> None:
    """Unmount a rafs mount and end its daemon (see the module docstring)."""
    mp = canonical(mountpoint)
    cleaned = False
    live = []
    for inst in _instances_at(mp):
        if inst.owner_alive():
            live.append(inst)
        else:
            cleaned |= _undo_if_dead(inst)
    entries = read_mounts()
    top = next((e for e in reversed(entries) if e.mountpoint == mp), None)
    serving = [i for i in live if top is not None and top.is_same(_state(i).get("mount"))]
    if serving:
        if force:
            _force(serving[0], timeout)
        else:
            _shutdown(serving[0], mp, lazy=lazy, timeout=timeout)
        return
    if force and live:  # starting, or detached and still serving open files
        for inst in live:
            _force(inst, timeout)
        return
    if top is not None and top.is_rafs:
        _refuse_foreign(top)
        log.warning("no daemon of this run directory serves %s; detaching it", mp)
        _detach(top, abort=force or _foreign(top).state == "dead")
        return
    if not cleaned:
        raise NotMountedError(f"{mp} is not a rafs mount")


def _pids(state: dict[str, Any]) -> list[int]:
    named = {state.get("owner_pid"), state.get("worker_pid"), *_workers(state)}
    return sorted({p for p in named if isinstance(p, int) and p > 0 and p != os.getpid()})


def _shutdown(inst: Instance, mp: str, *, lazy: bool, timeout: float) -> None:
    pids = _pids(_state(inst))
    try:
        reply = request(inst.socket, {"cmd": "shutdown", "lazy": lazy}, timeout=timeout + 15)
    except (OSError, ControlError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise MountError(f"the daemon of {mp} does not answer ({reason}); "
                         "`rafs umount --force` ends it") from None
    if not reply.get("ok"):
        raise MountError(f"cannot unmount {mp}: {reply.get('error', 'unknown error')}")
    if reply.get("detached"):
        log.info("%s detached; daemon %s exits once its open files are closed", mp,
                 reply.get("pid"))
        return
    deadline = time.monotonic() + timeout
    while inst.owner_alive():
        if time.monotonic() > deadline:
            log.warning("the daemon of %s did not exit within %gs; killing it", mp, timeout)
            _force(inst, EXIT_TIMEOUT)
            break
        time.sleep(0.02)
    # The lock goes a moment before the process: wait for that too.
    wait_pids_gone(pids, max(1.0, deadline - time.monotonic()))
    _undo_if_dead(inst)  # it died halfway through its own teardown
    top = next((e for e in reversed(read_mounts()) if e.mountpoint == mp), None)
    if top is not None and top.is_same(_state(inst).get("mount")):
        raise MountError(f"{mp} is still mounted after the daemon stopped")


# -- upgrading ---------------------------------------------------------------------


UPGRADE_TIMEOUT = 180.0  # a new worker from a fresh interpreter, on a loaded host


def upgrade(mountpoint: str | os.PathLike[str], *, timeout: float = UPGRADE_TIMEOUT
            ) -> MountInfo:
    """Hand a supervised mount to a new worker running the code installed now, without
    unmounting; return the mount as it is then (the new worker's pid and version)."""
    mp = canonical(mountpoint)
    inst = _serving(mp)
    if not _state(inst).get("supervised"):
        raise MountError(f"cannot upgrade {mp}: it is not supervised (mount it with "
                         "--supervise)")
    try:
        reply = request(inst.socket, {"cmd": "upgrade"}, timeout=timeout)
    except (OSError, ControlError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise ControlError(f"the supervisor of {mp} does not answer ({reason})") from None
    if not reply.get("ok"):
        raise MountError(f"cannot upgrade {mp}: {reply.get('error', 'unknown error')}")
    info = _describe(inst, read_mounts(), query=False)
    info.pid, info.version = reply.get("pid", info.pid), reply.get("version", info.version)
    return info


def upgrade_all(*, timeout: float = UPGRADE_TIMEOUT) -> tuple[list[MountInfo], list[str]]:
    """Upgrade every supervised mount of this run directory: the upgraded ones, and the
    mount points that could not be upgraded (after logging why)."""
    done, failed = [], []
    for info in list_mounts():
        if not info.supervised or info.state not in ("serving", "recovering") \
                or not info.mounted:
            continue
        try:
            done.append(upgrade(info.mountpoint, timeout=timeout))
        except (MountError, ControlError) as e:
            log.error("%s", e)
            failed.append(info.mountpoint)
    return done, failed


def sweep() -> int:
    """Undo every dead instance of this run directory; the number undone."""
    done = sum(_undo_if_dead(inst) for inst in instances() if not inst.owner_alive())
    prune()
    return done


def unmount_all(*, lazy: bool = False, force: bool = False,
                under: str | os.PathLike[str] | None = None) -> list[str]:
    """Unmount every mount of this run directory's daemons (and dead rafs mounts of
    its instances; ``under``: only mount points below that directory); return the
    mount points that could not be unmounted, after logging why."""
    base = canonical(under) if under is not None else None
    failed = []
    for info in list_mounts():
        if info.state == "unknown" or (info.instance is None and info.state != "dead"):
            continue
        if base is not None and not _below(info.mountpoint, base):
            continue
        try:
            if info.instance is not None and not info.mounted:
                if force and info.instance.owner_alive():
                    _force(info.instance, EXIT_TIMEOUT)
                else:
                    _undo_if_dead(info.instance)
                continue
            unmount(info.mountpoint, lazy=lazy, force=force)
        except (MountError, ControlError) as e:
            log.error("%s", e)
            failed.append(info.mountpoint)
    sweep()
    return failed


def _below(path: str, base: str) -> bool:
    return path == base or path.startswith(base.rstrip("/") + "/")
