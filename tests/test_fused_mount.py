"""Real FUSE mounts through the `rafs` CLI: what users and other uids see, and clean exits.

Every mount goes through ``tests.helpers.mounts.mounted`` (always unmounted in
``finally``); the ``no_leaks`` fixture fails any test that leaves a FUSE mount
or a daemon behind.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from rafs.model import Node
from tests.fused_support import WrittenImage, write_rafs_image
from tests.helpers.images import ImageParts
from tests.helpers.mounts import daemon_pids, fuse_mounts, is_mounted, mounted, rafs_cmd, read_stats
from tests.helpers.procs import assert_clean_error, run

pytestmark = [pytest.mark.fuse]

CS = 64 * 1024
MTIME = 1_600_000_000




@pytest.fixture(autouse=True)
def no_leaks(tmp_path: Path):
    yield
    mine = os.path.realpath(tmp_path) + "/"  # other test runs may mount things meanwhile
    leaked = {mp for mp in fuse_mounts() if mp.startswith(mine)}
    for mp in leaked:
        subprocess.run(["fusermount3", "-u", "-z", mp], check=False)
    pids = daemon_pids(tmp_path)
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    assert not leaked, f"leaked mounts: {leaked}"
    assert not pids, f"leaked daemons: {pids}"


@pytest.fixture
def image(tmp_path: Path) -> tuple[WrittenImage, dict[str, bytes]]:
    parts = ImageParts(Node.directory(0o755, mtime=MTIME), chunk_size=CS)
    parts.new_blob()
    parts.new_blob()
    root = parts.root
    assert root.children is not None
    files = {
        "big": os.urandom(40 * CS + 123),
        "text": b"all work and no play\n" * 9000,
        "sparse": bytes(3 * CS) + b"end",
        "small": b"hello\n",
        "empty": b"",
        "other": os.urandom(3 * CS),
    }
    root.children[b"big"] = parts.file(files["big"], uid=1234, gid=5678, mtime=1_700_000_000,
                                       mtime_nsec=42)
    root.children[b"text"] = parts.file(files["text"], mode=0o640, mtime=MTIME)
    root.children[b"sparse"] = parts.file(files["sparse"], mtime=MTIME)
    root.children[b"small"] = parts.file(
        files["small"], mtime=MTIME, xattrs={b"user.colour": b"blue", b"trusted.t": b"x"})
    root.children[b"empty"] = parts.file(b"", mtime=MTIME)
    root.children[b"other"] = parts.file(files["other"], blob=1, mtime=MTIME)
    root.children[b"hard"] = root.children[b"small"]
    d = Node.directory(0o750, mtime=MTIME, uid=1, gid=2)
    root.children[b"dir"] = d
    assert d.children is not None
    d.children[b"link"] = Node(mode=stat.S_IFLNK | 0o777, target=b"../small", mtime=MTIME)
    d.children[b"null"] = Node(mode=stat.S_IFCHR | 0o666, rdev=os.makedev(1, 3), mtime=MTIME)
    d.children[b"fifo"] = Node(mode=stat.S_IFIFO | 0o600, mtime=MTIME)
    return write_rafs_image(parts, tmp_path / "img"), files


def read(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def test_a_mount_shows_the_image(image, tmp_path):
    img, files = image
    with mounted(img.ref, tmp_path / "mnt", tmp_path / "cache") as mnt:
        assert os.stat(mnt).st_ino == 1
        assert sorted(os.listdir(mnt)) == sorted([*files, "hard", "dir"])
        assert sorted(os.listdir(mnt / "dir")) == ["fifo", "link", "null"]
        for name, content in files.items():
            assert read(mnt / name) == content, name
        st = os.stat(mnt / "big")
        assert (st.st_size, st.st_uid, st.st_gid) == (len(files["big"]), 1234, 5678)
        assert st.st_mtime_ns == 1_700_000_000 * 10**9 + 42 == st.st_atime_ns == st.st_ctime_ns
        assert st.st_blocks == -(-st.st_size // 512) and st.st_mode == stat.S_IFREG | 0o644
        assert os.stat(mnt / "text").st_mode == stat.S_IFREG | 0o640
        small, hard = os.stat(mnt / "small"), os.stat(mnt / "hard")
        assert small.st_ino == hard.st_ino and small.st_nlink == 2
        d = os.stat(mnt / "dir")
        assert (d.st_mode, d.st_uid, d.st_gid, d.st_nlink) == (stat.S_IFDIR | 0o750, 1, 2, 2)
        assert os.readlink(mnt / "dir/link") == "../small"
        assert read(mnt / "dir/link") == files["small"]
        null = os.lstat(mnt / "dir/null")
        assert stat.S_ISCHR(null.st_mode) and null.st_rdev == os.makedev(1, 3)
        assert stat.S_ISFIFO(os.lstat(mnt / "dir/fifo").st_mode)
        assert sorted(os.listxattr(mnt / "small")) == ["trusted.t", "user.colour"]
        assert os.getxattr(mnt / "small", "user.colour") == b"blue"
        with pytest.raises(OSError) as e:
            os.getxattr(mnt / "small", "user.nope")
        assert e.value.errno == errno.ENODATA
        with pytest.raises(FileNotFoundError):
            os.stat(mnt / "nope")
        with pytest.raises(FileNotFoundError):
            os.stat(mnt / "nope")  # cached negative entry, same answer
        with pytest.raises(OSError) as e:
            os.open(mnt / "new", os.O_WRONLY | os.O_CREAT)
        assert e.value.errno == errno.EROFS
        with pytest.raises(OSError) as e:
            os.open(mnt / "small", os.O_RDWR)
        assert e.value.errno == errno.EROFS
        vfs = os.statvfs(mnt)
        assert (vfs.f_bsize, vfs.f_bfree, vfs.f_bavail, vfs.f_ffree) == (4096, 0, 0, 0)
        assert vfs.f_blocks > 0 and vfs.f_files == 11  # root, 7 files (one linked twice), dir, 3
        with open(mnt / "big", "rb") as f:  # random access across chunk edges
            for off, size in [(CS - 1, 2), (5 * CS + 7, 3 * CS), (len(files["big"]) - 3, 100)]:
                f.seek(off)
                assert f.read(size) == files["big"][off : off + size]

        reply = read_stats(mnt)
        assert reply["mountpoint"] == str(mnt) and reply["image"] == img.ref
        s = reply["stats"]
        assert isinstance(s, dict)
        assert s["read_bytes"] >= sum(len(c) for c in files.values())
        assert s["backend_requests"] >= 1 and s["backend_chunks"] >= 40
        assert s["digest_failures"] == 0 and s["errors"] == 0
        prom = run(rafs_cmd("stats", "--prometheus", mnt), check=True).stdout
        assert "rafs_read_bytes_total{" in prom


def test_other_users_can_read_through_allow_other(image, tmp_path):
    img, files = image
    public = Path(tempfile.mkdtemp(prefix="rafs-test-"))  # pytest's tmp is 0700
    public.chmod(0o755)
    try:
        check_other_user(img, files, public / "mnt", tmp_path / "cache")
    finally:
        shutil.rmtree(public)


def check_other_user(img: WrittenImage, files: dict[str, bytes], mp: Path, cache: Path) -> None:
    with mounted(img.ref, mp, cache) as mnt:
        as_nobody = ["setpriv", "--reuid", "nobody", "--regid", "nogroup", "--clear-groups"]
        res = subprocess.run([*as_nobody, "cat", str(mnt / "big")], capture_output=True,
                             check=False, timeout=60)
        assert res.returncode == 0, res.stderr
        assert res.stdout == files["big"]
        res = subprocess.run([*as_nobody, "ls", str(mnt / "dir")], capture_output=True,
                             check=False, timeout=60)  # 0750 root-owned: permissions apply
        assert res.returncode != 0 and b"Permission denied" in res.stderr


def test_a_restarted_daemon_serves_read_data_from_the_cache(image, tmp_path):
    img, files = image
    cache = tmp_path / "cache"
    with mounted(img.ref, tmp_path / "mnt", cache) as mnt:
        for name, content in files.items():
            assert read(mnt / name) == content
        first = read_stats(mnt)["stats"]
    assert first["backend_requests"] > 0  # type: ignore[index]
    with mounted(img.ref, tmp_path / "mnt", cache) as mnt:
        for name, content in files.items():
            assert read(mnt / name) == content
        again = read_stats(mnt)["stats"]
    assert again["backend_requests"] == 0 and again["backend_chunks"] == 0  # type: ignore[index]
    assert again["cache_hits"] > 0 and again["cache_misses"] == 0  # type: ignore[index]


def test_a_corrupt_chunk_is_eio_for_its_file_only(image, tmp_path):
    img, files = image
    blob = img.layout / "blobs" / "sha256" / img.blob_digests[1].removeprefix("sha256:")
    raw = bytearray(blob.read_bytes())
    raw[CS + 100] ^= 0x40  # inside the second chunk of "other", the only file of blob 1
    blob.write_bytes(raw)
    with mounted(img.ref, tmp_path / "mnt", tmp_path / "cache") as mnt:
        with open(mnt / "other", "rb") as f:
            assert f.read(CS) == files["other"][:CS]  # the good chunk before it
            with pytest.raises(OSError) as e:
                f.read(CS)
            assert e.value.errno == errno.EIO
        for name in ("big", "text", "small"):
            assert read(mnt / name) == files[name]
        s = read_stats(mnt)["stats"]
        assert s["digest_failures"] >= 2 and s["errors"] >= 1  # type: ignore[index]


def test_umount_refuses_a_busy_mount_and_lazy_umount_detaches_it(image, tmp_path):
    img, files = image
    with mounted(img.ref, tmp_path / "mnt", tmp_path / "cache") as mnt:
        with open(mnt / "small", "rb") as f:
            res = run(rafs_cmd("umount", mnt), timeout=120)
            message = assert_clean_error(res)
            assert "busy" in message
            assert is_mounted(mnt) and f.read() == files["small"]
        with open(mnt / "big", "rb") as f:
            run(rafs_cmd("umount", "--lazy", mnt), timeout=120, check=True)
            assert not is_mounted(mnt)
            assert f.read() == files["big"]  # still served after the detach
            assert daemon_pids(tmp_path)
        deadline = time.monotonic() + 10  # the last close ends the daemon
        while time.monotonic() < deadline and daemon_pids(tmp_path):
            time.sleep(0.05)
        assert not daemon_pids(tmp_path)


@pytest.mark.parametrize("supervise", [True, False])
def test_sigterm_unmounts_cleanly(image, tmp_path, supervise):
    """SIGTERM to the owner: the supervisor (by default) or a plain daemon."""
    img, _ = image
    flag = "--supervise" if supervise else "--no-supervise"
    with mounted(img.ref, tmp_path / "mnt", tmp_path / "cache", extra_args=[flag]) as mnt:
        stats = read_stats(mnt)
        pid = int(stats.get("owner_pid", stats["pid"]))  # type: ignore[call-overload]
        assert (pid != stats["pid"]) == supervise
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and (is_mounted(mnt) or daemon_pids(tmp_path)):
            time.sleep(0.05)
        assert not is_mounted(mnt) and not daemon_pids(tmp_path)


def test_umount_after_the_daemon_died_falls_back_to_fusermount(image, tmp_path):
    """A plain daemon (a killed supervisor: tests/test_lifecycle.py)."""
    img, _ = image
    with mounted(img.ref, tmp_path / "mnt", tmp_path / "cache",
                 extra_args=["--no-supervise"]) as mnt:
        pid = int(read_stats(mnt)["pid"])  # type: ignore[call-overload]
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and daemon_pids(tmp_path):
            time.sleep(0.05)
        assert is_mounted(mnt)  # a dead mount: "transport endpoint is not connected"
        res = run(rafs_cmd("umount", mnt), timeout=120)
        assert res.returncode == 0, res.stderr
        assert not is_mounted(mnt)


def test_umount_and_stats_of_a_plain_directory_fail_cleanly(tmp_path):
    (tmp_path / "plain").mkdir()
    for cmd in ("umount", "stats"):
        message = assert_clean_error(run(rafs_cmd(cmd, tmp_path / "plain"), timeout=60))
        assert "not a rafs mount" in message


def test_mounting_twice_on_one_mount_point_fails(image, tmp_path):
    img, _ = image
    with mounted(img.ref, tmp_path / "mnt", tmp_path / "cache") as mnt:
        res = run(rafs_cmd("mount", img.ref, mnt, "--cache-dir", tmp_path / "c2"), timeout=120)
        assert "already a rafs mount" in assert_clean_error(res)
        assert read(mnt / "small") == b"hello\n"


def garbage_bootstrap(tmp_path: Path, img: WrittenImage) -> str:
    """The image with its bootstrap replaced by junk that its digests vouch for."""
    import hashlib

    import zstandard

    from rafs.oci import (
        ANNOTATION_RAFS_BOOTSTRAP_DIGEST,
        MEDIA_TYPE_RAFS_BOOTSTRAP,
        OCILayout,
    )

    layout = OCILayout(img.layout)
    manifest = json.loads(layout.resolve("latest").raw)
    junk = b"\0" * 1024 + os.urandom(8192)
    desc = layout.put_blob_bytes(zstandard.ZstdCompressor().compress(junk),
                                 MEDIA_TYPE_RAFS_BOOTSTRAP, {
                                     ANNOTATION_RAFS_BOOTSTRAP_DIGEST:
                                     "sha256:" + hashlib.sha256(junk).hexdigest()})
    manifest["layers"][-1] = desc.to_json()
    layout.put_manifest(manifest, "junk")
    return f"oci:{img.layout}:junk"


def test_mounting_garbage_fails_with_one_line_and_mounts_nothing(image, tmp_path):
    img, _ = image
    (tmp_path / "notalayout").mkdir()
    (tmp_path / "mnt").mkdir()
    refs = {
        "not a layout": f"oci:{tmp_path / 'notalayout'}",
        "no such tag": f"oci:{img.layout}:nope",
        "bad bootstrap": garbage_bootstrap(tmp_path, img),
        "bad reference": "nonsense",
    }
    for what, ref in refs.items():
        res = run(rafs_cmd("mount", ref, tmp_path / "mnt", "--cache-dir", tmp_path / "cache"),
                  timeout=120)
        message = assert_clean_error(res)
        assert not is_mounted(tmp_path / "mnt"), what
        assert not daemon_pids(tmp_path), what
        if what == "bad bootstrap":
            assert "bad bootstrap" in message
    res = run(rafs_cmd("mount", img.ref, tmp_path / "nodir", "--cache-dir", tmp_path / "cache"),
              timeout=120)
    assert "nodir" in assert_clean_error(res)


def test_a_converted_image_mounts_exactly_as_umoci_unpacks_it(tmp_path):
    from tests.helpers.ocibuild import (
        Entry,
        build_oci_image,
        dir_entry,
        file_entry,
        opaque_whiteout,
        symlink_entry,
        whiteout,
    )
    from tests.helpers.treecmp import compare_trees
    from tests.helpers.umoci import umoci_unpack

    blob = os.urandom(700_000)
    layers = [
        [dir_entry("etc"), file_entry("etc/passwd", b"root:x:0:0::/root:/bin/sh\n"),
         dir_entry("bin"), file_entry("bin/tool", b"\x7fELF" + blob, mode=0o4755),
         Entry("bin/alias", "hardlink", linkname="bin/tool"), symlink_entry("sbin", "bin"),
         dir_entry("var"), dir_entry("dev"), dir_entry("run"),  # implicit parents differ
         dir_entry("var/cache", mode=0o700, uid=100, gid=101),
         file_entry("var/cache/x", b"x" * 5000, xattrs={"user.note": b"hi"}),
         Entry("dev/null", "chardev", mode=0o666, devmajor=1, devminor=3),
         Entry("run/fifo", "fifo", mode=0o600), file_entry("empty", b""),
         file_entry("zeros", bytes(300_000))],
        [whiteout("etc/passwd"), opaque_whiteout("var/cache"),
         file_entry("var/cache/y", b"y" * 10, mtime=1_234_567_890),
         file_entry("bin/tool2", blob[::-1], mode=0o755)],
    ]
    build_oci_image(tmp_path / "src", "v1", layers)
    out = f"oci:{tmp_path / 'rafs'}:v1"
    res = run(rafs_cmd("convert", f"oci:{tmp_path / 'src'}:v1", out, "--chunk-size", "64K",
                       "--no-progress"), timeout=300)
    assert res.returncode == 0, res.stderr
    reference = umoci_unpack(tmp_path / "src", "v1", tmp_path / "unpacked")
    with mounted(out, tmp_path / "mnt", tmp_path / "cache") as mnt:
        assert compare_trees(reference, mnt) == []


def test_the_prefetch_list_is_fetched_in_the_background(tmp_path):
    parts = ImageParts(Node.directory(0o755, mtime=MTIME), chunk_size=CS)
    parts.new_blob()
    assert parts.root.children is not None
    big, other = os.urandom(20 * CS), os.urandom(4 * CS)
    parts.root.children[b"other"] = parts.file(other, mtime=MTIME)
    parts.root.children[b"big"] = parts.file(big, mtime=MTIME)
    img = write_rafs_image(parts, tmp_path / "img", prefetch=(b"/big",))
    with mounted(img.ref, tmp_path / "mnt", tmp_path / "cache") as mnt:
        deadline = time.monotonic() + 30
        while (s := read_stats(mnt)["stats"])["prefetch_chunks"] < 20:  # type: ignore[index]
            assert time.monotonic() < deadline, s
            time.sleep(0.05)
        requests = s["backend_requests"]  # type: ignore[index]
        while (s := read_stats(mnt)["stats"])["prefetch"]["state"] != "done":  # type: ignore[index]
            assert time.monotonic() < deadline, s
            time.sleep(0.05)
        assert s["prefetch"]["planned"] == 20 and s["requests"]["prefetch"] >= 1  # type: ignore[index]
        assert read(mnt / "big") == big
        s = read_stats(mnt)["stats"]
        assert s["backend_requests"] == requests and s["cache_misses"] == 0  # type: ignore[index]
    with mounted(img.ref, tmp_path / "mnt", tmp_path / "cache2",
                 extra_args=["--no-prefetch"]) as mnt:
        time.sleep(0.5)
        assert read_stats(mnt)["stats"]["prefetch_chunks"] == 0  # type: ignore[index]


def test_fuse_and_kernel_erofs_mounts_of_one_bootstrap_agree(image, tmp_path):
    """The two modes of DESIGN.md: same tree, same inode numbers, same statfs."""
    from rafs.bootstrap import Bootstrap
    from rafs.codec import decode_chunk
    from tests.helpers.kernel import erofs_mounted
    from tests.helpers.treecmp import compare_trees

    img, _ = image
    # The kernel reads blob data from flat files of each blob's address space.
    boot = tmp_path / "bootstrap"
    boot.write_bytes(img.bootstrap)
    flats = []
    b = Bootstrap.from_bytes(img.bootstrap)
    for k, blob in enumerate(b.blobs):
        flat = bytearray(blob.uncompressed_size)
        raw = (img.layout / "blobs" / "sha256" / blob.digest.removeprefix("sha256:")).read_bytes()
        for i in range(blob.chunk_start, blob.chunk_start + blob.chunk_count):
            c = b.chunk(i)
            end = c.compressed_offset + c.compressed_size
            data = decode_chunk(c, raw[c.compressed_offset : end])
            flat[c.uncompressed_offset : c.uncompressed_offset + len(data)] = data
        flats.append(tmp_path / f"flat{k}")
        flats[-1].write_bytes(flat)
    with mounted(img.ref, tmp_path / "mnt", tmp_path / "cache") as fuse, \
            erofs_mounted(boot, tmp_path / "kmnt", flats) as kernel:
        assert compare_trees(kernel, fuse) == []
        for dirpath, dirnames, filenames in os.walk(kernel):
            for name in [".", *dirnames, *filenames]:
                k = os.lstat(os.path.join(dirpath, name))
                f = os.lstat(os.path.join(fuse, os.path.relpath(dirpath, kernel), name))
                assert k.st_ino == f.st_ino, name
                # st_blocks differs on purpose: the kernel rounds to 4 KiB blocks,
                # fused reports ceil(size / 512).
        kv, fv = os.statvfs(kernel), os.statvfs(fuse)
        for field in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_namemax"):
            assert getattr(kv, field) == getattr(fv, field), field
        # f_files: the kernel reports no inode count (-1); fused reports the bootstrap's.
        assert fv.f_files == b.inode_count


def test_trace_lists_each_file_once_in_first_access_order(image, tmp_path):
    img, files = image
    with mounted(img.ref, tmp_path / "mnt", tmp_path / "cache") as mnt:
        names = sorted(n for n in files if "/" not in n)[:3]
        assert len(names) >= 2
        for name in [*reversed(names), names[-1], names[0]]:
            read(mnt / name)
        os.stat(mnt / names[0])  # a stat is not an access of the data
        res = run(rafs_cmd("trace", mnt), check=True)
    assert res.stdout.splitlines() == ["/" + n for n in reversed(names)]


def test_metrics_are_served_over_http_in_the_prometheus_format(image, tmp_path):
    import httpx

    img, files = image
    with mounted(img.ref, tmp_path / "mnt", tmp_path / "cache",
                 extra_args=["--metrics-address", "127.0.0.1:0"]) as mnt:
        for name in files:
            read(mnt / name)
        address = read_stats(mnt)["metrics_address"]
        text = httpx.get(f"http://{address}/metrics", timeout=10).text
    assert 'rafs_backend_requests_total{kind="ondemand",mountpoint=' in text
    assert 'rafs_backend_requests_total{kind="prefetch",mountpoint=' in text
    assert "rafs_read_latency_seconds_bucket{" in text and 'le="+Inf"' in text
    count = next(line for line in text.splitlines()
                 if line.startswith("rafs_read_latency_seconds_count"))
    assert float(count.split()[-1]) >= len(files)
