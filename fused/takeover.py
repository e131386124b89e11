"""A worker's side of a supervised mount: serve a FUSE connection that another process mounted.

The supervisor (``fused.supervisor``) starts each worker with two inherited
descriptors: ``session_fd``, the read end of a pipe that holds a copy of the
kernel's ``FUSE_INIT`` request, and ``device_fd``, the real ``/dev/fuse``
device of the connection. pyfuse3 is told to mount ``/dev/fd/<session_fd>``,
which libfuse takes as "already mounted, use this fd", and reads the replayed
INIT from the pipe, which brings it past INIT (libfuse answers EIO to every
request before it). libfuse then calls ``Operations.init()`` synchronously,
before it writes the INIT reply and before any pyfuse3 task waits on the fd;
the adapters' ``init()`` calls ``at_init`` here, which moves the device into
``session_fd`` (``dup2``). So the INIT reply goes to the device: for the first
worker it completes the kernel's INIT; for a later one the kernel no longer
knows that request and refuses the reply with ENOENT, which libfuse ignores.
Every request after that is read from the device directly: nothing of this
stays on the read path.

trio registers descriptors in epoll by number: ``notify_closing`` first tells
it that the old file behind ``session_fd`` goes (nobody waits on it now, but a
stale registration must not outlive the swap).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .runstate import Instance

__all__ = ["Attachment", "Handover", "WorkerSeat", "after_init", "arm", "at_init", "attach",
           "attachment"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Attachment:
    """What a supervisor hands a worker (``python -m fused.worker``)."""

    session_fd: int  # the pipe with the replayed FUSE_INIT; the device after the swap
    device_fd: int  # the /dev/fuse device of the connection
    first: bool  # the first worker of a mount (kernel mode: it mounts EROFS)
    control_socket: str  # this worker's own control socket (the supervisor forwards to it)
    fuse_dev: str | None = None  # MAJOR:MINOR of the connection (read-ahead tuning)
    standby: bool = False  # waits for its INIT, set up; prefetch starts once it serves


class WorkerSeat:
    """A worker's view of the instance its supervisor owns (``runstate.OwnedInstance``
    is the owner's): the same paths, a private control socket, and the state fields
    the daemon would record, kept here to go back to the supervisor in the worker's
    readiness report (the supervisor alone writes the state file)."""

    def __init__(self, inst: Instance, attachment: Attachment) -> None:
        self.instance = inst
        self.control_socket = Path(attachment.control_socket)
        self._state: dict[str, Any] = {}

    def write_state(self, **fields: Any) -> None:
        self._state.update(fields)

    @property
    def state(self) -> dict[str, Any]:
        return dict(self._state)

    def close(self) -> None:
        """Nothing to remove: the run state is the supervisor's."""


class Handover:
    """The armed takeover of one worker: ``swap`` moves the device into the session fd."""

    def __init__(self, session_fd: int, device_fd: int) -> None:
        import trio

        self.session_fd = session_fd
        self.device_fd = device_fd
        self.done = False
        self.serving = trio.Event()

    @property
    def mountpoint(self) -> str:
        """What to give pyfuse3.init instead of a mount point."""
        return f"/dev/fd/{self.session_fd}"

    def swap(self) -> None:
        import trio

        with contextlib.suppress(RuntimeError):  # outside trio: nothing is registered
            trio.lowlevel.notify_closing(self.session_fd)
        os.dup2(self.device_fd, self.session_fd, inheritable=False)
        os.close(self.device_fd)
        self.done = True
        self.serving.set()
        log.debug("serving the FUSE device on fd %d", self.session_fd)


_attachment: Attachment | None = None
_armed: Handover | None = None


def attach(attachment: Attachment) -> None:
    """Mark this process as a supervised worker (``fused.worker`` does, before serving)."""
    global _attachment
    for fd in (attachment.session_fd, attachment.device_fd):
        os.fstat(fd)  # OSError (EBADF) now rather than in the middle of INIT
    _attachment = attachment


def attachment() -> Attachment | None:
    return _attachment


def arm(attachment: Attachment) -> Handover:
    """Take over at the next FUSE_INIT of this process (there is one pyfuse3 session).
    Call inside trio."""
    global _armed, _handover
    _armed = _handover = Handover(attachment.session_fd, attachment.device_fd)
    return _armed


_handover: Handover | None = None


async def after_init(fn: Callable[..., Awaitable[None]], *args: Any) -> None:
    """``await fn(*args)`` once this worker serves (at once if it is not supervised): a
    standby worker, set up long before the supervisor hands it the connection, must
    not fetch the prefetch list beside the worker that serves."""
    if _handover is not None:
        await _handover.serving.wait()
    await fn(*args)


def at_init() -> None:
    """Called by the adapters' ``init()``: swap the device in if a handover is armed.

    A failure here cannot be reported to libfuse (pyfuse3 ignores exceptions
    from ``init()``), and serving the pipe would answer nothing: exit at once,
    the supervisor sees it and starts another worker.
    """
    global _armed
    handover, _armed = _armed, None
    if handover is None:
        return
    try:
        handover.swap()
    except OSError as e:
        log.critical("cannot take over the FUSE device: %s", e)
        os._exit(70)
