"""One shared rafs mount per image on this host, counted by the containers using it.

Layout (under ``paths.images_run_dir()``)::

    <digest>.lock         flock'ed while a user is added or removed
    <digest>/mnt          the rafs mount point (lower dir of every overlay)
    <digest>/users/<id>   one file per container using the mount; holds the pid
                          of the process that owns that use (``rafs run``)
    <digest>/keep         present: keep the mount after its last user is gone

Rules (all under the lock, so concurrent ``rafs run``s are safe):

- acquire: if ``mnt`` is a rafs mount whose daemon answers, reuse it; a dead
  mount (daemon gone) is detached first; otherwise mount it with
  ``fused.cli.mount_background``. Then add the user file.
- release: remove the user file; drop the files of users whose owner process
  is dead (a ``rafs run`` killed with SIGKILL); if no user is left and there is
  no ``keep`` marker, unmount (``fused.cli.umount``, lazily if busy).

The daemon serving a mount is whichever ``rafs run`` came first: later users
share its cache directory and options.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

from fused.cli import MountOptions, mount_background, umount
from fused.control import daemon_alive, paths_for
from fused.errors import MountError
from fused.mounts import find_mount, fusermount_unmount

from .errors import FuseMissingError, RunError
from .image import ResolvedImage
from .paths import images_run_dir

__all__ = ["ImageMount", "acquire", "check_fuse", "mount_dir_for", "mount_modes", "release"]

log = logging.getLogger(__name__)

FUSE_DEVICE = "/dev/fuse"


class ImageMount:
    def __init__(self, key: str) -> None:
        self.key = key
        self.dir = images_run_dir() / key
        self.mnt = self.dir / "mnt"
        self.users = self.dir / "users"
        self.keep_marker = self.dir / "keep"
        self.lock_path = images_run_dir() / f"{key}.lock"

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        self.lock_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def is_mounted(self) -> bool:
        """Whether the image is mounted (a rafs FUSE mount, or kernel mode's EROFS)."""
        entry = find_mount(self.mnt)
        return entry is not None and entry.is_rafs

    def live_users(self) -> list[str]:
        """Container ids using the mount whose owner process still lives."""
        out = []
        try:
            names = sorted(os.listdir(self.users))
        except FileNotFoundError:
            return []
        for name in names:
            try:
                pid = int((self.users / name).read_text().strip() or "0")
            except (OSError, ValueError):
                pid = 0
            if _alive(pid):
                out.append(name)
            else:
                log.info("dropping stale user %s of image %s (pid %d is gone)",
                         name, self.key, pid)
                (self.users / name).unlink(missing_ok=True)
        return out


def mount_dir_for(digest: str) -> Path:
    """The mount point of the shared mount of the image with manifest ``digest``."""
    return ImageMount(digest.removeprefix("sha256:")).mnt


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


def _overlays_on(mnt: Path) -> list[str]:
    """Mount points of the overlays (in this mount namespace) whose lower dir is ``mnt``.

    An overlay holds a private clone of its lower mount, so unmounting ``mnt``
    would succeed under it and the daemon would stop serving its files."""
    needle = f"lowerdir={mnt}"
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields = right.split()
        if len(fields) >= 3 and fields[0] == "overlay" and any(
                opt == needle or opt.startswith(needle + ":") for opt in fields[2].split(",")):
            out.append(left.split()[4])
    return out


def _daemon_pid(mnt: Path) -> int | None:
    try:
        pid = json.loads(paths_for(mnt).state.read_text()).get("pid")
    except (OSError, ValueError, AttributeError):
        return None
    return pid if isinstance(pid, int) else None


def _unmount(mnt: Path) -> None:
    """Unmount the image and make sure its daemon goes: plainly; lazily if that fails
    while it is still mounted; and a daemon left running with nothing mounted (a
    failed shutdown) is stopped with SIGTERM."""
    pid = _daemon_pid(mnt)
    try:
        umount(str(mnt))
        return
    except MountError as e:
        log.warning("unmounting %s: %s", mnt, e)
    entry = find_mount(mnt)
    if entry is not None and entry.is_rafs:
        try:
            umount(str(mnt), lazy=True)  # the daemon exits once the mount is let go
            return
        except MountError as e:
            log.warning("detaching %s: %s", mnt, e)
    if pid is not None and _alive(pid):
        log.warning("stopping daemon %d of %s", pid, mnt)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)


def mount_modes() -> tuple[str, ...]:
    """The ``--mode`` values this build's daemon accepts."""
    from fused.kernelmount import MODES

    return MODES


def check_fuse() -> None:
    """FuseMissingError unless /dev/fuse is a usable character device."""
    import stat

    try:
        st = os.stat(FUSE_DEVICE)
    except FileNotFoundError:
        raise FuseMissingError(f"{FUSE_DEVICE} is missing: load the fuse module "
                               "(modprobe fuse) to run RAFS images") from None
    except OSError as e:
        raise FuseMissingError(f"{FUSE_DEVICE}: {e.strerror}") from None
    if not stat.S_ISCHR(st.st_mode):
        raise FuseMissingError(f"{FUSE_DEVICE} is not a character device: FUSE is unusable")
    if not os.access(FUSE_DEVICE, os.R_OK | os.W_OK):
        raise FuseMissingError(f"{FUSE_DEVICE} is not readable and writable for this user")


def _mount_options(mode: str) -> MountOptions:
    if mode not in mount_modes():
        raise RunError(f"unknown --mode {mode} (choose from {', '.join(mount_modes())})")
    return MountOptions(mode=mode)


def acquire(image: ResolvedImage, user: str, owner_pid: int, cache_dir: str, *,
            mode: str = "fuse", keep: bool = False, timeout: float = 120.0) -> Path:
    """Register ``user`` (a container id) on the image's shared mount, mounting it if
    needed; return the mount point."""
    check_fuse()
    options = _mount_options(mode)
    m = ImageMount(image.key)
    with m.locked():
        if m.is_mounted() and not daemon_alive(paths_for(m.mnt).socket):
            log.warning("the daemon of %s is gone; detaching its mount", m.mnt)
            entry = find_mount(m.mnt)
            with contextlib.suppress(MountError):
                if entry is not None and entry.is_kernel:
                    from fused.kernelmount import umount as kernel_umount

                    kernel_umount(m.mnt, lazy=True)
                else:
                    fusermount_unmount(m.mnt, lazy=True)
        if not m.is_mounted():
            m.mnt.mkdir(parents=True, exist_ok=True)
            m.users.mkdir(exist_ok=True)
            m.keep_marker.unlink(missing_ok=True)
            pid = mount_background(image.pinned, str(m.mnt), cache_dir, timeout=timeout,
                                   options=options)
            log.info("mounted %s on %s (daemon %d)", image.ref, m.mnt, pid)
        else:
            log.info("reusing the mount of %s on %s", image.ref, m.mnt)
        m.users.mkdir(exist_ok=True)
        (m.users / user).write_text(f"{owner_pid}\n")
        if keep:
            m.keep_marker.touch()
    return m.mnt


def release(key: str, user: str) -> None:
    """Drop ``user`` from the image's mount; unmount when it was the last one."""
    m = ImageMount(key)
    with m.locked():
        (m.users / user).unlink(missing_ok=True)
        left = m.live_users()
        if left:
            log.info("image %s stays mounted for %d more container(s)", key, len(left))
            return
        if m.keep_marker.exists():
            log.info("image %s stays mounted on %s (--keep-mounted)", key, m.mnt)
            return
        if overlays := _overlays_on(m.mnt):
            log.warning("image %s has no registered user left but overlays still use it "
                        "(%s); leaving it mounted", key, ", ".join(overlays))
            return
        if m.is_mounted():
            _unmount(m.mnt)
        if not m.is_mounted():
            shutil.rmtree(m.dir, ignore_errors=True)
