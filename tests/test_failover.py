"""Supervised mounts on real FUSE and EROFS mounts: workers die, readers never notice.

Each test mounts a real image from the real registry fixture with
``rafs mount --supervise`` (private run directory, fresh cache), runs the
byte-verifying readers of ``tests.helpers.readers`` in a separate process
(sha256 of every read against a umoci unpack of the source image) and kills
workers with SIGKILL. ``no_leaks`` fails a test that leaves a mount, a
supervisor or a worker behind. Faults a real part cannot produce on demand (a
fetch that is still in flight when the worker dies) come from the fault proxy
between the daemon and the registry.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fused.runstate import instances
from tests.helpers.faultproxy import Fault, FaultProxy
from tests.helpers.mounts import mounted, rafs_cmd, rafs_mounts, read_stats
from tests.helpers.procs import run
from tests.helpers.readers import ReaderLoad
from tests.helpers.umoci import umoci_unpack

pytestmark = [pytest.mark.fuse, pytest.mark.kernel]

MODES = ["fuse", "kernel"]


# -- fixtures -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def expected(debian_image: tuple[Path, str], tmp_path_factory: pytest.TempPathFactory
             ) -> dict[str, str]:
    """sha256 of 300 random regular files of the python3 image (its 40 largest among
    them, so reads span many chunks), from a umoci unpack of the source image."""
    src, tag = debian_image
    root = umoci_unpack(src, tag, tmp_path_factory.mktemp("ref") / "rootfs")
    files: list[tuple[int, str]] = []
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if os.path.isfile(path) and not os.path.islink(path) and st.st_size > 0:
                files.append((st.st_size, os.path.relpath(path, root)))
    files.sort(reverse=True)
    rng = random.Random(12)
    chosen = [rel for _, rel in files[:40]] + rng.sample([rel for _, rel in files[40:]], 260)
    out = {}
    for rel in chosen:
        with open(root / rel, "rb") as f:
            out[rel] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    run_dir = tmp_path / "run"
    monkeypatch.setenv("RAFS_RUN_DIR", str(run_dir))
    return {"RAFS_RUN_DIR": str(run_dir)}


def our_processes(tmp_path: Path) -> list[int]:
    res = subprocess.run(["pgrep", "-f", f"fused[.](supervisor|worker) .* {tmp_path}/"],
                         capture_output=True, text=True, check=False)
    return [int(p) for p in res.stdout.split()]


@pytest.fixture(autouse=True)
def no_leaks(tmp_path: Path, env: dict[str, str]) -> Iterator[None]:
    yield
    leaked = [mp for mp in rafs_mounts() if mp.startswith(f"{tmp_path}/")]
    for mp in leaked:
        subprocess.run(["umount", "-l", mp], check=False)
    pids = our_processes(tmp_path)
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    assert not leaked, f"leaked mounts: {leaked}"
    assert not pids, f"leaked processes: {pids}"


# -- helpers ------------------------------------------------------------------------


def state(mp: Path) -> dict[str, object]:
    """The state file of the (one) daemon instance of ``mp``, {} if there is none."""
    for inst in instances(mp):
        st = inst.state()
        if st:
            return st
    return {}


def wait_serving(mp: Path, not_pid: int | None = None, timeout: float = 120) -> int:
    """The pid of the worker serving ``mp`` once one other than ``not_pid`` does."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = state(mp)
        pid = st.get("worker_pid")
        if st.get("phase") == "serving" and isinstance(pid, int) and pid != not_pid:
            return pid
        time.sleep(0.02)
    raise AssertionError(f"no new worker serves {mp} after {timeout}s: {state(mp)}")


def pid_gone(pid: int, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return True
        if stat.rpartition(")")[2].split()[0] == "Z":
            return True
        time.sleep(0.05)
    return False


def prefetch_state(mp: Path, env: dict[str, str]) -> str:
    """In process (``fused.client``, on the ``env`` fixture's run directory): quick."""
    from fused import client
    from fused.errors import ControlError

    try:
        return str(client.stats(mp)["stats"]["prefetch"]["state"])
    except ControlError:  # between two workers
        return "restarting"


def supervised(*extra: str) -> list[str]:
    return ["--supervise", "--max-crashes", "1000", *extra]


def assert_clean(result: object) -> None:
    assert result.error_count == 0, result.errors  # type: ignore[attr-defined]
    assert not result.mismatches, result.mismatches  # type: ignore[attr-defined]


# -- failover -----------------------------------------------------------------------


@pytest.mark.parametrize(("mode", "standby"),
                         [("fuse", False), ("kernel", False), ("fuse", True), ("kernel", True)])
def test_64_readers_see_no_error_while_the_worker_is_killed_20_times(
    mode: str, standby: bool, rafs_python_ref: str, expected: dict[str, str],
    env: dict[str, str], tmp_path: Path,
) -> None:
    """Without a standby (the default) each kill waits for a new worker to start, with
    one (``--standby``) the next worker is ready: readers see a delay either way."""
    rng = random.Random(mode)
    with mounted(rafs_python_ref, tmp_path / "mnt", tmp_path / "cache", env=env, mode=mode,
                 extra_args=supervised("--standby" if standby else "--no-standby")) as mp:
        first = wait_serving(mp)
        with ReaderLoad(mp, expected, tmp_path, threads=64) as load:
            time.sleep(1.0)
            pid = first
            for _ in range(20):
                time.sleep(rng.uniform(0.1, 0.6))
                os.kill(pid, signal.SIGKILL)
                pid = wait_serving(mp, not_pid=pid)
            time.sleep(1.0)
            result = load.stop()
        stats = read_stats(mp, env)
    assert_clean(result)
    assert result.reads >= 64  # (no throughput figure: the machine is shared)
    assert stats["supervisor"]["restarts"] == 20  # type: ignore[index]
    assert stats["pid"] == pid


@pytest.mark.parametrize("mode", MODES)
def test_a_fetch_in_flight_when_the_worker_dies_is_answered_by_the_next(
    mode: str, rafs_python_ref: str, expected: dict[str, str], registry: object,
    env: dict[str, str], tmp_path: Path,
) -> None:
    big = next(iter(expected))  # the largest file
    one = {big: expected[big]}
    with FaultProxy(registry.host) as proxy:  # type: ignore[attr-defined]
        ref = rafs_python_ref.replace(registry.host, proxy.host)  # type: ignore[attr-defined]
        with mounted(ref, tmp_path / "mnt", tmp_path / "cache", env=env, mode=mode,
                     extra_args=supervised("--no-prefetch")) as mp:
            pid = wait_serving(mp)
            rule = proxy.inject(Fault.stall(3.0), times=1, match=lambda r: r.method == "GET"
                                and "/blobs/" in r.path and r.range is not None)
            proxy.reset_records()
            with ReaderLoad(mp, one, tmp_path, threads=1) as load:
                deadline = time.monotonic() + 60
                while rule.hits == 0 and time.monotonic() < deadline:
                    time.sleep(0.01)
                assert rule.hits == 1, "the reader's fetch never reached the registry"
                os.kill(pid, signal.SIGKILL)
                new = wait_serving(mp, not_pid=pid)
                time.sleep(1.0)
                result = load.stop()
            ranged = [x for x in proxy.exchanges if x.method == "GET" and "/blobs/" in x.path]
    assert_clean(result)
    assert result.reads >= 1
    assert new != pid
    assert len(ranged) >= 2  # the stalled fetch, then the new worker's


@pytest.mark.parametrize("mode", MODES)
def test_killing_the_worker_while_prefetch_runs(
    mode: str, registry: object, debian_image: tuple[Path, str], expected: dict[str, str],
    env: dict[str, str], tmp_path: Path,
) -> None:
    from converter.convert import ConvertOptions, convert

    src, tag = debian_image
    prefetch = [os.fsencode(f"/{rel}") for rel in sorted(expected)[:150]]
    ref = registry.ref("rafs/failover", f"prefetch-{mode}")  # type: ignore[attr-defined]
    convert(f"oci:{src}:{tag}", ref, ConvertOptions(progress=False, prefetch=prefetch))
    with FaultProxy(registry.host) as proxy:  # type: ignore[attr-defined]
        # Slow every blob fetch, so prefetch (a few merged ranges) still runs when the
        # worker dies.
        proxy.inject(Fault.stall(2.0), times=1000, match=lambda r: r.method == "GET"
                     and "/blobs/" in r.path and r.range is not None)
        ref = ref.replace(registry.host, proxy.host)  # type: ignore[attr-defined]
        with mounted(ref, tmp_path / "mnt", tmp_path / "cache", env=env, mode=mode,
                     extra_args=supervised()) as mp:
            pid = wait_serving(mp)
            with ReaderLoad(mp, expected, tmp_path, threads=16) as load:
                deadline = time.monotonic() + 180  # (a loaded machine starts it late)
                while prefetch_state(mp, env) != "running":  # type: ignore[index]
                    assert time.monotonic() < deadline, "prefetch never ran"
                    time.sleep(0.05)
                os.kill(pid, signal.SIGKILL)
                wait_serving(mp, not_pid=pid)
                deadline = time.monotonic() + 180
                while prefetch_state(mp, env) != "done":  # type: ignore[index]
                    assert time.monotonic() < deadline, "the new worker's prefetch never ended"
                    time.sleep(0.2)
                result = load.stop()
    assert_clean(result)
    assert result.reads > 0


# -- where the kernel cannot resend ------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_without_resend_a_read_in_flight_fails_clearly_and_the_mount_serves_on(
    mode: str, rafs_python_ref: str, expected: dict[str, str], registry: object,
    env: dict[str, str], tmp_path: Path,
) -> None:
    """``--no-resend`` behaves as a kernel older than 6.9: the dead worker's requests
    end at once with ECONNABORTED (no hang) and later reads are served by the next
    worker. In fuse mode the reader reads with O_DIRECT, so the error reaches it as
    it is; a buffered read (kernel mode here, EROFS over the blob files) has its
    failed readahead retried by the kernel, which the next worker answers: the
    reader sees at most EIO, usually nothing."""
    big = next(iter(expected))  # the largest file
    one = {big: expected[big]}
    with FaultProxy(registry.host) as proxy:  # type: ignore[attr-defined]
        ref = rafs_python_ref.replace(registry.host, proxy.host)  # type: ignore[attr-defined]
        with mounted(ref, tmp_path / "mnt", tmp_path / "cache", env=env, mode=mode,
                     extra_args=supervised("--no-prefetch", "--no-resend")) as mp:
            pid = wait_serving(mp)
            rule = proxy.inject(Fault.stall(20.0), times=1, match=lambda r: r.method == "GET"
                                and "/blobs/" in r.path and r.range is not None)
            with ReaderLoad(mp, one, tmp_path, threads=1, direct=mode == "fuse") as load:
                deadline = time.monotonic() + 60
                while rule.hits == 0 and time.monotonic() < deadline:
                    time.sleep(0.01)
                assert rule.hits == 1
                killed = time.monotonic()
                os.kill(pid, signal.SIGKILL)
                wait_serving(mp, not_pid=pid)
                time.sleep(2.0)
                result = load.stop(timeout=15)  # long before the stalled fetch answers
    assert not result.mismatches
    assert result.reads >= 1  # the same file, read again through the next worker
    assert all(e["errno"] in ("ECONNABORTED", "EIO") for e in result.errors), result.errors
    assert all(float(e["at"]) - killed < 10 for e in result.errors), result.errors
    if mode == "fuse":
        assert result.errors and result.errors[0]["errno"] == "ECONNABORTED", result.errors


# -- crash loops, signals ----------------------------------------------------------------


def test_a_crash_loop_gives_the_mount_up_cleanly(
    rafs_python_ref: str, expected: dict[str, str], env: dict[str, str], tmp_path: Path,
) -> None:
    mp = tmp_path / "mnt"
    mp.mkdir()
    res = run(rafs_cmd("mount", rafs_python_ref, mp, "--cache-dir", tmp_path / "cache",
                       "--mode", "fuse", "--supervise", "--max-crashes", "3",
                       "--crash-window", "600"), env=env, timeout=180)
    assert res.returncode == 0, res.stderr
    supervisor = int(state(mp)["owner_pid"])  # type: ignore[call-overload]
    log = Path(str(state(mp)["log"]))
    with ReaderLoad(mp, expected, tmp_path, threads=8) as load:
        pid = wait_serving(mp)
        for _ in range(2):
            os.kill(pid, signal.SIGKILL)
            pid = wait_serving(mp, not_pid=pid)
        os.kill(pid, signal.SIGKILL)  # the third crash within the window
        assert pid_gone(supervisor, 60), "the supervisor did not give up"
        result = load.stop()  # no reader hangs
    assert not result.mismatches
    assert str(mp) not in rafs_mounts()
    assert not instances(mp), "the run state outlived the supervisor"
    assert "giving up" in log.read_text()


def test_sigterm_to_the_supervisor_unmounts_and_ends_everything(
    rafs_python_ref: str, env: dict[str, str], tmp_path: Path,
) -> None:
    mp = tmp_path / "mnt"
    with mounted(rafs_python_ref, mp, tmp_path / "cache", env=env, mode="kernel",
                 extra_args=supervised()):
        worker = wait_serving(mp)
        supervisor = int(state(mp)["owner_pid"])  # type: ignore[call-overload]
        os.kill(supervisor, signal.SIGTERM)
        assert pid_gone(supervisor) and pid_gone(worker)
        assert str(mp) not in rafs_mounts()
        assert not [m for m in rafs_mounts() if m.startswith(env["RAFS_RUN_DIR"])]
        assert not instances(mp)


def test_a_killed_supervisor_leaves_the_worker_serving(
    rafs_python_ref: str, expected: dict[str, str], env: dict[str, str], tmp_path: Path,
) -> None:
    mp = tmp_path / "mnt"
    some = dict(list(expected.items())[:30])
    with mounted(rafs_python_ref, mp, tmp_path / "cache", env=env, mode="fuse",
                 extra_args=supervised()):
        worker = wait_serving(mp)
        standby = state(mp)["standby_pid"]
        os.kill(int(state(mp)["owner_pid"]), signal.SIGKILL)  # type: ignore[call-overload]
        with ReaderLoad(mp, some, tmp_path, threads=4) as load:
            time.sleep(2.0)
            result = load.stop()
        assert_clean(result)
        assert result.reads > 0
        listed = json.loads(run(rafs_cmd("ls", "--json"), env=env, timeout=60).stdout)
        assert [m["state"] for m in listed if m["mountpoint"] == str(mp)] == ["dead"]
        # The instance is dead (its lock went with the supervisor): undone, workers too.
        res = run(rafs_cmd("umount", mp), env=env, timeout=60)
        assert res.returncode == 0, res.stderr
        assert pid_gone(worker)
        assert not isinstance(standby, int) or pid_gone(standby)
    assert str(mp) not in rafs_mounts()
    assert not instances(mp)


@pytest.mark.parametrize("mode", MODES)
def test_a_plain_umount_of_a_supervised_mount_ends_it_and_the_path_mounts_again(
    mode: str, rafs_python_ref: str, env: dict[str, str], tmp_path: Path,
) -> None:
    """Follow the kernel: ``umount`` outside rafs (fuse mode: the connection ends;
    kernel mode: EROFS leaves the mount table, then the blob mount goes) ends the
    supervisor and its workers, with the run state; the same path mounts again."""
    with mounted(rafs_python_ref, tmp_path / "mnt", tmp_path / "cache", env=env, mode=mode,
                 extra_args=supervised()) as mp:
        wait_serving(mp)
        st = state(mp)
        pids = [int(st["owner_pid"])] + [w["pid"] for w in st["workers"]]  # type: ignore
        subprocess.run(["umount", str(mp)], check=True)
        assert all(pid_gone(p, 30) for p in pids), "the supervisor or a worker stays"
        assert not instances(mp)
        assert not [m for m in rafs_mounts() if m.startswith(env["RAFS_RUN_DIR"])]
        res = run(rafs_cmd("mount", rafs_python_ref, mp, "--cache-dir", tmp_path / "cache",
                           "--mode", mode, *supervised()), env=env, timeout=180)
        assert res.returncode == 0, res.stderr
        assert (mp / "etc/os-release").read_text()


def test_rafs_ls_says_recovering_while_a_worker_is_replaced(
    rafs_python_ref: str, env: dict[str, str], tmp_path: Path,
) -> None:
    from fused import client

    with mounted(rafs_python_ref, tmp_path / "mnt", tmp_path / "cache", env=env,
                 extra_args=supervised("--no-standby")) as mp:
        pid = wait_serving(mp)
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while (new := state(mp).get("worker_pid")) in (pid, None):
            assert time.monotonic() < deadline, "no new worker was started"
            time.sleep(0.005)
        os.kill(int(new), signal.SIGSTOP)  # type: ignore[call-overload]
        try:  # held before it gets ready: the supervisor is still recovering
            info = client.find(mp)
            assert info is not None and info.state == "recovering", info
            assert state(mp)["phase"] == "recovering"
        finally:
            os.kill(int(new), signal.SIGCONT)  # type: ignore[call-overload]
        assert wait_serving(mp) == new
        info = client.find(mp)
        assert info is not None and (info.state, info.pid, info.restarts) == ("serving", new, 1)


# -- hot upgrade ----------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_upgrade_under_read_load(
    mode: str, rafs_python_ref: str, expected: dict[str, str], env: dict[str, str],
    tmp_path: Path,
) -> None:
    with mounted(rafs_python_ref, tmp_path / "mnt", tmp_path / "cache", env=env, mode=mode,
                 extra_args=supervised()) as mp:
        pid = wait_serving(mp)
        with ReaderLoad(mp, expected, tmp_path, threads=64) as load:
            for _ in range(3):
                time.sleep(1.0)
                res = run(rafs_cmd("upgrade", mp), env=env, timeout=300)
                assert res.returncode == 0, res.stderr
                new = wait_serving(mp, not_pid=pid)
                assert f"worker {new}, version " in res.stdout
                version = res.stdout.strip().rpartition("version ")[2]
                listed = json.loads(run(rafs_cmd("ls", "--json"), env=env, timeout=60).stdout)
                row = next(m for m in listed if m["mountpoint"] == str(mp))
                assert (row["state"], row["pid"], row["version"]) == ("serving", new, version)
                assert pid_gone(pid), "the old worker did not exit"
                pid = new
            time.sleep(1.0)
            result = load.stop()
        stats = read_stats(mp, env)
    assert_clean(result)
    assert result.reads >= 64
    assert stats["pid"] == pid
    assert stats["supervisor"]["version"]  # type: ignore[index]
    assert stats["supervisor"]["restarts"] == 0  # type: ignore[index]


def test_upgrade_of_an_unsupervised_mount_is_one_clear_error(
    rafs_python_ref: str, env: dict[str, str], tmp_path: Path,
) -> None:
    with mounted(rafs_python_ref, tmp_path / "mnt", tmp_path / "cache", env=env,
                 extra_args=["--no-supervise"]) as mp:
        res = run(rafs_cmd("upgrade", mp), env=env, timeout=60)
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rafs: error: cannot upgrade"), res.stderr
    assert "--supervise" in lines[0]



@pytest.mark.parametrize("mode", MODES)
def test_a_supervised_mount_of_a_plain_oci_image_is_one_error_line_and_leaves_nothing(
    mode: str, debian_image: tuple[Path, str], env: dict[str, str], tmp_path: Path,
) -> None:
    """The first worker's error reaches ``rafs mount`` through the supervisor."""
    src, tag = debian_image
    mp = tmp_path / "mnt"
    mp.mkdir()
    res = run(rafs_cmd("mount", f"oci:{src}:{tag}", mp, "--cache-dir", tmp_path / "cache",
                       "--mode", mode, "--supervise"), env=env, timeout=180)
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "is not a RAFS image" in lines[0], res.stderr
    assert not instances(mp)
    assert not [m for m in rafs_mounts() if m.startswith(f"{tmp_path}/")]
