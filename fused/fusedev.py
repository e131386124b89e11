"""The /dev/fuse device as a supervisor uses it: mount, read INIT, clone, resend, abort.

Mounting without libfuse: as root, ``open("/dev/fuse")`` and ``mount(2)`` with
``fd=N,rootmode=...,user_id=...,group_id=...`` and the daemon's options
(``fused.fuseproto.mount_data``); as another user, ``fusermount3`` mounts and
passes the device back over the socket named by ``_FUSE_COMMFD`` (SCM_RIGHTS),
as libfuse itself does. Either way the kernel then queues ``FUSE_INIT``, which
``read_init`` takes off the device and keeps.

``clone`` opens another device of the same connection (``FUSE_DEV_IOC_CLONE``):
it has its own queue of requests read but not answered, which the kernel ends
with ECONNABORTED when the last descriptor of that device is closed.
``resend`` writes ``FUSE_NOTIFY_RESEND`` (Linux >= 6.9), which puts every such
request of every device of the connection back in the input queue. A device
reports POLLERR once its connection is gone (unmounted or aborted): ``gone``.

Nothing here imports trio or pyfuse3: the supervisor stays small.
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import errno
import fcntl
import os
import re
import select
import socket
import stat
import time
from collections.abc import Iterable

from .errors import MountError
from .fuseproto import (
    FUSE_DEV_IOC_CLONE,
    MIN_RESEND_KERNEL,
    READ_BUFFER,
    MountData,
    ProtocolError,
    mount_data,
    parse_init,
    resend_notification,
)
from .mounts import fusermount

__all__ = ["clone", "close_quietly", "gone", "kernel_has_resend", "mount", "read_init",
           "resend", "takeover_blocker"]

DEVICE = "/dev/fuse"

_libc = ctypes.CDLL(None, use_errno=True)


def kernel_has_resend(release: str | None = None) -> bool:
    """Whether this kernel knows FUSE_NOTIFY_RESEND (by its version)."""
    release = os.uname().release if release is None else release
    m = re.match(r"(\d+)\.(\d+)", release)
    return m is not None and (int(m.group(1)), int(m.group(2))) >= MIN_RESEND_KERNEL


def takeover_blocker(release: str | None = None) -> str | None:
    """Why a supervisor could not hand this host's FUSE connections to a new worker
    without readers seeing errors, None if it can: the kernel lacks FUSE_NOTIFY_RESEND
    (the requests a dead worker held would fail), or this user cannot open /dev/fuse
    (no clone per worker: those requests would wait forever on an old kernel, and a
    root-less supervisor needs the device for every worker)."""
    release = os.uname().release if release is None else release
    if not kernel_has_resend(release):
        want = ".".join(map(str, MIN_RESEND_KERNEL))
        return f"kernel {release} has no FUSE_NOTIFY_RESEND (Linux >= {want})"
    if not os.access(DEVICE, os.R_OK | os.W_OK):
        return f"{DEVICE} cannot be opened by uid {os.geteuid()}"
    return None


def mount(mountpoint: str, options: Iterable[str]) -> int:
    """Mount a FUSE filesystem on ``mountpoint``; the device fd (close-on-exec)."""
    md = mount_data(options)
    if os.geteuid() == 0:
        return _mount_root(mountpoint, md)
    return _mount_fusermount(mountpoint, md.options)


def _mount_root(mountpoint: str, md: MountData) -> int:
    try:
        st = os.stat(mountpoint)
    except OSError as e:
        raise MountError(f"mount point {mountpoint}: {e.strerror}") from None
    try:
        fd = os.open(DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        raise MountError(f"cannot open {DEVICE}: {e.strerror}") from None
    data = md.kernel_data(fd, stat.S_IFMT(st.st_mode), os.getuid(), os.getgid())
    if _libc.mount(md.source.encode(), os.fsencode(mountpoint), md.fstype.encode(), md.flags,
                   data.encode()) != 0:
        err = ctypes.get_errno()
        os.close(fd)
        raise MountError(f"cannot mount {md.fstype} on {mountpoint}: {os.strerror(err)}")
    return fd


def _mount_fusermount(mountpoint: str, options: str) -> int:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours, theirs:
        env = dict(os.environ, _FUSE_COMMFD=str(theirs.fileno()))
        msg = fusermount(["-o", options, "--", mountpoint], pass_fds=(theirs.fileno(),),
                         env=env)
        if msg is not None:
            raise MountError(f"cannot mount on {mountpoint}: {msg}")
        theirs.close()
        ours.settimeout(10)
        try:
            _msg, fds, _flags, _addr = socket.recv_fds(ours, 16, 1)
        except OSError as e:
            raise MountError(f"fusermount3 sent no device: {e}") from None
    if not fds:
        raise MountError("fusermount3 sent no device")
    os.set_inheritable(fds[0], False)
    return fds[0]


def read_init(fd: int, timeout: float = 30.0) -> bytes:
    """The kernel's FUSE_INIT request from a freshly mounted device, checked."""
    deadline = time.monotonic() + timeout
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise MountError("the kernel sent no FUSE_INIT request")
        events = poller.poll(left * 1000)
        if not events:
            continue
        try:
            data = os.read(fd, READ_BUFFER)
        except InterruptedError:
            continue
        except OSError as e:
            raise MountError(f"reading FUSE_INIT: {e.strerror}") from None
        try:
            parse_init(data)
        except ProtocolError as e:
            raise MountError(str(e)) from None
        return data


def clone(fd: int) -> int:
    """A second device of ``fd``'s connection (close-on-exec); MountError if /dev/fuse
    cannot be opened (it is root's only on some hosts)."""
    try:
        new = os.open(DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        raise MountError(f"cannot open {DEVICE}: {e.strerror}") from None
    try:
        fcntl.ioctl(new, FUSE_DEV_IOC_CLONE, array.array("I", [fd]))
    except OSError as e:
        os.close(new)
        raise MountError(f"cannot clone the FUSE device: {e.strerror}") from None
    return new


def resend(fd: int) -> bool:
    """Ask the kernel to queue again every request read but not answered.

    False when this kernel does not know the notification (EINVAL) or the
    connection is gone; those requests then stay unanswered.
    """
    try:
        os.write(fd, resend_notification())
    except OSError as e:
        if e.errno in (errno.EINVAL, errno.ENOSYS, errno.ENOTCONN, errno.ENODEV):
            return False
        raise
    return True


def gone(fd: int) -> bool:
    """Whether the device's connection has ended (unmounted or aborted)."""
    poller = select.poll()
    poller.register(fd, 0)  # POLLERR is always reported
    return any(ev & (select.POLLERR | select.POLLHUP | select.POLLNVAL)
               for _, ev in poller.poll(0))


def close_quietly(fd: int | None) -> None:
    if fd is not None and fd >= 0:
        with contextlib.suppress(OSError):
            os.close(fd)
