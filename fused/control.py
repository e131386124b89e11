"""The control protocol: how a client asks a daemon something over its socket.

Each daemon instance listens on ``sock`` in its run-state directory
(``fused.runstate``). A request is one frame of ``fused.wire`` (msgpack),
``{"cmd": NAME, ...}``; the reply is one frame, ``{"ok": true, ...}`` or
``{"ok": false, "error": "one line"}``. Commands:

``ping``      ``pid``: the daemon answers at all
``status``    what ``rafs ls`` shows: ``pid``, ``owner_pid``, ``mode``, ``image``,
              ``phase``, ``cache_bytes`` (cache space of this image's blobs),
              ``version``
``stats``     counters (``stats``) and ``pid``, ``mountpoint``, ``mode``, ``image``,
              ``cache_dir``, ``ready_seconds``, ``metrics_address``
``metrics``   the counters in the Prometheus text format, in ``text``
``trace``     ``paths`` in first-access order, ``truncated``
``shutdown``  ``lazy``: unmount and exit; refused while busy unless lazy; replies
              ``pid`` and ``detached`` (lazy: the daemon serves open files, then exits)
``upgrade``   supervised mounts only (``fused.supervisor``): a new worker takes over;
              ``pid`` and ``version`` of the new worker

The socket is the owner's (0600 in a 0700 directory): another user's client
cannot connect, and ``fused.client`` tells them whose mount it is
(``NotOwnerError``) before trying. The daemon's side is ``fused.control_server``;
this module stays free of trio so the command line starts fast.
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from . import wire
from .errors import ControlError

__all__ = ["SUN_PATH_MAX", "Handler", "request"]

SUN_PATH_MAX = 107

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


def request(sock_path: Path, message: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
    """Send one request and return the reply; ControlError if nobody answers properly.

    ``ConnectionRefusedError``/``FileNotFoundError`` are raised as they are, so
    callers can tell a dead daemon from a misbehaving one.
    """
    if len(str(sock_path)) > SUN_PATH_MAX:
        raise ControlError(f"control socket path is too long: {sock_path}")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as s:
        s.settimeout(timeout)
        s.connect(str(sock_path))

        def read_exactly(n: int) -> bytes:
            buf = bytearray()
            while len(buf) < n:
                piece = s.recv(min(n - len(buf), 1 << 20))
                if not piece:
                    break
                buf += piece
            return bytes(buf)

        try:
            s.sendall(wire.frame(message))
            reply = wire.read_frame(read_exactly)
        except TimeoutError:
            raise ControlError(f"the daemon did not answer within {timeout:g}s") from None
        except OSError as e:
            raise ControlError(f"control socket {sock_path}: {e.strerror}") from None
    if not isinstance(reply, dict):
        raise ControlError("the daemon sent a malformed reply")
    return reply
