"""The node service (``rafs daemon``) on real mounts: forked daemons, supervisors and workers.

The service runs as a real process on a private run directory; mounts go
through the real ``rafs mount``, which finds it on its socket. Readers verify
every byte against a umoci unpack (``expected`` of ``tests.test_failover``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.mounts import REPO_ROOT, mounted, rafs_cmd, rafs_mounts, read_stats
from tests.helpers.procs import run
from tests.helpers.readers import ReaderLoad
from tests.test_failover import env, expected, pid_gone, state, wait_serving  # noqa: F401

pytestmark = [pytest.mark.fuse, pytest.mark.kernel]

MODES = ["fuse", "kernel"]


def _ppid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])


@pytest.fixture
def node(env: dict[str, str], tmp_path: Path) -> Iterator[int]:  # noqa: F811
    log = open(tmp_path / "node.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "fused.node"], stdout=log, stderr=log, cwd=REPO_ROOT,
        env={**os.environ, **env, "PYTHONPATH": str(REPO_ROOT)}, start_new_session=True)
    sock = Path(env["RAFS_RUN_DIR"]) / "node.sock"
    deadline = time.monotonic() + 60
    while not sock.exists():
        assert proc.poll() is None, (tmp_path / "node.log").read_text()
        assert time.monotonic() < deadline, "the node service did not start"
        time.sleep(0.05)
    try:
        yield proc.pid
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


@pytest.fixture(autouse=True)
def no_leaks(tmp_path: Path, env: dict[str, str]) -> Iterator[None]:  # noqa: F811
    yield
    leaked = [mp for mp in rafs_mounts() if mp.startswith(f"{tmp_path}/")]
    for mp in leaked:
        subprocess.run(["umount", "-l", mp], check=False)
    assert not leaked, f"leaked mounts: {leaked}"


@pytest.mark.parametrize("mode", MODES)
def test_a_supervised_mount_through_the_node_service_fails_over_on_forked_workers(
    mode: str, node: int, rafs_python_ref: str, expected: dict[str, str],  # noqa: F811
    env: dict[str, str], tmp_path: Path,  # noqa: F811
) -> None:
    with mounted(rafs_python_ref, tmp_path / "mnt", tmp_path / "cache", env=env, mode=mode,
                 extra_args=["--supervise", "--max-crashes", "100"]) as mp:
        pid = wait_serving(mp)
        supervisor = int(state(mp)["owner_pid"])  # type: ignore[call-overload]
        assert _ppid(supervisor) == node  # forked by the service, not spawned
        assert _ppid(pid) == supervisor
        assert b"fused.worker" not in Path(f"/proc/{pid}/cmdline").read_bytes()  # forked too
        with ReaderLoad(mp, expected, tmp_path, threads=32) as load:
            for _ in range(5):
                time.sleep(0.5)
                os.kill(pid, signal.SIGKILL)
                pid = wait_serving(mp, not_pid=pid)
                assert _ppid(pid) == supervisor
                assert b"fused.worker" not in Path(f"/proc/{pid}/cmdline").read_bytes()
            time.sleep(0.5)
            result = load.stop()
        stats = read_stats(mp, env)
        workers = [int(stats["pid"])]  # type: ignore[call-overload]
        standby = stats["supervisor"]["standby_pid"]  # type: ignore[index]
    assert result.error_count == 0, result.errors
    assert not result.mismatches
    assert result.reads >= 20
    assert stats["supervisor"]["restarts"] == 5  # type: ignore[index]
    for p in [supervisor, *workers, *([standby] if standby else [])]:
        assert pid_gone(p), f"process {p} outlived the mount"


def test_an_unsupervised_mount_through_the_node_service(
    node: int, rafs_python_ref: str, expected: dict[str, str], env: dict[str, str],  # noqa: F811
    tmp_path: Path,
) -> None:
    some = dict(list(expected.items())[:20])
    with mounted(rafs_python_ref, tmp_path / "mnt", tmp_path / "cache", env=env,
                 extra_args=["--no-supervise"]) as mp:
        daemon = int(read_stats(mp, env)["pid"])  # type: ignore[call-overload]
        assert _ppid(daemon) == node
        with ReaderLoad(mp, some, tmp_path, threads=4) as load:
            time.sleep(1.0)
            result = load.stop()
    assert result.error_count == 0 and not result.mismatches and result.reads > 0
    assert pid_gone(daemon)


def test_mounts_outlive_the_node_service_and_it_refuses_a_second_instance(
    node: int, rafs_python_ref: str, env: dict[str, str], tmp_path: Path,  # noqa: F811
) -> None:
    second = run([sys.executable, "-m", "fused.node"], env={**env, "PYTHONPATH": str(REPO_ROOT)},
                 timeout=60)
    assert second.returncode != 0
    assert "already answers" in second.stderr
    with mounted(rafs_python_ref, tmp_path / "mnt", tmp_path / "cache", env=env,
                 extra_args=["--supervise"]) as mp:
        os.kill(node, signal.SIGTERM)
        assert pid_gone(node)
        assert not (Path(env["RAFS_RUN_DIR"]) / "node.sock").exists()
        assert (mp / "usr/bin").is_dir()
        pid = wait_serving(mp)
        os.kill(pid, signal.SIGKILL)  # the supervisor, forked from the service, serves on
        wait_serving(mp, not_pid=pid)
        assert (mp / "etc/os-release").read_text()
        res = run(rafs_cmd("umount", mp), env=env, timeout=60)
        assert res.returncode == 0, res.stderr
