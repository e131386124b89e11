"""The FUSE wire formats of fused.fuseproto, checked against the kernel's layout."""

from __future__ import annotations

import struct

import pytest

from fused.fusedev import kernel_has_resend
from fused.fuseproto import (
    FUSE_DEV_IOC_CLONE,
    FUSE_INIT,
    FUSE_NOTIFY_RESEND,
    IN_HEADER,
    OUT_HEADER,
    ProtocolError,
    mount_data,
    parse_init,
    resend_notification,
)
from fused.options import BLOB_MOUNT_OPTIONS, MOUNT_OPTIONS


def init_request(major: int = 7, minor: int = 41, *, unique: int = 2, extra: int = 48) -> bytes:
    body = struct.pack("<IIII", major, minor, 131072, 0x3FFFFFFB) + bytes(extra)
    return IN_HEADER.pack(IN_HEADER.size + len(body), FUSE_INIT, unique, 0, 0, 0, 0, 0, 0) + body


def test_headers_have_the_kernel_sizes() -> None:
    assert IN_HEADER.size == 40
    assert OUT_HEADER.size == 16


def test_init_is_parsed_and_checked() -> None:
    init = parse_init(init_request())
    assert (init.major, init.minor, init.header.unique) == (7, 41, 2)
    assert init.header.length == 40 + 16 + 48


@pytest.mark.parametrize("data, message", [
    (b"\0" * 10, "shorter than its header"),
    (init_request()[:-1], "says it has"),
    (init_request(major=8), "is not 7.x"),
    (IN_HEADER.pack(40, 1, 2, 0, 0, 0, 0, 0, 0), "expected FUSE_INIT"),
])
def test_anything_else_is_a_protocol_error(data: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        parse_init(data)


def test_resend_is_a_notification_with_its_code() -> None:
    length, error, unique = OUT_HEADER.unpack(resend_notification())
    assert (length, error, unique) == (16, FUSE_NOTIFY_RESEND, 0)
    assert FUSE_NOTIFY_RESEND == 7


def test_clone_ioctl_number_is_ior_229_0_u32() -> None:
    assert FUSE_DEV_IOC_CLONE == 0x8004E500


def test_mount_data_of_the_daemons_options() -> None:
    md = mount_data(MOUNT_OPTIONS)
    assert (md.source, md.fstype) == ("rafs", "fuse.rafs")
    assert md.flags == 0x1 | 0x2 | 0x4  # ro, nosuid, nodev
    assert md.kernel_data(5, 0o40000, 0, 0) == (
        "fd=5,rootmode=40000,user_id=0,group_id=0,allow_other,default_permissions")
    assert mount_data(BLOB_MOUNT_OPTIONS).fstype == "fuse.rafs-blobs"


def test_unknown_mount_options_are_refused() -> None:
    with pytest.raises(ValueError, match="not supported"):
        mount_data({"ro", "max_read=4096"})


@pytest.mark.parametrize("release, has", [
    ("6.18.44-fc-v1147", True), ("6.9.0", True), ("6.8.12-amd64", False), ("5.15.0", False),
    ("weird", False),
])
def test_resend_support_by_kernel_release(release: str, has: bool) -> None:
    assert kernel_has_resend(release) is has
