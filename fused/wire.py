"""The one msgpack wrapper: how the daemon and its clients encode what they send each other.

Used for the control socket (requests and replies), the daemon's configuration
(the client writes it to a pipe the daemon reads) and its readiness report
(the daemon writes it to a pipe the client reads). JSON stays where people
read things: ``rafs stats``, ``rafs ls --json`` and the state files.

A message is a *frame*: a 4-byte big-endian payload length, then one msgpack
object (a map at the top level). Options are fixed here and nowhere else:
``bin`` for bytes, ``str`` for text; strings round-trip file names that are
not UTF-8 (``surrogateescape``, as ``os.fsdecode`` gives them); map keys must
be strings; a frame is at most ``MAX_FRAME`` bytes, checked before anything is
allocated.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from typing import Any

import msgpack

from .errors import ControlError, MountError

__all__ = ["HEADER", "MAX_FRAME", "WireError", "decode", "encode", "frame", "payload_size",
           "read_config", "read_frame", "ready_reporter"]

MAX_FRAME = 64 << 20
HEADER = struct.Struct(">I")


class WireError(ControlError):
    """A frame that is not one: too large, truncated or not msgpack."""


def encode(obj: Any) -> bytes:
    try:
        return msgpack.packb(obj, use_bin_type=True, unicode_errors="surrogateescape",
                             datetime=False)
    except (TypeError, ValueError, OverflowError) as e:
        raise WireError(f"cannot encode a message: {e}") from None


def decode(payload: bytes) -> Any:
    try:
        return msgpack.unpackb(payload, raw=False, strict_map_key=True, use_list=True,
                               unicode_errors="surrogateescape")
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError,
            msgpack.StackError) as e:
        raise WireError(f"malformed message: {e}") from None


def frame(obj: Any) -> bytes:
    """``obj`` as one frame."""
    payload = encode(obj)
    if len(payload) > MAX_FRAME:
        raise WireError(f"message of {len(payload)} bytes is too large")
    return HEADER.pack(len(payload)) + payload


def payload_size(header: bytes) -> int:
    """The payload length a frame header announces (WireError if too large)."""
    (size,) = HEADER.unpack(header)
    if size > MAX_FRAME:
        raise WireError(f"message of {size} bytes is too large")
    return size


def read_frame(read_exactly: Callable[[int], bytes]) -> Any:
    """Read one frame with ``read_exactly(n)`` (which returns fewer bytes only at EOF)."""
    header = read_exactly(HEADER.size)
    if len(header) < HEADER.size:
        raise WireError("connection closed before a message" if not header
                        else "truncated message header")
    size = payload_size(header)
    payload = read_exactly(size)
    if len(payload) < size:
        raise WireError("truncated message")
    return decode(payload)


# -- a spawned daemon's (or supervisor's) two pipes ---------------------------------


def read_config(fd: int, who: str) -> dict[str, Any]:
    """The configuration frame the client wrote to ``fd`` (closed after)."""
    with os.fdopen(fd, "rb") as f:
        config = read_frame(f.read)
    if not isinstance(config, dict):
        raise MountError(f"the {who}'s configuration is not a map")
    return config


def ready_reporter(fd: int | None, extra: Callable[[], dict[str, Any]] | None = None
                   ) -> Callable[[str | None], None]:
    """``report(None)`` once ready, ``report(error)`` if not: one frame to the client on
    ``fd`` (then closed), with ``extra()``'s fields when ready; a client gone is fine."""
    def report(error: str | None) -> None:
        if fd is None:
            return
        reply = ({"ok": True, "pid": os.getpid(), **(extra() if extra else {})}
                 if error is None else {"ok": False, "error": " ".join(error.split())})
        try:
            os.write(fd, frame(reply))
            os.close(fd)
        except OSError:
            pass  # the client went away; keep serving

    return report
