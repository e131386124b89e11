"""The run directory: where each daemon instance keeps its socket, state and blob mount,
and the one rule that tells a live instance from the leftovers of a dead one.

Layout under ``run_dir()`` (``$RAFS_RUN_DIR``; else ``/run/rafs`` for root,
``$XDG_RUNTIME_DIR/rafs``, ``/tmp/rafs-<uid>``)::

    mounts/<id>/          one daemon instance, <id> = <key>-<nonce>: <key> is the
                          first 16 hex digits of the sha256 of the canonical mount
                          point, <nonce> 8 random hex digits, so no two instances
                          ever share a name
        lock              flock(LOCK_EX)ed by the owner for its whole life
        state.json        what the owner tells the world (below), replaced atomically
        sock              the control socket (0600)
        w<N>              supervised: worker N's own control socket (the supervisor's
                          ``sock`` forwards to the worker that serves)
        blobs/            kernel mode: the blob filesystem's mount point
    mounts/<key>.lock     flock'ed while a client prepares a mount on that mount point
    logs/<id>.log         the daemon's output; removed when it exits cleanly
    images/, runc/        the runtime's (``runtime.paths``)

**Liveness**: an instance is alive exactly while its ``lock`` is locked
(``lock_held``). The kernel drops a flock when the last descriptor of the open
file goes, however its owner dies, so a leftover is recognised without pids
and without the pid-reuse problem. Whoever cleans up a dead instance first
takes its lock (``claim_dead``), so two cleaners never race. An owner builds
its directory under a hidden name (``mounts/.new-*``) with the lock already
held and renames it into place, so an instance is never seen unlocked while
its owner lives.

**Owner and worker**: the *owner* holds the lock, the mounts and the state file
and tears them down; the *worker* answers FUSE requests and the control socket.
A plain daemon is both. A supervised mount (``fused.supervisor``) is owned by
its supervisor while workers come and go under it: ``worker_pid`` changes on
failover and upgrade, and ``phase`` is ``recovering`` while a dead worker is
being replaced. Its state also lists every worker process (``workers``: pid
and start time, so a cleaner never kills a process that reused a pid).

``state.json`` (JSON, for people and for ``rafs ls``)::

    {"id", "format": 1, "rafs_version", "owner_pid", "worker_pid", "mountpoint",
     "image", "mode": "fuse"|"kernel", "cache_dir", "log", "started" (unix time),
     "phase": "starting"|"serving"|"recovering"|"stopping",
     "mount": {"id": MOUNT_ID, "dev": "MAJ:MIN"} | null,   the mount users see
     "fuse_dev": "MAJ:MIN" | null,   the FUSE connection: the image mount in fuse
                                     mode, the blob mount in kernel mode
     supervised only: "supervised": true, "standby_pid", "restarts", "resend",
     "workers": [{"pid", "start"}]}

Nothing here imports trio or FUSE: the command line uses it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import MountError
from .mounts import canonical

__all__ = [
    "STATE_FORMAT",
    "Instance",
    "MountpointLock",
    "OwnedInstance",
    "claim_dead",
    "ensure_run_dir",
    "instance",
    "instances",
    "lock_held",
    "mount_key",
    "new_instance_id",
    "pid_alive",
    "pid_start",
    "prune",
    "run_dir",
    "wait_pids_gone",
]

log = logging.getLogger(__name__)

STATE_FORMAT = 1
KEEP_LOGS = 64  # logs of daemons that did not exit cleanly, newest first
ORPHAN_AGE = 60.0  # seconds: a half-made instance directory older than this is debris
_ID_RE = re.compile(r"^([0-9a-f]{16})-([0-9a-f]{8})$")


def run_dir() -> Path:
    env = os.environ.get("RAFS_RUN_DIR")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/run/rafs")
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / "rafs"
    return Path(f"/tmp/rafs-{os.getuid()}")


def ensure_run_dir() -> Path:
    base = run_dir()
    try:
        for d in (base, base / "mounts", base / "logs"):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise MountError(f"cannot create run directory {base}: {e.strerror}") from None
    return base


def mount_key(mountpoint: str | os.PathLike[str]) -> str:
    mp = canonical(mountpoint)
    return hashlib.sha256(mp.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def new_instance_id(mountpoint: str | os.PathLike[str]) -> str:
    return f"{mount_key(mountpoint)}-{secrets.token_hex(4)}"


# -- locks ------------------------------------------------------------------------------


def lock_held(path: Path) -> bool:
    """Whether someone holds an exclusive flock on ``path`` (the owner is alive)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return False
    except OSError as e:
        log.debug("cannot open %s: %s", path, e.strerror)
        return True  # something is there that we cannot judge: do not trample it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also drops the lock we may just have taken
    return False


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    fst = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (fst.st_dev, fst.st_ino)


def _try_lock(path: Path, *, create: bool) -> int | None:
    """An fd holding the flock of the file that is at ``path`` now, or None if held."""
    flags = os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW | (os.O_CREAT if create else 0)
    while True:
        try:
            fd = os.open(path, flags, 0o600)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        if _same_file(fd, path):
            return fd
        os.close(fd)  # its holder removed it meanwhile: lock what is there now
        if not create:
            return None


class MountpointLock:
    """Held while a client prepares a mount on a mount point (cleans up, starts the
    daemon, waits for it): concurrent ``rafs mount``s of one mount point take turns.
    The lock file is removed when it is released."""

    def __init__(self, mountpoint: str | os.PathLike[str], timeout: float = 300.0) -> None:
        self.path = ensure_run_dir() / "mounts" / f"{mount_key(mountpoint)}.lock"
        deadline = time.monotonic() + timeout
        while (fd := _try_lock(self.path, create=True)) is None:
            if time.monotonic() > deadline:
                raise MountError(f"another mount of {canonical(mountpoint)} is in progress")
            time.sleep(0.05)
        self._fd = fd

    def release(self) -> None:
        if self._fd < 0:
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # while still holding it: the next one makes a new file
        os.close(self._fd)
        self._fd = -1

    def __enter__(self) -> MountpointLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


# -- instances ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Instance:
    """The run state of one daemon instance (it may be alive, dead or half gone)."""

    id: str
    base: Path  # the run directory

    @property
    def dir(self) -> Path:
        return self.base / "mounts" / self.id

    @property
    def key(self) -> str:
        return self.id.partition("-")[0]

    @property
    def lock(self) -> Path:
        return self.dir / "lock"

    @property
    def state_file(self) -> Path:
        return self.dir / "state.json"

    @property
    def socket(self) -> Path:
        return self.dir / "sock"

    @property
    def blobs(self) -> Path:
        return self.dir / "blobs"

    @property
    def log(self) -> Path:
        return self.base / "logs" / f"{self.id}.log"

    def owner_alive(self) -> bool:
        return lock_held(self.lock)

    def state(self) -> dict[str, Any] | None:
        """The state file, or None if there is none (yet) or it is unreadable."""
        try:
            data = json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def exists(self) -> bool:
        return self.dir.is_dir()

    def remove_files(self) -> None:
        """Remove the instance's directory (its owner is gone; mounts already undone).
        A blob mount that could not be undone stays, and so does its directory."""
        for path in (self.state_file, self.state_file.with_suffix(".tmp"), self.socket,
                     *self.dir.glob("w[0-9]*")):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        with contextlib.suppress(FileNotFoundError):
            try:
                self.blobs.rmdir()
            except OSError as e:
                if e.errno in (errno.EBUSY, errno.ENOTEMPTY):
                    log.warning("cannot remove %s: %s", self.blobs, e.strerror)
                    return
                raise
        with contextlib.suppress(FileNotFoundError):
            self.lock.unlink()
        try:
            self.dir.rmdir()
        except FileNotFoundError:
            pass
        except OSError as e:
            log.warning("cannot remove %s: %s", self.dir, e.strerror)


def instance(instance_id: str, base: Path | None = None) -> Instance:
    if _ID_RE.match(instance_id) is None:
        raise MountError(f"bad daemon instance id {instance_id!r}")
    return Instance(instance_id, base if base is not None else run_dir())


def instances(mountpoint: str | os.PathLike[str] | None = None) -> list[Instance]:
    """Every instance in the run directory (of one mount point, if given)."""
    base = run_dir()
    key = mount_key(mountpoint) if mountpoint is not None else None
    try:
        names = sorted(os.listdir(base / "mounts"))
    except FileNotFoundError:
        return []
    out = []
    for name in names:
        m = _ID_RE.match(name)
        if m is not None and (key is None or m.group(1) == key):
            out.append(Instance(name, base))
    return out


@contextlib.contextmanager
def claim_dead(inst: Instance) -> Iterator[bool]:
    """Take a dead instance's lock for the length of its cleanup: yields True when its
    owner is dead and the caller may undo it, False when the owner lives (or another
    cleaner is at it)."""
    fd = _try_lock(inst.lock, create=False)
    if fd is None:
        # No lock file at all: only a directory someone tampered with; old ones go.
        yield (not inst.lock.exists() and _older_than(inst.dir, ORPHAN_AGE)
               and not inst.owner_alive())
        return
    try:
        yield True
    finally:
        os.close(fd)


def _older_than(path: Path, seconds: float) -> bool:
    try:
        return time.time() - path.stat().st_mtime > seconds
    except FileNotFoundError:
        return False


class OwnedInstance:
    """The live owner's handle on its instance: the lock, held until ``close``."""

    def __init__(self, inst: Instance, fd: int) -> None:
        self.instance = inst
        self._fd = fd
        self._state: dict[str, Any] = {"id": inst.id, "format": STATE_FORMAT}
        self._lock = threading.Lock()  # close may come from a watchdog thread

    @classmethod
    def create(cls, instance_id: str) -> OwnedInstance:
        """Make the instance directory with its lock already held: it is built under a
        hidden name and renamed into place, so no one ever sees it unlocked."""
        base = ensure_run_dir()
        inst = instance(instance_id, base)
        tmp = base / "mounts" / f".new-{instance_id}-{secrets.token_hex(4)}"
        try:
            tmp.mkdir(mode=0o700)
            fd = os.open(tmp / "lock", os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise MountError(f"cannot create {tmp}: {e.strerror}") from None
        fcntl.flock(fd, fcntl.LOCK_EX)  # a new file: nobody else knows it
        try:
            os.rename(tmp, inst.dir)  # fails if the target exists (it is a directory)
        except OSError as e:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp / "lock")
                tmp.rmdir()
            raise MountError(f"cannot create {inst.dir}: {e.strerror}") from None
        return cls(inst, fd)

    def write_state(self, **fields: Any) -> None:
        with self._lock:
            if self._fd < 0:
                return
            self._state.update(fields)
            tmp = self.instance.state_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(self._state, sort_keys=True) + "\n")
            tmp.replace(self.instance.state_file)

    @property
    def state(self) -> dict[str, Any]:
        return dict(self._state)

    @property
    def control_socket(self) -> Path:
        return self.instance.socket

    def close(self) -> None:
        """Remove the instance (mounts already undone) and let go of the lock."""
        with self._lock:
            if self._fd < 0:
                return
            try:
                self.instance.remove_files()
            finally:
                os.close(self._fd)
                self._fd = -1


def prune(keep_logs: int = KEEP_LOGS) -> None:
    """Drop debris: half-made instance directories of owners that died while making
    them, mount point locks of clients that died holding them, and the oldest logs
    of instances that are gone (``keep_logs`` stay)."""
    base = run_dir()
    with contextlib.suppress(FileNotFoundError):
        for e in os.scandir(base / "mounts"):
            path = Path(e.path)
            if e.name.startswith(".new-") and _older_than(path, ORPHAN_AGE) \
                    and not lock_held(path / "lock"):
                with contextlib.suppress(OSError):
                    (path / "lock").unlink(missing_ok=True)
                    path.rmdir()
            elif e.name.endswith(".lock") and (fd := _try_lock(path, create=False)) is not None:
                with contextlib.suppress(FileNotFoundError):  # a killed client's
                    path.unlink()
                os.close(fd)
    try:
        entries = [e for e in os.scandir(base / "logs") if e.name.endswith(".log")]
    except FileNotFoundError:
        return
    live = {i.id for i in instances()}
    gone = []
    for e in entries:
        if e.name.removesuffix(".log") not in live:
            with contextlib.suppress(FileNotFoundError):
                gone.append((e.stat().st_mtime, e.path))
    gone.sort(reverse=True)
    for _mtime, path in gone[keep_logs:]:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


# -- processes --------------------------------------------------------------------


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (for waiting on an exit;
    an instance's liveness is its lock, ``Instance.owner_alive``)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def pid_start(pid: int) -> int | None:
    """The start time of process ``pid`` (clock ticks after boot), None if it is gone:
    with the pid it names one process, never a later one that reused the pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()
    return int(fields[19]) if len(fields) > 19 else None


def wait_pids_gone(pids: list[int], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while any(pid_alive(p) for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True
