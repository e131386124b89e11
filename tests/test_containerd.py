"""containerd end to end: Debian's containerd with the rafs proxy snapshotter.

One containerd and one ``rafs snapshotter`` (with their own roots under a temp
dir) serve the module; images come from the real registry fixture. Proved:

- ``ctr-remote image rpull --snapshotter rafs`` of a RAFS image downloads no
  layer, and ``ctr run`` on it imports numpy while fetching far less than the
  image's size;
- a plain OCI image (``ctr pull --snapshotter rafs``) runs through the same
  snapshotter, unpacked by containerd like the overlayfs snapshotter's;
- a running container keeps working across a snapshotter restart, and the
  snapshot metadata is still there;
- a rafs daemon that died is mounted again when the next container needs it;
- removing containers and images (containerd's GC removes the snapshots) leaves
  no mount and no snapshot directory behind.

The tests run in file order; the last one cleans everything up.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers.containerd import (
    RAFS_FSTYPES,
    Containerd,
    SnapshotterProcess,
    containerd_daemon,
    mounts_under,
    snapshotter_process,
    unmount_under,
)
from tests.helpers.mounts import rafs_cmd, read_stats

pytestmark = [pytest.mark.fuse, pytest.mark.root, pytest.mark.containerd]

NUMPY = ["python3", "-c", "import numpy; print(numpy.__version__)"]


@dataclass
class Stack:
    cd: Containerd
    sn: SnapshotterProcess
    root: Path  # the snapshotter's root

    def rafs_mounts(self) -> list[str]:
        return [mp for mp, fstype in mounts_under(self.root) if fstype in RAFS_FSTYPES]

    def wait_reconnected(self, timeout: float = 30) -> None:
        """Until containerd's gRPC channel to a restarted snapshotter is up again (the
        first calls after a restart may fail with "connection closed: unavailable")."""
        deadline = time.monotonic() + timeout
        while self.cd.ctr("snapshot", "--snapshotter", "rafs", "ls", check=False).returncode:
            assert time.monotonic() < deadline, "containerd did not reconnect to the snapshotter"
            time.sleep(0.2)

    def snapshots(self) -> list[str]:
        out = self.cd.ctr("snapshot", "--snapshotter", "rafs", "ls").stdout.splitlines()
        return [line.split()[0] for line in out[1:] if line.strip()]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    base = tmp_path_factory.mktemp("containerd")
    sock = base / "snapshotter.sock"
    try:
        with snapshotter_process(sock, base / "snroot", base / "snapshotter.log") as sn, \
                containerd_daemon(base / "containerd", sock) as cd:
            yield Stack(cd, sn, base / "snroot")
    finally:
        unmount_under(base)


@pytest.fixture(scope="module")
def rafs_image(rafs_numpy_ref: str) -> str:
    return rafs_numpy_ref.removeprefix("docker://")


@pytest.fixture(scope="module")
def plain_image(registry, debian_image: tuple[Path, str]) -> str:  # type: ignore[no-untyped-def]
    src, tag = debian_image
    ref = registry.ref("plain/debian", "python")
    subprocess.run(["skopeo", "copy", "--dest-tls-verify=false", f"oci:{src}:{tag}", ref],
                   check=True, capture_output=True)
    return ref.removeprefix("docker://")


def image_layers(ref: str) -> list[tuple[str, int]]:
    from rafs.oci import parse_image_ref
    from rafs.registry import RegistryClient

    image = parse_image_ref("docker://" + ref)
    with RegistryClient.for_ref(image) as rc:
        return [(d.digest, d.size) for d in rc.resolve(image).layers]


def test_rpull_then_run_imports_numpy_lazily(stack: Stack, rafs_image: str) -> None:
    stack.cd.ctr_remote("image", "rpull", "--plain-http", "--snapshotter", "rafs", rafs_image)
    content = stack.cd.ctr("content", "ls", "-q").stdout.split()
    layers = image_layers(rafs_image)
    assert not set(content) & {d for d, _ in layers}, "rpull downloaded a layer"
    assert len(stack.rafs_mounts()) == 1
    listed = [m for m in json.loads(subprocess.run(
        rafs_cmd("ls", "--json"), capture_output=True, text=True, check=True).stdout)
        if m["mountpoint"] == stack.rafs_mounts()[0]]  # `rafs ls` sees the snapshotter's
    assert [(m["state"], m["mode"], m["mounted"]) for m in listed] == \
        [("serving", "kernel", True)], listed

    res = stack.cd.ctr("run", "--rm", "--snapshotter", "rafs", rafs_image, "numpy-1", *NUMPY)
    assert re.fullmatch(r"\d+\.\d+\.\d+\s*", res.stdout), res.stdout

    counters = read_stats(stack.rafs_mounts()[0])["stats"]
    image_size = sum(size for _, size in layers)
    fetched = counters["backend_bytes"]  # type: ignore[index]
    assert 0 < fetched < image_size * 0.6, (fetched, image_size)


def test_plain_oci_image_runs_through_the_snapshotter(stack: Stack, plain_image: str) -> None:
    before = stack.rafs_mounts()
    stack.cd.ctr("image", "pull", "--plain-http", "--snapshotter", "rafs", plain_image)
    res = stack.cd.ctr("run", "--rm", "--snapshotter", "rafs", plain_image, "plain-1",
                       "python3", "-c", "import sys; print('plain', sys.version_info[0])")
    assert res.stdout.strip() == "plain 3"
    assert stack.rafs_mounts() == before  # ordinary layers: no fused mount


def test_running_container_survives_a_snapshotter_restart(
    stack: Stack, rafs_image: str
) -> None:
    cd = stack.cd
    cd.ctr("run", "-d", "--snapshotter", "rafs", rafs_image, "keep", "sleep", "600")
    try:
        info = cd.ctr("snapshot", "--snapshotter", "rafs", "info", "keep").stdout
        listed = stack.snapshots()
        stack.sn.stop()
        stack.sn.start()
        stack.wait_reconnected()
        assert cd.ctr("snapshot", "--snapshotter", "rafs", "info", "keep").stdout == info
        assert stack.snapshots() == listed
        res = cd.ctr("task", "exec", "--exec-id", "e1", "keep", *NUMPY)
        assert re.fullmatch(r"\d+\.\d+\.\d+\s*", res.stdout), res.stdout
        # New containers start after the restart too, on the same mount.
        res = cd.ctr("run", "--rm", "--snapshotter", "rafs", rafs_image, "numpy-2", *NUMPY)
        assert re.fullmatch(r"\d+\.\d+\.\d+\s*", res.stdout), res.stdout
        assert len(stack.rafs_mounts()) == 1
    finally:
        cd.ctr("task", "kill", "-s", "KILL", "keep", check=False)
        cd.ctr("task", "rm", "-f", "keep", check=False)
        cd.ctr("container", "rm", "keep", check=False)


def _stats_or_none(mp: str) -> dict[str, object] | None:
    try:
        return read_stats(mp)
    except AssertionError:  # `rafs stats` refused: the mount is recovering
        return None


def test_a_killed_daemon_is_mounted_again_for_the_next_container(
    stack: Stack, rafs_image: str
) -> None:
    """The worker killed: its supervisor replaces it on the same mount. The supervisor
    killed: the instance is dead, and the snapshotter mounts the layer again."""
    [mp] = stack.rafs_mounts()
    for victim in ("pid", "owner_pid"):  # the worker, then the supervisor
        stats = read_stats(mp)
        pid, owner = int(stats["pid"]), int(stats["owner_pid"])  # type: ignore[call-overload]
        assert pid != owner, "the snapshotter's mounts are supervised by default"
        killed = pid if victim == "pid" else owner
        os.kill(killed, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while Path(f"/proc/{killed}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        res = stack.cd.ctr("run", "--rm", "--snapshotter", "rafs", rafs_image,
                           f"numpy-3-{victim}", *NUMPY)
        assert re.fullmatch(r"\d+\.\d+\.\d+\s*", res.stdout), res.stdout
        assert stack.rafs_mounts() == [mp]
        deadline = time.monotonic() + 120  # without a standby the new worker may still start
        while (after := _stats_or_none(mp)) is None and time.monotonic() < deadline:
            time.sleep(0.1)
        after = after or read_stats(mp)
        assert after["pid"] != pid
        if victim == "pid":  # failover: the same supervisor, one restart
            assert after["owner_pid"] == owner
            assert after["supervisor"]["restarts"] >= 1  # type: ignore[index]
        else:  # a new instance
            assert after["owner_pid"] != owner


def test_removing_containers_and_images_leaves_no_mounts(
    stack: Stack, rafs_image: str, plain_image: str
) -> None:
    from fused.client import find

    cd = stack.cd
    [mp] = stack.rafs_mounts()
    pid = read_stats(mp)["pid"]
    info = find(mp)
    assert info is not None and info.instance is not None
    blobs = str(info.instance.blobs)  # the daemon's blob mount in kernel mode
    assert cd.ctr("container", "ls", "-q").stdout.split() == []
    cd.ctr("image", "rm", "--sync", rafs_image, plain_image)
    assert stack.snapshots() == []
    assert mounts_under(stack.root) == []
    assert mounts_under(blobs) == []
    assert list((stack.root / "snapshots").iterdir()) == []
    assert not Path(f"/proc/{pid}").exists() or \
        Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z"
