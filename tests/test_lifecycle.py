"""A daemon's whole life on a real kernel: run state, external unmounts, forced teardown.

Real FUSE and EROFS mounts through the ``rafs`` CLI, in both modes: a plain
``umount`` (or ``umount -l``) outside rafs ends the daemon and leaves clean run
state; a mount point whose daemon was killed mounts again; ``rafs umount
--force`` ends a SIGSTOPped daemon while a reader is blocked on it; SIGTERM
ends a daemon whose reads never return (a blob that is a FIFO: its reads block
forever in a worker thread); ``rafs ls`` and ``rafs umount --all``; the import
graph of ``fused``. ``no_leaks`` fails a test that leaves a mount, a daemon or
run state behind. Times are printed, never asserted.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from rafs.model import Node
from tests.fused_support import WrittenImage, write_rafs_image
from tests.helpers.images import ImageParts
from tests.helpers.mounts import daemon_pids, mounted, rafs_cmd, rafs_mounts, read_stats
from tests.helpers.procs import assert_clean_error, run

pytestmark = [pytest.mark.fuse, pytest.mark.kernel]

CS = 64 * 1024
MTIME = 1_600_000_000
REPO = Path(__file__).resolve().parent.parent
MODES = ["fuse", "kernel"]


def run_dir() -> Path:
    return Path(os.environ["RAFS_RUN_DIR"])


def instance_dirs() -> set[str]:
    d = run_dir() / "mounts"
    return {p.name for p in d.iterdir() if p.is_dir()} if d.exists() else set()


def blob_mounts() -> set[str]:
    return {mp for mp, t in rafs_mounts().items()
            if t == "fuse.rafs-blobs" and mp.startswith(f"{run_dir()}/")}




def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    """Seconds until ``predicate()``; fails the test after ``timeout``."""
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout, f"timed out waiting for {what}"
        time.sleep(0.01)
    return time.monotonic() - start


def ls() -> list[dict[str, object]]:
    return json.loads(run(rafs_cmd("ls", "--json"), timeout=60, check=True).stdout)


def mine(under: Path) -> list[dict[str, object]]:
    return [m for m in ls() if str(m["mountpoint"]).startswith(f"{under}/")]


@pytest.fixture(autouse=True)
def no_leaks(tmp_path: Path):
    dirs_before, blobs_before = instance_dirs(), blob_mounts()
    yield
    leaked = [mp for mp in rafs_mounts() if mp.startswith(f"{tmp_path}/")]
    leaked += sorted(blob_mounts() - blobs_before)
    for mp in leaked:
        subprocess.run(["umount", "-l", mp], check=False)
    pids = daemon_pids(tmp_path)
    for pid in pids:
        os.kill(pid, signal.SIGCONT)
        os.kill(pid, signal.SIGKILL)
    state = sorted(instance_dirs() - dirs_before)
    assert not leaked, f"leaked mounts: {leaked}"
    assert not pids, f"leaked daemons: {pids}"
    assert not state, f"leaked run state: {state}"


@pytest.fixture
def image(tmp_path: Path) -> tuple[WrittenImage, dict[str, bytes]]:
    """Two blobs; ``other`` is the only file of blob 1."""
    parts = ImageParts(Node.directory(0o755, mtime=MTIME), chunk_size=CS)
    parts.new_blob()
    parts.new_blob()
    assert parts.root.children is not None
    files = {"big": os.urandom(24 * CS + 5), "small": b"hello\n", "other": os.urandom(3 * CS)}
    for name, data in files.items():
        parts.root.children[name.encode()] = parts.file(
            data, blob=1 if name == "other" else 0, mtime=MTIME)
    return write_rafs_image(parts, tmp_path / "img"), files


def read(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


@dataclass(frozen=True)
class Daemon:
    """The processes of one mount: the worker answers, the owner holds the instance (a
    supervisor; a plain daemon, ``--no-supervise``, is both)."""

    worker: int
    owner: int

    def alive(self) -> bool:
        return alive(self.worker) or alive(self.owner)

    def kill(self) -> None:
        for pid in {self.worker, self.owner}:
            if alive(pid):
                os.kill(pid, signal.SIGCONT)
                os.kill(pid, signal.SIGKILL)


def mount(img: WrittenImage, mnt: Path, cache: Path, mode: str, *extra: str) -> Daemon:
    mnt.mkdir(exist_ok=True)
    res = run(rafs_cmd("mount", img.ref, mnt, "--cache-dir", cache, "--mode", mode,
                       "--no-prefetch", *extra), timeout=180)
    assert res.returncode == 0, res.stderr
    stats = read_stats(mnt)
    worker = int(stats["pid"])  # type: ignore[call-overload]
    return Daemon(worker, int(stats.get("owner_pid", worker)))  # type: ignore[call-overload]


def assert_gone(mnt: Path, daemon: Daemon) -> None:
    assert str(mnt) not in rafs_mounts()
    assert not daemon.alive()
    assert not daemon_pids(mnt)
    assert not [i for i in instance_dirs() if i.startswith(_key(mnt))]
    assert not [m for m in mine(mnt.parent) if m["mountpoint"] == str(mnt)]


def _key(mnt: Path) -> str:
    import hashlib

    return hashlib.sha256(str(mnt).encode()).hexdigest()[:16]


# -- the import graph --------------------------------------------------------------


def _imports(path: Path) -> set[str]:
    """fused modules a module imports, at any level (lazy imports included; imports for
    type checkers only, under ``if TYPE_CHECKING:``, are not imports at run time)."""
    out = set()
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            node.body = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                names = [node.module] if node.module else [a.name for a in node.names]
                out |= {n.split(".")[0] for n in names}
            elif node.module and node.module.startswith("fused."):
                out.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".")[1] for a in node.names if a.name.startswith("fused.")}
    return out


def test_fused_has_no_import_cycles_and_every_module_imports_alone():
    modules = {p.stem: p for p in (REPO / "fused").glob("*.py") if p.stem != "__init__"}
    graph = {m: _imports(p) & set(modules) - {m} for m, p in modules.items()}
    done: set[str] = set()

    def visit(m: str, path: list[str]) -> None:
        if m in path:
            raise AssertionError(f"import cycle: {' -> '.join([*path[path.index(m):], m])}")
        if m in done:
            return
        for dep in sorted(graph[m]):
            visit(dep, [*path, m])
        done.add(m)

    for m in sorted(graph):
        visit(m, [])
    light = ("cli", "client", "options", "runstate", "mounts", "control", "wire", "kernelmount")
    for m in sorted(modules):
        code = (f"import sys, fused.{m}; heavy = {{'trio', 'pyfuse3'}} & set(sys.modules); "
                f"print(','.join(sorted(heavy)))")
        res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                             text=True, timeout=60, check=False)
        assert res.returncode == 0, f"fused.{m} does not import alone:\n{res.stderr}"
        if m in light:  # the command line must start without them
            assert res.stdout.strip() == "", f"fused.{m} pulls in {res.stdout.strip()}"


# -- following the kernel --------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_a_plain_umount_ends_the_daemon_and_the_mount_point_mounts_again(
        image, tmp_path, mode):
    img, files = image
    mnt = tmp_path / "mnt"
    d = mount(img, mnt, tmp_path / "cache", mode)
    assert d.owner != d.worker, "supervised by default"
    assert read(mnt / "small") == files["small"]
    subprocess.run(["umount", str(mnt)], check=True)
    took = wait_until(lambda: not d.alive(), 30, "the supervisor and its worker to exit")
    print(f"{mode}: daemon gone {took:.3f}s after umount")
    wait_until(lambda: not [i for i in instance_dirs() if i.startswith(_key(mnt))], 10,
               "its run state to go")
    assert_gone(mnt, d)
    assert not [m for m in blob_mounts() if _key(mnt) in m]
    log = list((run_dir() / "logs").glob(f"{_key(mnt)}-*.log"))
    assert log == [], f"a clean exit keeps no log: {log}"
    with mounted(img.ref, mnt, tmp_path / "cache", mode=mode) as again:
        assert read(again / "big") == files["big"]


@pytest.mark.parametrize("mode", MODES)
def test_a_lazy_umount_outside_rafs_serves_open_files_then_ends_the_daemon(
        image, tmp_path, mode):
    img, files = image
    mnt = tmp_path / "mnt"
    d = mount(img, mnt, tmp_path / "cache", mode)
    with open(mnt / "big", "rb") as f:
        subprocess.run(["umount", "-l", str(mnt)], check=True)
        assert str(mnt) not in rafs_mounts()
        time.sleep(1)
        assert alive(d.worker) and alive(d.owner), "the daemon must serve the files still open"
        assert f.read() == files["big"]
    took = wait_until(lambda: not d.alive(), 30, "the daemon to exit after the last close")
    print(f"{mode}: daemon gone {took:.3f}s after the last close")
    wait_until(lambda: not [i for i in instance_dirs() if i.startswith(_key(mnt))], 10,
               "its run state to go")
    assert_gone(mnt, d)


@pytest.mark.parametrize(("mode", "supervise"),
                         [("fuse", True), ("kernel", True), ("fuse", False), ("kernel", False)])
def test_a_mount_point_whose_daemon_was_killed_mounts_again(image, tmp_path, mode, supervise):
    """SIGKILL of the owner (the supervisor; a plain daemon) ends the instance: it is
    ``dead``, and the one teardown path undoes it when the mount point is mounted again,
    the supervisor's orphaned worker included."""
    img, files = image
    mnt = tmp_path / "mnt"
    d = mount(img, mnt, tmp_path / "cache", mode,
              "--supervise" if supervise else "--no-supervise")
    assert (d.owner != d.worker) == supervise
    [dead] = [i for i in instance_dirs() if i.startswith(_key(mnt))]
    os.kill(d.owner, signal.SIGKILL)
    wait_until(lambda: not alive(d.owner), 10, "the owner to die")
    [entry] = [m for m in mine(tmp_path) if m["id"] == dead]
    assert entry["state"] == "dead" and entry["mounted"], entry
    with mounted(img.ref, mnt, tmp_path / "cache", mode=mode) as again:
        assert not d.alive(), "the dead instance's worker must be gone with it"
        assert read(again / "other") == files["other"]
        assert dead not in instance_dirs()
        [live] = mine(tmp_path)
        assert live["state"] == "serving" and live["id"] != dead and live["mode"] == mode
        if mode == "kernel":
            assert [m for m in blob_mounts() if _key(mnt) in m] == \
                [str(run_dir() / "mounts" / str(live["id"]) / "blobs")]


@pytest.mark.parametrize("mode", MODES)
def test_a_killed_or_terminated_worker_is_replaced_and_the_mount_serves_on(
        image, tmp_path, mode):
    """SIGKILL of the worker is a failover (tests/test_failover.py loads it); SIGTERM of
    a worker on an idle connection ends it at once and cleanly (exit status 0, not the
    exit deadline's 3), and it is replaced too. Readers see no error."""
    img, files = image
    mnt = tmp_path / "mnt"
    d = mount(img, mnt, tmp_path / "cache", mode)
    key = _key(mnt)
    worker = d.worker
    for signum in (signal.SIGKILL, signal.SIGTERM):
        start = time.monotonic()
        os.kill(worker, signum)
        wait_until(lambda w=worker: not alive(w), 30, "the worker to exit")  # type: ignore[misc]
        print(f"{mode}: worker gone {time.monotonic() - start:.3f}s after "
              f"{signal.Signals(signum).name}")
        assert read(mnt / "big") == files["big"]
        wait_until(lambda w=worker: (m := [m for m in mine(tmp_path)])  # type: ignore[misc]
                   and m[0]["state"] == "serving" and m[0]["pid"] not in (w, None), 60,
                   "a new worker to serve")
        [info] = mine(tmp_path)
        assert info["owner_pid"] == d.owner and info["restarts"] >= 1
        old, worker = worker, int(info["pid"])  # type: ignore[call-overload]
        assert alive(worker) and alive(d.owner)
    [log] = (run_dir() / "logs").glob(f"{key}-*.log")
    text = log.read_text()
    assert f"(pid {old}) exited: exit status 0" in text, text[-3000:]
    assert "still not done" not in text
    run(rafs_cmd("umount", mnt), timeout=120, check=True)
    assert_gone(mnt, d)
    assert not alive(worker)


@pytest.mark.parametrize(("mode", "supervise"),
                         [("fuse", True), ("kernel", True), ("fuse", False)])
def test_a_sigterm_of_the_owner_unmounts_cleanly(image, tmp_path, mode, supervise):
    img, files = image
    mnt = tmp_path / "mnt"
    d = mount(img, mnt, tmp_path / "cache", mode,
              "--supervise" if supervise else "--no-supervise")
    assert read(mnt / "small") == files["small"]
    os.kill(d.owner, signal.SIGTERM)
    took = wait_until(lambda: not d.alive(), 60, "the daemon to exit after SIGTERM")
    print(f"{mode}: gone {took:.3f}s after SIGTERM of the owner")
    wait_until(lambda: not [i for i in instance_dirs() if i.startswith(_key(mnt))], 10,
               "its run state to go")
    assert_gone(mnt, d)
    assert not [m for m in blob_mounts() if _key(mnt) in m]


def test_where_takeover_cannot_work_a_mount_is_a_plain_daemon_and_says_so_once(
        image, tmp_path, monkeypatch, caplog):
    """A kernel without FUSE_NOTIFY_RESEND cannot be had on demand here: the version
    check is replaced (the only fake); the rest is a real mount, through the client."""
    import logging

    from fused import client, fusedev
    from fused.options import MountOptions

    assert fusedev.takeover_blocker("6.18.0") in (None, f"{fusedev.DEVICE} cannot be opened "
                                                  f"by uid {os.geteuid()}")
    assert "no FUSE_NOTIFY_RESEND (Linux >= 6.9)" in str(fusedev.takeover_blocker("6.8.12"))
    monkeypatch.setattr(fusedev, "kernel_has_resend", lambda release=None: False)
    monkeypatch.setattr(client, "_fallback_logged", False)
    img, files = image
    opts = MountOptions(str(tmp_path / "cache"), mode="fuse", prefetch=False)
    assert opts.supervise, "supervised by default"
    infos = []
    with caplog.at_level(logging.INFO, logger="fused.client"):
        try:
            for name in ("a", "b"):
                (tmp_path / name).mkdir()
                infos.append(client.mount(img.ref, tmp_path / name, opts))
                assert read(tmp_path / name / "small") == files["small"]
        finally:
            for name in ("a", "b"):
                with contextlib.suppress(Exception):
                    client.unmount(tmp_path / name)
    assert len(infos) == 2
    assert all(not i.supervised and i.pid == i.owner_pid for i in infos), infos
    lines = [r.getMessage() for r in caplog.records if "without a supervisor" in r.getMessage()]
    assert len(lines) == 1 and "FUSE_NOTIFY_RESEND" in lines[0], lines


def test_two_mounts_of_one_mount_point_at_once_give_one_mount(image, tmp_path):
    img, _ = image
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    argv = rafs_cmd("mount", img.ref, mnt, "--cache-dir", tmp_path / "cache", "--mode", "fuse")
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.wait(timeout=180), p.stderr.read()) for p in procs]  # type: ignore[union-attr]
    try:
        assert sorted(r for r, _ in results) == [0, 1], results
        assert "already a rafs mount" in next(e for r, e in results if r)
        assert len([m for m in mine(tmp_path) if m["mounted"]]) == 1
    finally:
        run(rafs_cmd("umount", mnt), timeout=60)


# -- teardown that always works ----------------------------------------------------


def blocked_reader(path: Path) -> subprocess.Popen[bytes]:
    reader = subprocess.Popen(["cat", str(path)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)
    time.sleep(1.5)
    assert reader.poll() is None, "the reader should be blocked"
    return reader


@pytest.mark.parametrize(("mode", "supervise"),
                         [("fuse", True), ("kernel", True), ("fuse", False), ("kernel", False)])
def test_umount_force_ends_a_stopped_daemon_while_a_reader_waits_on_it(
        image, tmp_path, mode, supervise):
    """The worker (a plain daemon) is stopped with SIGSTOP and a reader waits on it: a
    plain ``rafs umount`` reports it (supervised: the mount is busy and its worker
    stopped; plain: the daemon does not answer) and points at ``--force``, which aborts
    the connection (the reader fails at once) and ends every process of the mount."""
    img, _ = image
    mnt = tmp_path / "mnt"
    d = mount(img, mnt, tmp_path / "cache", mode,
              "--supervise" if supervise else "--no-supervise")
    os.kill(d.worker, signal.SIGSTOP)
    reader = blocked_reader(mnt / "big")
    try:
        plain = run(rafs_cmd("umount", "--timeout", "5", mnt), timeout=120)
        error = assert_clean_error(plain)
        assert "--force" in error
        if supervise:
            assert f"worker {d.worker} is stopped" in error
        assert alive(d.owner) and reader.poll() is None  # nothing changed
        start = time.monotonic()
        res = run(rafs_cmd("umount", "--force", mnt), timeout=120)
        print(f"{mode}: rafs umount --force took {time.monotonic() - start:.3f}s")
        assert res.returncode == 0, res.stderr
        assert reader.wait(timeout=30) != 0  # an error, at once, never wrong bytes
        assert_gone(mnt, d)
        assert not [m for m in blob_mounts() if _key(mnt) in m]
    finally:
        if reader.poll() is None:
            reader.kill()
        d.kill()


@pytest.mark.parametrize("mode", MODES)
def test_a_plain_umount_of_a_mount_whose_worker_is_stopped_and_idle_ends_it(
        image, tmp_path, mode):
    """Nobody waits on the stopped worker: the unmount itself succeeds, and the
    supervisor continues the worker so that it ends at once (not after the drain
    bound, with SIGKILL)."""
    img, _ = image
    mnt = tmp_path / "mnt"
    d = mount(img, mnt, tmp_path / "cache", mode)
    os.kill(d.worker, signal.SIGSTOP)
    try:
        start = time.monotonic()
        res = run(rafs_cmd("umount", mnt), timeout=120)
        print(f"{mode}: rafs umount of a stopped worker took {time.monotonic() - start:.3f}s")
        assert res.returncode == 0, res.stderr
        assert_gone(mnt, d)
        [] = list((run_dir() / "logs").glob(f"{_key(mnt)}-*.log"))  # a clean exit
    finally:
        d.kill()


@pytest.mark.parametrize("mode", MODES)
def test_a_worker_stopped_longer_than_the_answer_bound_is_replaced(image, tmp_path, mode):
    """A reader waits on a stopped worker at most as long as a read may wait for its
    chunks (``--fetch-timeout 1 --retries 0``: 6 s); then the supervisor kills the
    worker and the next one answers the resent request with the right bytes."""
    img, files = image
    mnt = tmp_path / "mnt"
    d = mount(img, mnt, tmp_path / "cache", mode, "--fetch-timeout", "1", "--retries", "0")
    os.kill(d.worker, signal.SIGSTOP)
    try:
        start = time.monotonic()
        reader = subprocess.run(["sha256sum", str(mnt / "big")], capture_output=True,
                                text=True, timeout=120, check=False)
        print(f"{mode}: the reader waited {time.monotonic() - start:.3f}s")
        assert reader.returncode == 0, reader.stderr
        assert reader.stdout.split()[0] == hashlib.sha256(files["big"]).hexdigest()
        assert not alive(d.worker)
        [info] = mine(tmp_path)
        assert info["owner_pid"] == d.owner and info["pid"] != d.worker
        assert info["restarts"] == 1
        run(rafs_cmd("umount", mnt), timeout=120, check=True)
        assert_gone(mnt, Daemon(int(info["pid"]), d.owner))  # type: ignore[call-overload]
    finally:
        d.kill()


def fifo_blob(img: WrittenImage) -> None:
    """Blob 1 becomes a FIFO nobody writes: reading it blocks forever, in a thread."""
    blob = img.layout / "blobs" / "sha256" / img.blob_digests[1].removeprefix("sha256:")
    blob.unlink()
    os.mkfifo(blob)


@pytest.mark.parametrize(("mode", "kill_reader", "supervise"),
                         [("fuse", False, True), ("kernel", False, True),
                          ("kernel", True, True), ("fuse", False, False),
                          ("kernel", True, False)])
def test_sigterm_ends_a_daemon_whose_reads_never_return(image, tmp_path, mode, kill_reader,
                                                        supervise):
    """SIGTERM to the owner (the supervisor, or a plain daemon) ends the mount even when
    a read never returns. ``kill_reader``: the reader is killed first, so EROFS holds a
    locked page whose read never completes, and unmounting it waits for that read
    (issue 18's zombie)."""
    img, files = image
    fifo_blob(img)
    mnt = tmp_path / "mnt"
    d = mount(img, mnt, tmp_path / "cache", mode, "--fetch-timeout", "600",
              "--supervise" if supervise else "--no-supervise")
    assert read(mnt / "small") == files["small"]
    reader = blocked_reader(mnt / "other")
    try:
        if kill_reader:
            reader.kill()
            reader.wait(timeout=30)
        os.kill(d.owner, signal.SIGTERM)
        took = wait_until(lambda: not d.alive(), 60, "the daemon to exit after SIGTERM")
        print(f"{mode}: daemon gone {took:.3f}s after SIGTERM")
        assert reader.wait(timeout=30) != 0
        assert_gone(mnt, d)
        assert not [m for m in blob_mounts() if _key(mnt) in m]
    finally:
        if reader.poll() is None:
            reader.kill()
        d.kill()


# -- one view of the node --------------------------------------------------------------


def test_ls_shows_every_mount_with_its_state_and_umount_all_ends_them(
        image, tmp_path, monkeypatch):
    import shutil
    import tempfile

    img, _ = image
    cache = tmp_path / "cache"
    # `umount --all` ends every mount of a run directory: give this test its own
    private = tempfile.mkdtemp(prefix="rafs-ls-")
    monkeypatch.setenv("RAFS_RUN_DIR", private)
    daemons = {mode: mount(img, tmp_path / mode, cache, mode) for mode in MODES}
    dead = mount(img, tmp_path / "dead", cache, "fuse")
    stopped = mount(img, tmp_path / "stopped", cache, "kernel")
    os.kill(dead.owner, signal.SIGKILL)  # the supervisor: its worker is orphaned
    wait_until(lambda: not alive(dead.owner), 10, "the supervisor to die")
    os.kill(stopped.worker, signal.SIGSTOP)
    try:
        listed = {Path(str(m["mountpoint"])).name: m for m in mine(tmp_path)}
        assert set(listed) == {"fuse", "kernel", "dead", "stopped"}
        for mode in MODES:
            m, d = listed[mode], daemons[mode]
            assert (m["state"], m["mode"], m["pid"], m["owner_pid"], m["image"],
                    m["mounted"], m["supervised"]) == \
                ("serving", mode, d.worker, d.owner, img.ref, True, True), m
            assert m["version"] and isinstance(m["cache_bytes"], int)
        assert (listed["dead"]["state"], listed["dead"]["pid"]) == ("dead", dead.worker)
        assert listed["stopped"]["state"] == "unresponsive"
        table = run(rafs_cmd("ls"), timeout=60, check=True).stdout
        assert str(tmp_path / "kernel") in table and "serving" in table
        res = run(rafs_cmd("umount", "--all", "--force"), timeout=180)
        assert res.returncode == 0, res.stderr
        assert mine(tmp_path) == []
        assert not [mp for mp in rafs_mounts() if mp.startswith(f"{tmp_path}/")]
        assert not any(d.alive() for d in [*daemons.values(), dead, stopped])
        assert list((Path(private) / "mounts").iterdir()) == []
    finally:
        for d in [*daemons.values(), dead, stopped]:
            d.kill()
        run(rafs_cmd("umount", "--all", "--force"), timeout=180)
        shutil.rmtree(private, ignore_errors=True)
