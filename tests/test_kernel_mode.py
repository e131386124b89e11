"""Kernel mode on the real kernel: EROFS mounts the bootstrap, fused serves only blob data.

Every mount goes through ``tests.helpers.mounts.mounted`` (always unmounted in
``finally``); ``no_leaks`` fails a test that leaves an EROFS mount, a FUSE
mount (the blob filesystem included) or a daemon behind. The detection tests
fake the host through ``check_kernel_mode``'s parameters, never the mount.
"""

from __future__ import annotations

import errno
import os
import random
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fused.errors import MountError
from fused.kernelmount import (
    DIRECT_IO_ENV,
    DIRECT_IO_OPTION,
    KernelSupport,
    check_kernel_mode,
    resolve_mode,
)
from rafs.model import Node
from tests.cache_support import tamper
from tests.fused_support import WrittenImage, write_rafs_image
from tests.helpers.images import ImageParts
from tests.helpers.mounts import daemon_pids, mounted, rafs_cmd, rafs_mounts, read_stats
from tests.helpers.procs import assert_clean_error, run

pytestmark = [pytest.mark.fuse, pytest.mark.kernel]

CS = 64 * 1024
MTIME = 1_600_000_000
CONFIG_Y = "CONFIG_EROFS_FS=y\nCONFIG_EROFS_FS_BACKED_BY_FILE=y\n"




def blob_mounts_of_this_session() -> list[str]:
    run_dir = os.environ["RAFS_RUN_DIR"]
    return [mp for mp, t in rafs_mounts().items()
            if t == "fuse.rafs-blobs" and mp.startswith(run_dir + "/")]


@pytest.fixture(autouse=True)
def no_leaks(tmp_path: Path):
    blobs_before = set(blob_mounts_of_this_session())
    yield
    leaked = [mp for mp in rafs_mounts() if mp.startswith(f"{tmp_path}/")]
    leaked += [mp for mp in blob_mounts_of_this_session() if mp not in blobs_before]
    for mp in leaked:
        subprocess.run(["umount", "-l", mp], check=False)
    pids = daemon_pids(tmp_path)
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    assert not leaked, f"leaked mounts: {leaked}"
    assert not pids, f"leaked daemons: {pids}"


@pytest.fixture
def image(tmp_path: Path) -> tuple[WrittenImage, dict[str, bytes]]:
    """Two blobs; ``other`` is the only file of blob 1 (three chunks)."""
    parts = ImageParts(Node.directory(0o755, mtime=MTIME), chunk_size=CS)
    parts.new_blob()
    parts.new_blob()
    root = parts.root
    assert root.children is not None
    files = {
        "big": os.urandom(40 * CS + 123),
        "small": b"hello\n",
        "sparse": bytes(3 * CS) + b"end",
        "text": b"all work and no play\n" * 9000,
        "other": os.urandom(3 * CS),
    }
    for name, data in files.items():
        root.children[name.encode()] = parts.file(data, blob=1 if name == "other" else 0,
                                                  mtime=MTIME)
    return write_rafs_image(parts, tmp_path / "img", prefetch=(b"/text",)), files


def read(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


# -- detection ---------------------------------------------------------------------


def test_detection_refuses_kernels_before_6_12():
    support = check_kernel_mode(release="6.6.30-amd64", euid=0, config=CONFIG_Y)
    assert not support.ok and "6.6.30-amd64" in support.reason and "6.12" in support.reason


def test_detection_needs_root_and_the_file_backed_option():
    assert "root" in check_kernel_mode(release="6.12.1", euid=1000, config=CONFIG_Y).reason
    unset = "CONFIG_EROFS_FS=y\n# CONFIG_EROFS_FS_BACKED_BY_FILE is not set\n"
    off = check_kernel_mode(release="6.12.1", euid=0, config=unset)
    assert not off.ok and "CONFIG_EROFS_FS_BACKED_BY_FILE" in off.reason
    assert check_kernel_mode(release="6.18.0", euid=0, config=CONFIG_Y).ok
    assert not check_kernel_mode(release="6.13.0", euid=0, config="", erofs_registered=False).ok


def test_this_host_supports_kernel_mode():
    support = check_kernel_mode()
    assert support.ok, support.reason


def test_auto_falls_back_to_fuse_and_kernel_fails_with_the_reason():
    old = check_kernel_mode(release="5.10.0", euid=0, config=CONFIG_Y)
    mode, why = resolve_mode("auto", old)
    assert mode == "fuse" and "5.10.0" in why
    with pytest.raises(MountError, match=r"kernel mode is not available: kernel 5\.10\.0"):
        resolve_mode("kernel", old)
    assert resolve_mode("auto", KernelSupport(True, "fine"))[0] == "kernel"
    assert resolve_mode("fuse", old)[0] == "fuse"


def test_mode_kernel_as_a_user_fails_with_one_clear_line(image, tmp_path):
    img, _ = image
    as_nobody = ["setpriv", "--reuid", "nobody", "--regid", "nogroup", "--clear-groups"]
    env = {**os.environ, "RAFS_RUN_DIR": "/tmp/rafs-test-nobody",
           "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    res = subprocess.run([*as_nobody, sys.executable, "-m", "runtime.cli", "mount", "--mode",
                          "kernel", img.ref, str(tmp_path / "mnt"), "--cache-dir",
                          "/tmp/rafs-test-nobody/cache"],
                         capture_output=True, text=True, env=env, timeout=60, check=False)
    message = assert_clean_error(res)
    assert message == "rafs: error: kernel mode is not available: mounting EROFS needs root"


# -- serving -----------------------------------------------------------------------


def test_kernel_mode_serves_the_image_lazily_with_stats_trace_and_prefetch(image, tmp_path):
    img, files = image
    with mounted(img.ref, tmp_path / "mnt", tmp_path / "cache", mode="auto") as mnt:
        assert rafs_mounts()[str(mnt)] == "erofs"
        assert os.stat(mnt).st_ino == 1
        for name in ("small", "big", "other", "sparse"):
            assert read(mnt / name) == files[name], name
        with open(mnt / "big", "rb") as f:  # random access across chunk edges
            for off, size in [(CS - 1, 2), (5 * CS + 7, 3 * CS), (len(files["big"]) - 3, 100)]:
                f.seek(off)
                assert f.read(size) == files["big"][off:off + size]
        deadline = time.monotonic() + 30
        while read_stats(mnt)["stats"]["prefetch"]["state"] == "running":  # type: ignore[index]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        reply = read_stats(mnt)
        trace = run(rafs_cmd("trace", mnt), check=True).stdout.split()
        prom = run(rafs_cmd("stats", "--prometheus", mnt), check=True).stdout
    assert reply["mode"] == "kernel"
    s = reply["stats"]
    assert isinstance(s, dict)
    assert s["prefetch"] == {"state": "done", "planned": 3, "fetched": 3}
    assert s["backend_chunks"] >= 40 + 3 + 1 and s["errors"] == 0
    assert s["read_bytes"] >= len(files["big"]) and s["fuse_requests_by_op"]["read"] >= 1
    # The trace sees chunk reads only: files in the order their data was first read
    # (the prefetched text never reached the page cache through the blob files).
    assert trace == ["/small", "/big", "/other", "/sparse"]
    assert 'rafs_fuse_requests_total{' in prom and 'op="read"' in prom


def test_a_flipped_byte_in_a_blob_is_eio_never_wrong_data(image, tmp_path):
    img, files = image
    blob = img.layout / "blobs" / "sha256" / img.blob_digests[1].removeprefix("sha256:")
    raw = bytearray(blob.read_bytes())
    raw[CS + 100] ^= 0x40  # inside the second chunk of "other", the only file of blob 1
    blob.write_bytes(raw)
    with mounted(img.ref, tmp_path / "mnt", tmp_path / "cache", mode="kernel") as mnt:
        with pytest.raises(OSError) as e:
            read(mnt / "other")
        assert e.value.errno == errno.EIO
        fd = os.open(mnt / "other", os.O_RDONLY)
        try:
            with pytest.raises(OSError) as e:
                os.pread(fd, 4096, CS)
            assert e.value.errno == errno.EIO
            try:  # the good chunk before it: right bytes, or EIO, never anything else
                assert os.pread(fd, CS, 0) == files["other"][:CS]
            except OSError as err:
                assert err.errno == errno.EIO
        finally:
            os.close(fd)
        for name in ("big", "small", "text"):
            assert read(mnt / name) == files[name]
        s = read_stats(mnt)["stats"]
    assert s["digest_failures"] >= 2 and s["errors"] >= 1  # type: ignore[index,operator]


def test_after_kill_9_uncached_reads_fail_with_eio_and_umount_cleans_up(image, tmp_path):
    """A plain daemon (supervised, a killed worker is replaced: tests/test_failover.py)."""
    img, files = image
    mnt = tmp_path / "mnt"
    with mounted(img.ref, mnt, tmp_path / "cache", mode="kernel",
                 extra_args=["--no-prefetch", "--no-supervise"]):
        assert read(mnt / "small") == files["small"]
        pid = int(read_stats(mnt)["pid"])  # type: ignore[call-overload]
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while daemon_pids(tmp_path) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not daemon_pids(tmp_path)
        res = subprocess.run(["cat", str(mnt / "big")], capture_output=True, timeout=30,
                             check=False)  # a hang would time out and fail the test
        assert res.returncode != 0 and b"Input/output error" in res.stderr
        assert read(mnt / "small") == files["small"]  # still in the page cache
        res2 = run(rafs_cmd("umount", mnt), timeout=60)
        assert res2.returncode == 0, res2.stderr
        assert str(mnt) not in rafs_mounts()
        assert not blob_mounts_of_this_session()
        assert not [p for p in Path(os.environ["RAFS_RUN_DIR"]).iterdir()
                    if p.suffix in (".blobs", ".sock", ".json")]


def test_umount_refuses_a_busy_kernel_mount_and_lazy_umount_serves_until_closed(image, tmp_path):
    img, files = image
    with mounted(img.ref, tmp_path / "mnt", tmp_path / "cache", mode="kernel",
                 extra_args=["--no-prefetch"]) as mnt:
        with open(mnt / "big", "rb") as f:
            assert "busy" in assert_clean_error(run(rafs_cmd("umount", mnt), timeout=60))
            assert read(mnt / "small") == files["small"]
            res = run(rafs_cmd("umount", "-z", mnt), timeout=60)
            assert res.returncode == 0, res.stderr
            assert str(mnt) not in rafs_mounts()
            assert f.read() == files["big"]  # fetched through the blob filesystem still
            assert daemon_pids(tmp_path)
        deadline = time.monotonic() + 20
        while daemon_pids(tmp_path) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not daemon_pids(tmp_path)
        assert not blob_mounts_of_this_session()


def test_an_image_without_data_blobs_mounts_in_kernel_mode_and_reads(tmp_path):
    """Only empty files, directories and a symlink: no blob, so the blob filesystem
    has no files and EROFS no extra device. The mount must be ready at once (it once
    waited for its own FUSE mount until the timeout) and serve the tree."""
    parts = ImageParts(Node.directory(0o755, mtime=MTIME), chunk_size=CS)
    root = parts.root
    assert root.children is not None
    etc = Node.directory(0o755, mtime=MTIME)
    assert etc.children is not None
    etc.children[b"empty.conf"] = parts.file(b"", mtime=MTIME)
    root.children[b"etc"] = etc
    root.children[b"marker"] = parts.file(b"", mode=0o600, mtime=MTIME)
    root.children[b"link"] = Node(mode=stat.S_IFLNK | 0o777, target=b"etc/empty.conf",
                                  mtime=MTIME)
    img = write_rafs_image(parts, tmp_path / "img")
    assert not img.blob_digests
    with mounted(img.ref, tmp_path / "mnt", tmp_path / "cache", mode="kernel",
                 extra_args=["--timeout", "20"], timeout=60) as mnt:
        assert rafs_mounts()[str(mnt)] == "erofs"
        assert sorted(os.listdir(mnt)) == ["etc", "link", "marker"]
        assert read(mnt / "etc" / "empty.conf") == b""
        assert read(mnt / "link") == b""
        st = os.stat(mnt / "marker")
        assert (stat.S_IMODE(st.st_mode), st.st_size, int(st.st_mtime)) == (0o600, 0, MTIME)
        reply = read_stats(mnt)
    assert reply["mode"] == "kernel"
    s = reply["stats"]
    assert isinstance(s, dict)
    assert s["errors"] == 0 and s["backend_requests"] == 0


def erofs_options(mnt: Path) -> list[str]:
    return next(line.split()[3].split(",") for line in
                Path("/proc/self/mounts").read_text().splitlines() if line.split()[1] == str(mnt))


@pytest.mark.parametrize("direct_io", ["0", "1"])
def test_blob_reads_direct_or_buffered_and_a_tampered_cache_never_reaches_a_reader(
        image, tmp_path, direct_io):
    """The EROFS mount reads its blob files buffered, or with ``directio``
    (asynchronous FUSE requests) when ``RAFS_EROFS_DIRECT_IO=1``; either way, served
    from a chunk cache whose data file was changed behind the daemon's back, every
    read returns the image's bytes: the changed chunks fail their check and are
    fetched again (``fused.cache`` rule 5)."""
    img, files = image
    cache = tmp_path / "cache"
    env = {DIRECT_IO_ENV: direct_io}
    with mounted(img.ref, tmp_path / "mnt", cache, mode="kernel", env=env) as mnt:
        assert (DIRECT_IO_OPTION in erofs_options(mnt)) == (direct_io == "1")
        for name, data in files.items():
            assert read(mnt / name) == data, name
    digest = img.blob_digests[0].removeprefix("sha256:")
    tamper(cache / "blobs" / "sha256" / f"{digest}.data", [100, 7 * CS + 5, 30 * CS + 9],
           random.Random(7))
    with mounted(img.ref, tmp_path / "mnt", cache, mode="kernel", env=env) as mnt:
        for name, data in files.items():
            assert read(mnt / name) == data, name
        s = read_stats(mnt)["stats"]
    assert isinstance(s, dict)
    assert s["cache_corrupt"] == 3 and s["errors"] == 0
