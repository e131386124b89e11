"""The few FUSE wire formats a supervisor needs, as ``struct`` formats (no I/O here).

A supervisor (``fused.supervisor``) mounts a FUSE filesystem itself, reads the
kernel's ``FUSE_INIT`` request once and replays it to every worker it starts;
it also writes the ``FUSE_NOTIFY_RESEND`` notification after a worker died.
That takes the two headers of the protocol (``include/uapi/linux/fuse.h``):

    fuse_in_header   len u32, opcode u32, unique u64, nodeid u64,
                     uid u32, gid u32, pid u32, total_extlen u16, padding u16
    fuse_out_header  len u32, error i32, unique u64

A notification is an out header with ``unique`` 0 and the notification code in
``error``. ``mount_data`` turns the daemon's libfuse-style mount options into
the ``mount(2)`` flags, data string, source and type that libfuse would pass.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = [
    "FUSE_DEV_IOC_CLONE",
    "FUSE_INIT",
    "FUSE_NOTIFY_RESEND",
    "FUSE_UNIQUE_RESEND",
    "IN_HEADER",
    "MIN_RESEND_KERNEL",
    "OUT_HEADER",
    "READ_BUFFER",
    "InHeader",
    "MountData",
    "ProtocolError",
    "mount_data",
    "parse_in_header",
    "parse_init",
    "resend_notification",
]

IN_HEADER = struct.Struct("<IIQQIIIHH")
OUT_HEADER = struct.Struct("<IiQ")
INIT_IN = struct.Struct("<IIII")  # major, minor, max_readahead, flags (older kernels stop here)

FUSE_INIT = 26
FUSE_NOTIFY_RESEND = 7
FUSE_UNIQUE_RESEND = 1 << 63
MIN_RESEND_KERNEL = (6, 9)  # the first kernel that knows FUSE_NOTIFY_RESEND

# _IOR(229, 0, uint32_t): make a fresh /dev/fuse open a second device of a connection.
FUSE_DEV_IOC_CLONE = (2 << 30) | (4 << 16) | (229 << 8) | 0

# What a read of /dev/fuse must offer: the kernel refuses buffers smaller than a
# maximal write request; libfuse uses 256 pages plus a page of headers.
READ_BUFFER = 256 * 4096 + 4096

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4

# libfuse options that become kernel mount data as they are
_KERNEL_OPTIONS = frozenset({"allow_other", "default_permissions"})


class ProtocolError(Exception):
    """Bytes that are not what the FUSE protocol says they must be."""


@dataclass(frozen=True, slots=True)
class InHeader:
    length: int
    opcode: int
    unique: int
    nodeid: int
    uid: int
    gid: int
    pid: int


@dataclass(frozen=True, slots=True)
class InitRequest:
    header: InHeader
    major: int
    minor: int
    max_readahead: int
    flags: int


def parse_in_header(data: bytes) -> InHeader:
    if len(data) < IN_HEADER.size:
        raise ProtocolError(f"a FUSE request of {len(data)} bytes is shorter than its header")
    length, opcode, unique, nodeid, uid, gid, pid, _extlen, _pad = IN_HEADER.unpack_from(data)
    if length != len(data):
        raise ProtocolError(f"a FUSE request says it has {length} bytes, but has {len(data)}")
    return InHeader(length, opcode, unique, nodeid, uid, gid, pid)


def parse_init(data: bytes) -> InitRequest:
    """The kernel's FUSE_INIT request, checked."""
    header = parse_in_header(data)
    if header.opcode != FUSE_INIT:
        raise ProtocolError(f"expected FUSE_INIT ({FUSE_INIT}), got opcode {header.opcode}")
    if len(data) < IN_HEADER.size + INIT_IN.size:
        raise ProtocolError("FUSE_INIT request too short")
    major, minor, max_readahead, flags = INIT_IN.unpack_from(data, IN_HEADER.size)
    if major != 7:
        raise ProtocolError(f"FUSE protocol {major}.{minor} is not 7.x")
    return InitRequest(header, major, minor, max_readahead, flags)


def resend_notification() -> bytes:
    """FUSE_NOTIFY_RESEND: the kernel queues every request that was read but not
    answered once more, its unique marked with FUSE_UNIQUE_RESEND."""
    return OUT_HEADER.pack(OUT_HEADER.size, FUSE_NOTIFY_RESEND, 0)


@dataclass(frozen=True, slots=True)
class MountData:
    source: str
    fstype: str
    flags: int
    data: str  # without fd=, rootmode=, user_id=, group_id=
    options: str  # the same options for fusermount3 -o

    def kernel_data(self, fd: int, rootmode: int, uid: int, gid: int) -> str:
        head = f"fd={fd},rootmode={rootmode:o},user_id={uid},group_id={gid}"
        return f"{head},{self.data}" if self.data else head


def mount_data(options: Iterable[str]) -> MountData:
    """``mount(2)`` arguments for libfuse-style options (ro, allow_other,
    default_permissions, fsname=, subtype=); ValueError for any other option."""
    flags = MS_NOSUID | MS_NODEV
    source, subtype = "fuse", ""
    data: list[str] = []
    for opt in sorted(options):
        if opt == "ro":
            flags |= MS_RDONLY
        elif opt in _KERNEL_OPTIONS:
            data.append(opt)
        elif opt.startswith("fsname="):
            source = opt.partition("=")[2]
        elif opt.startswith("subtype="):
            subtype = opt.partition("=")[2]
        else:
            raise ValueError(f"mount option {opt!r} is not supported by the supervisor")
        if "," in opt:
            raise ValueError(f"mount option {opt!r} contains ','")
    fstype = f"fuse.{subtype}" if subtype else "fuse"
    return MountData(source, fstype, flags, ",".join(data), ",".join(sorted(options)))
