"""A three-layer synthetic image that exercises every tar entry type and layer rule.

Every entry type (file, dir, symlink, hardlink, char and block device, fifo),
setuid/setgid/sticky modes, xattrs (binary, security.capability), non-UTF-8 and
long names, holes, whiteouts of files and directories, opaque directories,
hardlinks into lower layers (and surviving their target's whiteout), writes
through a symlinked parent, dir-over-dir metadata and cross-layer dedup.
"""

from __future__ import annotations

import os

from tests.helpers.ocibuild import (
    Entry,
    dir_entry,
    file_entry,
    opaque_whiteout,
    symlink_entry,
    whiteout,
)

BIG = os.urandom(3 << 20) + bytes(2 << 20) + b"tail"

LAYERS: list[list[Entry]] = [
    [
        dir_entry("bin"), file_entry("bin/busybox", BIG, mode=0o755),
        Entry("bin/sh", "hardlink", linkname="bin/busybox"),
        symlink_entry("bin/ls", "busybox"), symlink_entry("lib", "usr/lib"),
        dir_entry("usr"), dir_entry("usr/lib"), file_entry("usr/lib/libc.so", b"libc" * 999),
        dir_entry("etc"), file_entry("etc/passwd", b"root:x:0:0::/root:/bin/sh\n"),
        file_entry("etc/shadow", b"root:*::", mode=0o640, gid=42),
        dir_entry("etc/old"), file_entry("etc/old/a", b"a"), file_entry("etc/old/b", b"b"),
        dir_entry("tmp", mode=0o1777),
        dir_entry("dev"), Entry("dev/null", "chardev", mode=0o666, devmajor=1, devminor=3),
        Entry("dev/loop0", "blockdev", mode=0o660, devmajor=7, devminor=0),
        Entry("dev/fifo", "fifo", mode=0o600),
        file_entry("usr/bin-ping", b"ping", mode=0o4755,
                   xattrs={"security.capability": b"\x01\x00\x00\x02\x00\x20\x00\x00" + bytes(12)}),
        file_entry("usr/xattr", b"", xattrs={"user.one": b"1", "user.bin": b"\x00\xff"}),
        file_entry(b"usr/latin1-\xe9", b"raw name"),
        dir_entry("usr/" + "d" * 200), file_entry("usr/" + "d" * 200 + "/" + "f" * 255, b"long"),
        file_entry("empty", b""), dir_entry("opaque"), file_entry("opaque/lower", b"l"),
        file_entry("holes", bytes(1 << 20) + b"x" + bytes(3 << 20)),
    ],
    [
        whiteout("etc/passwd"), file_entry("etc/passwd", b"root:x:0:0::/root:/bin/ash\n"),
        whiteout("etc/old"), file_entry("etc/hostname", b"rafs\n", uid=1000, gid=1000),
        opaque_whiteout("opaque"), file_entry("opaque/upper", b"u"),
        Entry("usr/lib/libc.so.6", "hardlink", linkname="usr/lib/libc.so"),
        file_entry("lib/libm.so", b"libm"),  # through the lib -> usr/lib symlink
        whiteout("bin/busybox"),  # bin/sh keeps the content
        dir_entry("tmp", mode=0o1777, mtime=1_800_000_000),  # dir over dir: new metadata
        file_entry("copy", BIG),  # all chunks dedup against layer 1
    ],
    [
        file_entry("etc/hostname", b"rafs\n", uid=1000, gid=1000),  # no new data
        file_entry("empty", b"now has data"), symlink_entry("bin/ls", "/bin/sh"),
    ],
]
