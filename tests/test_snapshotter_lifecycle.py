"""``rafs snapshotter`` processes on one root and one address: who may start, who cleans up.

Real ``rafs snapshotter`` subprocesses (``tests.helpers.containerd``) and real
rafs mounts: a second snapshotter on the same address or root is refused while
the first lives, and the first keeps its socket; a socket left by a killed
snapshotter is replaced; a snapshotter never removes a socket it did not
create; at startup it tears down the rafs mounts under its root that no
snapshot owns, whether their daemons live or died.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from rafs.model import Node
from tests.fused_support import write_rafs_image
from tests.helpers.containerd import SnapshotterProcess, snapshotter_process
from tests.helpers.images import ImageParts
from tests.helpers.mounts import rafs_cmd, rafs_mounts, read_stats
from tests.helpers.procs import assert_clean_error, run

pytestmark = [pytest.mark.fuse, pytest.mark.root, pytest.mark.containerd]


def accepts(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


@contextlib.contextmanager
def listener(path: Path) -> Iterator[socket.socket]:
    """Something that is not a snapshotter, listening on ``path``."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.listen(1)
    try:
        yield s
    finally:
        s.close()


def snapshotter(address: Path, root: Path) -> subprocess.CompletedProcess[str]:
    return run(rafs_cmd("snapshotter", "--address", address, "--root", root), timeout=60)


def test_a_second_snapshotter_on_the_same_address_or_root_is_refused(tmp_path: Path) -> None:
    sock = tmp_path / "sn.sock"
    with snapshotter_process(sock, tmp_path / "root", tmp_path / "a.log"):
        inode = sock.stat().st_ino
        message = assert_clean_error(snapshotter(sock, tmp_path / "other-root"))
        assert "another rafs snapshotter" in message and str(sock) in message
        message = assert_clean_error(snapshotter(tmp_path / "other.sock", tmp_path / "root"))
        assert "another rafs snapshotter" in message and "root" in message
        assert sock.stat().st_ino == inode and accepts(sock)  # the first one's, untouched
        assert not (tmp_path / "other.sock").exists()
    assert not sock.exists()  # its own socket goes when it stops
    foreign = tmp_path / "foreign.sock"
    with listener(foreign):
        message = assert_clean_error(snapshotter(foreign, tmp_path / "root"))
        assert "something else answers" in message
        assert accepts(foreign)


def test_a_killed_snapshotter_is_replaced_and_a_socket_it_did_not_create_stays(
        tmp_path: Path) -> None:
    sock = tmp_path / "sn.sock"
    sn = SnapshotterProcess(sock, tmp_path / "root", tmp_path / "sn.log")
    try:
        sn.start()
        sn.kill()
        assert sock.exists() and not accepts(sock)  # what SIGKILL leaves
        sn.start()  # replaces the stale socket
        assert accepts(sock)
        with listener(tmp_path / "theirs.sock"):
            os.replace(tmp_path / "theirs.sock", sock)  # someone else's socket now
            sn.stop()
            assert sock.exists() and accepts(sock)
    finally:
        sn.stop()


@pytest.fixture
def image_ref(tmp_path: Path) -> str:
    parts = ImageParts(Node.directory(0o755, mtime=1), chunk_size=64 * 1024)
    parts.new_blob()
    assert parts.root.children is not None
    parts.root.children[b"f"] = parts.file(b"data\n" * 1000, mtime=1)
    return write_rafs_image(parts, tmp_path / "img").ref


def test_startup_tears_down_the_rafs_mounts_no_snapshot_owns(
        tmp_path: Path, image_ref: str) -> None:
    root = tmp_path / "root"
    orphans = {mode: root / "snapshots" / str(n) / "fs"
               for n, mode in ((97, "fuse"), (98, "kernel"), (99, "dead"))}
    pids = {}
    try:
        for mode, mp in orphans.items():
            mp.mkdir(parents=True)
            res = run(rafs_cmd("mount", image_ref, mp, "--cache-dir", tmp_path / "cache",
                               "--mode", "fuse" if mode == "dead" else mode), timeout=120)
            assert res.returncode == 0, res.stderr
            stats = read_stats(mp)
            pids[mode] = int(stats["pid"])  # type: ignore[call-overload]
            pids[f"{mode}-owner"] = int(stats["owner_pid"])  # type: ignore[call-overload]
            assert pids[mode] != pids[f"{mode}-owner"], "supervised by default"
        # a dead instance: its supervisor killed (its worker, orphaned, serves on)
        os.kill(pids["dead-owner"], signal.SIGKILL)
        with snapshotter_process(tmp_path / "sn.sock", root, tmp_path / "sn.log"):
            left = [mp for mp in rafs_mounts() if mp.startswith(f"{root}/")]
            assert left == [], (left, (tmp_path / "sn.log").read_text()[-3000:])
            for pid in pids.values():
                assert not Path(f"/proc/{pid}").exists() or \
                    Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z"
            log = (tmp_path / "sn.log").read_text()
            assert log.count("no snapshot owns it") == 3, log[-3000:]
    finally:
        for mp in orphans.values():
            run(rafs_cmd("umount", "--force", mp), timeout=60)
