"""The bootstrap writer is deterministic and its output does not change by accident.

``build_bootstrap`` of one fixed model (every node kind and layout: inline and
block directories, inline and block symlinks, chunk-based files with holes and
dedup over two blobs, compact and extended inodes, xattrs, devices, hardlinks,
a prefetch list) must give the same bytes every time, and the bytes recorded
here: a refactoring of the writer must keep them. Change ``GOLDEN`` only with a
deliberate format change, and say so in the commit.
"""

from __future__ import annotations

import hashlib
import os
import stat

from rafs.bootstrap import Bootstrap
from rafs.model import Node
from tests.helpers.images import ImageParts

CS = 16 * 1024
GOLDEN = "sha256:6044beaae6ac423c5040e64aa3be1ebe1adbdaf8317ce42b2fdd36edc4799b67"


def fixed_model() -> ImageParts:
    parts = ImageParts(Node.directory(0o755, mtime=1_600_000_000), chunk_size=CS)
    parts.new_blob()
    parts.new_blob()
    root = parts.root
    assert root.children is not None
    data = bytes(range(256)) * 200  # 51200 bytes: four chunks, the last one short
    root.children[b"big"] = parts.file(data, uid=70000, gid=80000, mtime=1_700_000_000,
                                       mtime_nsec=123456789)
    root.children[b"dup"] = parts.file(data, blob=1, mtime=1_600_000_000)
    root.children[b"holes"] = parts.file(bytes(2 * CS) + b"tail", mtime=1_600_000_000)
    root.children[b"empty"] = parts.file(b"", mtime=1_600_000_000)
    root.children[b"xattrs"] = parts.file(
        b"x", xattrs={b"user.a": b"1", b"security.capability": b"\x01\x00\x00\x02" + bytes(16)},
        mtime=1_600_000_000)
    etc = Node.directory(0o2755, uid=5, gid=6, mtime=1_500_000_000)
    root.children[b"etc"] = etc
    assert etc.children is not None
    shared = parts.file(b"hardlinked\n", 0o4755, mtime=1_600_000_000)
    etc.children[b"one"] = shared
    root.children[b"two"] = shared
    etc.children[b"caf\xe9"] = parts.file(b"latin-1 name", mtime=1_600_000_000)
    etc.children[b"link"] = Node(mode=stat.S_IFLNK | 0o777, target=b"../big", mtime=1_600_000_000)
    etc.children[b"longlink"] = Node(mode=stat.S_IFLNK | 0o777, target=b"x/" * 2000)
    etc.children[b"null"] = Node(mode=stat.S_IFCHR | 0o666, rdev=os.makedev(1, 3))
    etc.children[b"sda"] = Node(mode=stat.S_IFBLK | 0o660, rdev=os.makedev(259, 70000), gid=6)
    etc.children[b"pipe"] = Node(mode=stat.S_IFIFO | 0o600)
    wide = Node.directory(0o755, mtime=1_600_000_000)
    root.children[b"wide"] = wide
    assert wide.children is not None
    for i in range(300):  # several directory blocks
        wide.children[b"entry-%04d" % i] = parts.file(b"%d" % i, mtime=1_600_000_000 + i % 3)
    return parts


def test_the_same_model_gives_the_same_bytes_as_recorded() -> None:
    first = fixed_model().finish(prefetch=(b"/etc/one", b"/wide", b"/missing"))
    again = fixed_model().finish(prefetch=(b"/etc/one", b"/wide", b"/missing"))
    assert first == again
    Bootstrap.from_bytes(first)  # and our reader takes it
    assert "sha256:" + hashlib.sha256(first).hexdigest() == GOLDEN
