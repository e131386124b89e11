"""The filesystem model answers like a read-only disk would, without a kernel."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest
import trio

from fused.errors import NoAttributeError, NotASymlinkError, NotDirectoryError
from fused.vfs import ROOT_INO, Vfs
from rafs.errors import to_errno
from rafs.model import Node
from tests.fused_support import WrittenImage, open_stack, write_rafs_image
from tests.helpers.images import ImageParts

CS = 64 * 1024


@pytest.fixture
def image(tmp_path: Path) -> tuple[WrittenImage, dict[str, bytes]]:
    parts = ImageParts(Node.directory(0o755, mtime=1_600_000_000), chunk_size=CS)
    parts.new_blob()
    parts.new_blob()
    root = parts.root
    assert root.children is not None
    data = {
        "big": os.urandom(3 * CS + 17),
        "sparse": bytes(2 * CS) + b"tail",
        "small": b"hello\n",
        "empty": b"",
        "other": os.urandom(CS // 2),
    }
    root.children[b"big"] = parts.file(data["big"], uid=70000, gid=80000, mtime=1_700_000_000,
                                       mtime_nsec=123456789)
    root.children[b"sparse"] = parts.file(data["sparse"], mtime=1_600_000_000)
    root.children[b"small"] = parts.file(
        data["small"], mode=0o600, mtime=1_600_000_000,
        xattrs={b"user.a": b"1", b"security.capability": b"\x01\x00\x00\x02" + bytes(16)},
    )
    root.children[b"empty"] = parts.file(b"", mtime=1_600_000_000)
    root.children[b"other"] = parts.file(data["other"], blob=1, mtime=1_600_000_000)
    root.children[b"hard"] = root.children[b"small"]
    sub = Node.directory(0o700, mtime=1_600_000_000)
    root.children[b"sub"] = sub
    assert sub.children is not None
    sub.children[b"link"] = Node(mode=stat.S_IFLNK | 0o777, target=b"../big", mtime=1_600_000_000)
    sub.children[b"null"] = Node(mode=stat.S_IFCHR | 0o666, rdev=os.makedev(1, 3),
                                 mtime=1_600_000_000)
    many = Node.directory(0o755, mtime=1_600_000_000)
    root.children[b"many"] = many
    assert many.children is not None
    for i in range(300):  # several directory blocks
        many.children[b"f%03d-%s" % (i, b"x" * 40)] = Node(mode=stat.S_IFIFO | 0o644,
                                                            mtime=1_600_000_000)
    return write_rafs_image(parts, tmp_path / "img"), data


def run_vfs(image: WrittenImage, cache_dir: Path, fn):  # type: ignore[no-untyped-def]
    async def main():  # type: ignore[no-untyped-def]
        async with open_stack(image, cache_dir) as stack:
            return await fn(stack.vfs)

    return trio.run(main)


def path_ino(vfs: Vfs, path: bytes) -> int:
    ino = ROOT_INO
    for part in path.strip(b"/").split(b"/"):
        attr = vfs.lookup(ino, part)
        assert attr is not None, path
        ino = attr.ino
    return ino


def test_root_is_inode_one_and_inodes_follow_nids(image, tmp_path):
    img, _ = image

    async def check(vfs: Vfs) -> None:
        root = vfs.getattr(ROOT_INO)
        assert stat.S_ISDIR(root.mode) and root.ino == ROOT_INO
        for name, attr, _ in vfs.readdir(ROOT_INO):
            nid = vfs.nid(attr.ino)
            assert vfs.ino(nid) == attr.ino
            assert vfs.bootstrap.inode(nid).mode == attr.mode, name

    run_vfs(img, tmp_path / "cache", check)


def test_attributes_match_the_model(image, tmp_path):
    img, data = image

    async def check(vfs: Vfs) -> None:
        big = vfs.getattr(path_ino(vfs, b"big"))
        assert (big.uid, big.gid, big.size) == (70000, 80000, len(data["big"]))
        assert big.mtime_ns == 1_700_000_000 * 10**9 + 123456789
        assert big.blocks == -(-len(data["big"]) // 512)
        assert big.mode == stat.S_IFREG | 0o644 and big.nlink == 1
        small = vfs.getattr(path_ino(vfs, b"small"))
        assert small.nlink == 2 and small.mode == stat.S_IFREG | 0o600
        assert path_ino(vfs, b"hard") == small.ino  # a hardlink is one inode
        link = vfs.getattr(path_ino(vfs, b"sub/link"))
        assert link.size == 6 and link.blocks == 1
        null = vfs.getattr(path_ino(vfs, b"sub/null"))
        assert stat.S_ISCHR(null.mode) and null.rdev == os.makedev(1, 3)
        sub = vfs.getattr(path_ino(vfs, b"sub"))
        assert sub.nlink == 2 and sub.mode == stat.S_IFDIR | 0o700
        assert vfs.getattr(ROOT_INO).nlink == 2 + 2  # ., .. and the .. of sub and many

    run_vfs(img, tmp_path / "cache", check)


def test_lookup_misses_and_dot_entries(image, tmp_path):
    img, _ = image

    async def check(vfs: Vfs) -> None:
        assert vfs.lookup(ROOT_INO, b"nope") is None
        assert vfs.lookup(ROOT_INO, b"x" * 300) is None
        sub = path_ino(vfs, b"sub")
        assert vfs.lookup(sub, b".").ino == sub
        assert vfs.lookup(sub, b"..").ino == ROOT_INO
        assert vfs.lookup(ROOT_INO, b"..").ino == ROOT_INO
        with pytest.raises(NotDirectoryError) as e:
            vfs.lookup(path_ino(vfs, b"big"), b"x")
        assert to_errno(e.value) == errno.ENOTDIR

    run_vfs(img, tmp_path / "cache", check)


def test_readdir_lists_everything_once_and_resumes_at_cookies(image, tmp_path):
    img, _ = image

    async def check(vfs: Vfs) -> None:
        many = path_ino(vfs, b"many")
        full = list(vfs.readdir(many))
        names = [n for n, _, _ in full]
        assert len(names) == 300 and names == sorted(names)
        resumed: list[bytes] = []
        cookie = 0
        while True:  # read 7 at a time, as a kernel with a small buffer would
            batch = []
            for name, _attr, next_cookie in vfs.readdir(many, cookie):
                batch.append(name)
                cookie = next_cookie
                if len(batch) == 7:
                    break
            if not batch:
                break
            resumed += batch
        assert resumed == names
        top = {n for n, _, _ in vfs.readdir(ROOT_INO)}
        assert top == {b"big", b"sparse", b"small", b"empty", b"other", b"hard", b"sub", b"many"}

    run_vfs(img, tmp_path / "cache", check)


def test_readlink_xattrs_statfs(image, tmp_path):
    img, _ = image

    async def check(vfs: Vfs) -> None:
        assert vfs.readlink(path_ino(vfs, b"sub/link")) == b"../big"
        with pytest.raises(NotASymlinkError):
            vfs.readlink(path_ino(vfs, b"big"))
        small = path_ino(vfs, b"small")
        assert sorted(vfs.listxattr(small)) == [b"security.capability", b"user.a"]
        assert vfs.getxattr(small, b"user.a") == b"1"
        with pytest.raises(NoAttributeError) as e:
            vfs.getxattr(small, b"user.b")
        assert to_errno(e.value) == errno.ENODATA
        assert vfs.listxattr(path_ino(vfs, b"big")) == []
        s = vfs.statfs()
        assert (s.bsize, s.frsize, s.bfree, s.bavail, s.ffree) == (4096, 4096, 0, 0, 0)
        data_blocks = sum(b.uncompressed_size for b in vfs.bootstrap.blobs) // 4096
        assert s.blocks == vfs.bootstrap.blocks + data_blocks > data_blocks > 0
        assert s.files == vfs.bootstrap.inode_count

    run_vfs(img, tmp_path / "cache", check)


def test_reads_return_file_bytes_holes_as_zeros_and_stop_at_eof(image, tmp_path):
    img, data = image

    async def check(vfs: Vfs) -> dict[str, bytes]:
        out = {}
        for name, content in data.items():
            ino = path_ino(vfs, name.encode())
            assert await vfs.read(ino, 0, len(content) + 4096) == content
            out[name] = content
        big, ref = path_ino(vfs, b"big"), data["big"]
        for off, size in [(0, 1), (CS - 3, 7), (CS - 1, 2 * CS + 2), (3 * CS, 100),
                          (len(ref) - 5, 4096), (len(ref), 10), (len(ref) + 99, 10)]:
            assert bytes(await vfs.read(big, off, size)) == ref[off : off + size], (off, size)
        sparse = path_ino(vfs, b"sparse")
        assert await vfs.read(sparse, CS - 10, 20) == bytes(20)
        assert vfs.stats.read_requests > 0
        return out

    run_vfs(img, tmp_path / "cache", check)
