"""One shared rafs mount per image on this host, counted by the containers using it.

Layout (under ``paths.images_run_dir()``)::

    <digest>.lock         flock'ed while a user is added or removed
    <digest>/mnt          the rafs mount point (lower dir of every overlay)
    <digest>/users/<id>   one file per container using the mount; holds the pid
                          of the process that owns that use (``rafs run``)
    <digest>/keep         present: keep the mount after its last user is gone

Rules (all under the lock, so concurrent ``rafs run``s are safe):

- acquire: if ``mnt`` is a rafs mount whose daemon serves, reuse it;
  otherwise mount it with ``fused.client.mount`` (which first undoes what a
  dead daemon left there; a daemon that does not answer is ended with
  ``force``). Then add the user file.
- release: remove the user file; drop the files of users whose owner process
  is dead (a ``rafs run`` killed with SIGKILL); if no user is left and there is
  no ``keep`` marker, unmount (``fused.client.unmount``: plainly, lazily if
  busy, by force if the daemon does not answer).

The daemon serving a mount is whichever ``rafs run`` came first: later users
share its cache directory and options.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from fused import client
from fused.errors import ControlError, MountError
from fused.mounts import find_mount, read_mounts
from fused.options import DEFAULT_SUPERVISE, MODES, MountOptions
from fused.runstate import pid_alive

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
            if pid_alive(pid):
                out.append(name)
            else:
                log.info("dropping stale user %s of image %s (pid %d is gone)",
                         name, self.key, pid)
                (self.users / name).unlink(missing_ok=True)
        return out


def mount_dir_for(digest: str) -> Path:
    """The mount point of the shared mount of the image with manifest ``digest``."""
    return ImageMount(digest.removeprefix("sha256:")).mnt


def _overlays_on(mnt: Path) -> list[str]:
    """Mount points of the overlays (in this mount namespace) whose lower dir is ``mnt``.

    An overlay holds a private clone of its lower mount, so unmounting ``mnt``
    would succeed under it and the daemon would stop serving its files."""
    needle = f"lowerdir={mnt}"
    return [e.mountpoint for e in read_mounts() if e.fstype == "overlay" and any(
        opt == needle or opt.startswith(needle + ":") for opt in e.super_options.split(","))]


def _unmount(mnt: Path) -> None:
    """Unmount the image and make sure its daemon goes: plainly; lazily if it is busy;
    by force if its daemon does not answer."""
    for how in ({}, {"lazy": True}, {"force": True}):
        try:
            client.unmount(mnt, **how)
            return
        except (MountError, ControlError) as e:
            log.warning("unmounting %s: %s", mnt, e)


def mount_modes() -> tuple[str, ...]:
    """The ``--mode`` values this build's daemon accepts."""
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


def acquire(image: ResolvedImage, user: str, owner_pid: int, cache_dir: str, *,
            mode: str = "fuse", keep: bool = False, timeout: float = 120.0,
            supervise: bool = DEFAULT_SUPERVISE) -> Path:
    """Register ``user`` (a container id) on the image's shared mount, mounting it if
    needed; return the mount point."""
    check_fuse()
    if mode not in MODES:
        raise RunError(f"unknown --mode {mode} (choose from {', '.join(MODES)})")
    m = ImageMount(image.key)
    with m.locked():
        info = client.find(m.mnt)
        if info is not None and info.mounted and info.state == "serving":
            log.info("reusing the mount of %s on %s", image.ref, m.mnt)
        else:
            if info is not None and info.state not in ("dead", "unknown"):
                log.warning("the daemon of %s is %s; ending it", m.mnt, info.state)
                client.unmount(m.mnt, force=True)
            m.mnt.mkdir(parents=True, exist_ok=True)
            m.users.mkdir(exist_ok=True)
            m.keep_marker.unlink(missing_ok=True)
            mounted = client.mount(image.pinned, m.mnt,
                                   MountOptions(cache_dir, mode=mode, supervise=supervise),
                                   timeout=timeout)
            log.info("mounted %s on %s (daemon %s)", image.ref, m.mnt, mounted.pid)
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
