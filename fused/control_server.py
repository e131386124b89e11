"""The daemon's side of the control socket (protocol in ``fused.control``).

The socket lives in the daemon instance's own run-state directory, so no
other daemon ever uses its name; a file left there is this instance's own and
is replaced. The socket file is removed when serving ends.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from pathlib import Path
from typing import Any

import trio

from rafs.errors import RafsError

from . import wire
from .control import SUN_PATH_MAX, Handler
from .errors import MountError

__all__ = ["serve"]

log = logging.getLogger(__name__)

HANDLER_TIMEOUT = 90.0
REQUEST_TIMEOUT = 30.0


async def serve(
    sock_path: Path,
    handlers: dict[str, Handler],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Answer requests on ``sock_path`` until cancelled; the socket file is removed after."""
    if len(str(sock_path)) > SUN_PATH_MAX:
        raise MountError(f"control socket path is too long: {sock_path} (set RAFS_RUN_DIR)")
    sock_path.unlink(missing_ok=True)
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        await sock.bind(str(sock_path))
    except OSError as e:
        sock.close()
        raise MountError(f"cannot bind control socket {sock_path}: {e.strerror}") from None
    finally:
        os.umask(old_umask)
    sock.listen(16)
    listener = trio.SocketListener(sock)
    try:
        async with listener, trio.open_nursery() as nursery:
            task_status.started()
            while True:
                stream = await listener.accept()
                nursery.start_soon(_session, stream, handlers)
    finally:
        try:
            sock_path.unlink()
        except OSError as e:
            if e.errno != errno.ENOENT:
                log.warning("cannot remove control socket %s: %s", sock_path, e.strerror)


async def _receive_frame(stream: trio.SocketStream) -> Any:
    buf = bytearray()

    async def fill(n: int) -> bool:
        while len(buf) < n:
            piece = await stream.receive_some(65536)
            if not piece:
                return False
            buf.extend(piece)
        return True

    if not await fill(wire.HEADER.size):
        raise wire.WireError("truncated request")
    size = wire.payload_size(bytes(buf[:wire.HEADER.size]))
    if not await fill(wire.HEADER.size + size):
        raise wire.WireError("truncated request")
    return wire.decode(bytes(buf[wire.HEADER.size:wire.HEADER.size + size]))


async def _session(stream: trio.SocketStream, handlers: dict[str, Handler]) -> None:
    async with stream:
        message: Any = None
        with trio.move_on_after(REQUEST_TIMEOUT):
            with contextlib.suppress(wire.WireError, trio.BrokenResourceError):
                message = await _receive_frame(stream)
        # Shielded: a shutdown ends the daemon while its own request is being
        # answered, and the client must still get the reply.
        with trio.CancelScope(shield=True), trio.move_on_after(HANDLER_TIMEOUT):
            try:
                cmd = message["cmd"]
                handler = handlers[cmd]
            except (KeyError, TypeError):
                reply: dict[str, Any] = {"ok": False, "error": "bad request"}
            else:
                try:
                    reply = await handler(message)
                except RafsError as e:
                    reply = {"ok": False, "error": str(e)}
                except Exception as e:
                    log.exception("control command %r failed", cmd)
                    reply = {"ok": False, "error": f"internal error: {e}"}
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.send_all(wire.frame(reply))
