"""Kubernetes' path: pods through containerd's CRI plugin on the rafs snapshotter.

One containerd (Debian's 1.6) with its CRI plugin enabled
(``snapshotter = "rafs"``, ``disable_snapshot_annotations = false``, a pause
image built here as ``sandbox_image``) and one ``rafs snapshotter
--cri-image-service`` serve the module. The tests are the kubelet: a CRI client
generated from the vendored ``runtime.v1`` protos talks ``RuntimeService`` to
containerd and ``ImageService`` to the snapshotter's proxy in front of
containerd's, as ``--image-service-endpoint`` would. Pods use the host network
(``NamespaceMode.NODE``), so no CNI plugin is needed. Proved:

- ``Version``/``Status`` answer as containerd 1.6 with CRI ``v1``;
- a pod runs ``import numpy`` from a RAFS image pulled through CRI: the pull
  fetches no data blob, the start fetches a fraction of the image's blob bytes
  (the registry's access log and ``rafs stats`` say so), the CRI log holds the
  output, ``ContainerStatus`` the exit, ``ExecSync`` works in a running one;
- a plain OCI image's pod runs on the same containerd and snapshotter, with no
  rafs mount;
- ``RemoveImage`` of the RAFS image unmounts it and ends its daemon, and no
  snapshot of it is left;
- pulls with credentials (basic auth and bearer tokens) reach the snapshotter
  through the proxy and the pod runs; wrong credentials are one clear CRI error
  and leave nothing; a pull that goes around the proxy names what is missing;
- at the end, with every pod and image removed, nothing is mounted and no
  snapshot is left.

The tests run in file order; the last one checks that nothing is left.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from bench.registry import RegistryServer
from tests.helpers.containerd import (
    RAFS_FSTYPES,
    Containerd,
    CriSettings,
    SnapshotterProcess,
    containerd_daemon,
    mounts_under,
    snapshotter_process,
    unmount_under,
)
from tests.helpers.cri import CriClient, cri, read_log
from tests.helpers.mounts import read_stats
from tests.helpers.pause import push_pause_image
from tests.helpers.registries import AuthRegistry

pytestmark = [pytest.mark.fuse, pytest.mark.root, pytest.mark.containerd]

NUMPY = ["python3", "-c", "import numpy; print('numpy', numpy.__version__)"]
NUMPY_OUT = re.compile(r"numpy \d+\.\d+\.\d+")


@dataclass
class Node:
    """containerd + CRI, the rafs snapshotter, and the kubelet's two CRI connections."""

    cd: Containerd
    sn: SnapshotterProcess
    root: Path  # the snapshotter's root
    kubelet: CriClient  # runtime: containerd; images: the snapshotter's proxy
    direct: CriClient  # images straight to containerd, around the proxy
    logs: Path
    pause: str

    def rafs_mounts(self) -> list[str]:
        return [mp for mp, fstype in mounts_under(self.root) if fstype in RAFS_FSTYPES]

    def snapshots(self) -> list[str]:
        out = self.cd.ctr("snapshot", "--snapshotter", "rafs", "ls").stdout.splitlines()
        return sorted(line.split()[0] for line in out[1:] if line.strip())

    def run_to_exit(self, name: str, image: str, command: list[str]) -> tuple[
            cri.ContainerStatus, list[tuple[str, str]]]:
        """One pod with one container, as the kubelet runs a Job's pod: run it to its
        exit, then stop and remove the container and the pod; (status, log lines)."""
        pod = self.kubelet.run_pod(name, self.logs / name)
        try:
            cid = self.kubelet.create_container(pod, "main", image, command)
            self.kubelet.start_container(cid)
            status = self.kubelet.wait_exited(cid)
            lines = read_log(Path(status.log_path))
            self.kubelet.remove_container(cid)
        finally:
            self.kubelet.stop_pod(pod.id)
            self.kubelet.remove_pod(pod.id)
        return status, lines


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, registry: RegistryServer) -> Iterator[Node]:
    base = tmp_path_factory.mktemp("cri")
    pause = push_pause_image(base, registry.host)
    sock, images_sock = base / "snapshotter.sock", base / "cri-images.sock"
    cd_dir = base / "containerd"
    proxy = ("--cri-image-service", str(images_sock),
             "--cri-runtime-endpoint", str(cd_dir / "containerd.sock"))
    try:
        with snapshotter_process(sock, base / "snroot", base / "snapshotter.log",
                                 extra=proxy) as sn, \
                containerd_daemon(cd_dir, sock, namespace="k8s.io",
                                  cri=CriSettings(sandbox_image=pause)) as cd, \
                CriClient(cd.address, images_sock) as kubelet, \
                CriClient(cd.address) as direct:
            try:
                yield Node(cd, sn, base / "snroot", kubelet, direct, base / "logs", pause)
            finally:
                kubelet.remove_everything()
    finally:
        unmount_under(base)


def skopeo_copy(src: str, dst: str, dest_creds: str | None = None) -> None:
    cmd = ["skopeo", "copy", "--quiet", "--preserve-digests", "--src-tls-verify=false",
           "--dest-tls-verify=false", src, dst]
    if dest_creds:
        cmd[2:2] = ["--dest-creds", dest_creds]
    subprocess.run(cmd, check=True, capture_output=True, text=True)


@pytest.fixture(scope="module")
def rafs_image(rafs_numpy_ref: str) -> str:
    """The RAFS numpy image, as CRI names it (``HOST/REPO:TAG``)."""
    return rafs_numpy_ref.removeprefix("docker://")


@pytest.fixture(scope="module")
def plain_image(registry: RegistryServer, debian_image: tuple[Path, str]) -> str:
    src, tag = debian_image
    ref = registry.ref("plain/debian", "python")
    skopeo_copy(f"oci:{src}:{tag}", ref)
    return ref.removeprefix("docker://")


def manifest_of(image: str) -> tuple[str, dict[str, int]]:
    """(manifest digest, {layer digest: size}) of an image in the anonymous registry."""
    from rafs.oci import parse_image_ref
    from rafs.registry import RegistryClient

    ref = parse_image_ref("docker://" + image)
    with RegistryClient.for_ref(ref) as rc:
        manifest = rc.resolve(ref)
    return manifest.digest, {d.digest: d.size for d in manifest.layers}


def test_version_and_status_answer_as_containerd_with_cri_v1(node: Node) -> None:
    version = node.kubelet.version()
    assert version.runtime_name == "containerd"
    assert version.runtime_api_version == "v1"
    assert version.runtime_version.startswith("1.6.")
    conditions = {c.type: c.status for c in node.kubelet.status().conditions}
    assert conditions["RuntimeReady"] is True
    # An ImageService call other than PullImage, through the snapshotter's proxy.
    fs = node.kubelet.images.ImageFsInfo(cri.ImageFsInfoRequest(), timeout=60)
    assert fs.image_filesystems


def test_a_pod_runs_from_a_rafs_image_lazily(
    node: Node, registry: RegistryServer, rafs_image: str
) -> None:
    digest, layers = manifest_of(rafs_image)
    registry.mark()
    image_ref = node.kubelet.pull(rafs_image)
    assert image_ref.startswith("sha256:")
    pulled = {r.path.rpartition("/")[2] for r in registry.blob_gets()}
    assert len(pulled & set(layers)) == 1, "the pull fetched more than the bootstrap"
    content = node.cd.ctr("content", "ls", "-q").stdout.split()
    assert not set(content) & set(layers), "containerd downloaded a layer"
    [mp] = node.rafs_mounts()

    status, lines = node.run_to_exit("numpy-pod", rafs_image, NUMPY)

    assert status.state == cri.ContainerState.CONTAINER_EXITED
    assert status.exit_code == 0, lines
    assert status.image_ref == f"{rafs_image.rpartition(':')[0]}@{digest}"
    assert [stream for stream, _ in lines] == ["stdout"]
    assert NUMPY_OUT.fullmatch(lines[0][1]), lines
    fetched = sum(r.bytes for r in registry.blob_gets()
                  if r.path.rpartition("/")[2] in layers)
    image_bytes = sum(layers.values())
    print(f"CRI pull + pod start from {rafs_image}: {fetched} of {image_bytes} blob bytes "
          f"fetched ({fetched / image_bytes:.1%})")  # shown with `pytest -s`
    assert 0 < fetched < image_bytes * 0.6, (fetched, image_bytes)
    backend = read_stats(mp)["stats"]["backend_bytes"]  # type: ignore[index]
    assert 0 < backend <= fetched, (backend, fetched)
    assert node.kubelet.list_pods() == []
    assert node.kubelet.list_containers() == []


def test_exec_sync_runs_in_a_running_rafs_container(node: Node, rafs_image: str) -> None:
    pod = node.kubelet.run_pod("exec-pod", node.logs / "exec-pod")
    try:
        cid = node.kubelet.create_container(pod, "sleeper", rafs_image, ["sleep", "600"])
        node.kubelet.start_container(cid)
        assert node.kubelet.container_status(cid).state == cri.ContainerState.CONTAINER_RUNNING
        reply = node.kubelet.exec_sync(cid, NUMPY)
        assert reply.exit_code == 0, reply.stderr
        assert NUMPY_OUT.fullmatch(reply.stdout.decode().strip())
        node.kubelet.stop_container(cid, grace=2)
        status = node.kubelet.container_status(cid)
        assert status.state == cri.ContainerState.CONTAINER_EXITED
    finally:
        node.kubelet.stop_pod(pod.id)
        node.kubelet.remove_pod(pod.id)
    assert node.kubelet.list_pods() == []


def test_a_plain_oci_image_runs_on_the_same_node(
    node: Node, registry: RegistryServer, plain_image: str
) -> None:
    before = node.rafs_mounts()
    _, layers = manifest_of(plain_image)
    registry.mark()
    node.kubelet.pull(plain_image)
    fetched = sum(r.bytes for r in registry.blob_gets()
                  if r.path.rpartition("/")[2] in layers)
    print(f"CRI pull of {plain_image}: {fetched} of {sum(layers.values())} layer bytes "
          "fetched")  # shown with `pytest -s`
    assert fetched == sum(layers.values())  # the ordinary path: every layer, whole
    status, lines = node.run_to_exit(
        "plain-pod", plain_image,
        ["python3", "-c", "import sys; print('plain', sys.version_info[0])"])
    assert status.exit_code == 0, lines
    assert lines == [("stdout", "plain 3")]
    assert node.rafs_mounts() == before  # ordinary layers: no fused mount


def test_remove_image_unmounts_the_rafs_image_and_ends_its_daemon(
    node: Node, rafs_image: str
) -> None:
    from fused.client import find

    [mp] = node.rafs_mounts()
    stats = read_stats(mp)
    pids = [int(stats[k]) for k in ("pid", "owner_pid")]  # type: ignore[call-overload]
    info = find(mp)
    assert info is not None and info.instance is not None
    blobs = info.instance.blobs  # the daemon's blob mount in kernel mode
    before = node.snapshots()
    node.kubelet.remove_image(rafs_image)
    assert node.kubelet.image_status(rafs_image) is None
    assert node.rafs_mounts() == []
    assert mounts_under(blobs) == []
    assert not any(_alive(pid) for pid in pids)  # the worker and its supervisor
    after = node.snapshots()
    assert len(after) < len(before)
    assert not [s for s in after if _is_rafs_snapshot(node, s)]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def _is_rafs_snapshot(node: Node, key: str) -> bool:
    info = node.cd.ctr("snapshot", "--snapshotter", "rafs", "info", key).stdout
    return "containerd.io/snapshot/rafs.image" in info


@pytest.fixture(scope="module", params=["registry_basic", "registry_token"])
def auth_registry(request: pytest.FixtureRequest) -> AuthRegistry:
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="module")
def private_rafs_image(auth_registry: AuthRegistry, rafs_numpy_ref: str) -> str:
    """The RAFS numpy image, copied as it is into a registry that wants credentials."""
    dst = auth_registry.ref("private/numpy", "rafs")
    skopeo_copy(rafs_numpy_ref, dst, dest_creds=auth_registry.creds)
    return dst.removeprefix("docker://")


def test_a_pull_with_credentials_reaches_the_snapshotter(
    node: Node, auth_registry: AuthRegistry, private_rafs_image: str
) -> None:
    """The snapshotter reads the manifest, and its daemon the chunks, with the
    credentials the kubelet sent (the chunk cache is emptied first, as on a new node,
    so the daemon must fetch)."""
    assert node.rafs_mounts() == []
    shutil.rmtree(node.root / "cache", ignore_errors=True)
    creds = (auth_registry.user, auth_registry.password)
    auth_registry.server.mark()
    node.kubelet.pull(private_rafs_image, creds)
    [mp] = node.rafs_mounts()
    status, lines = node.run_to_exit("private-pod", private_rafs_image, NUMPY)
    assert status.exit_code == 0, lines
    assert NUMPY_OUT.fullmatch(lines[0][1]), lines
    assert read_stats(mp)["stats"]["backend_bytes"] > 0  # type: ignore[index]
    by_rafs = [r for r in auth_registry.server.access_log(since_mark=True)
               if r.user_agent == "rafs"]
    assert any("/manifests/" in r.path and r.status == 200 for r in by_rafs)
    assert any("/blobs/" in r.path and r.status == 206 for r in by_rafs)
    node.kubelet.remove_image(private_rafs_image)
    assert node.rafs_mounts() == []


def test_wrong_credentials_are_one_clear_cri_error(
    node: Node, auth_registry: AuthRegistry, private_rafs_image: str
) -> None:
    before = node.snapshots()
    with pytest.raises(grpc.RpcError) as err:
        node.kubelet.pull(private_rafs_image, (auth_registry.user, "not-the-password"))
    assert err.value.code() == grpc.StatusCode.UNKNOWN
    details = err.value.details()
    assert "\n" not in details
    assert f'failed to pull and unpack image "{private_rafs_image}"' in details
    assert "401 Unauthorized" in details
    assert node.kubelet.image_status(private_rafs_image) is None
    assert node.snapshots() == before
    assert node.rafs_mounts() == []


def test_a_pull_around_the_proxy_says_the_snapshotter_lacks_credentials(
    node: Node, auth_registry: AuthRegistry, rafs_numpy_ref: str
) -> None:
    """containerd has the credentials, the snapshotter does not (no pull of this
    repository came through the proxy): the error says so, and nothing is left."""
    dst = auth_registry.ref("private/numpy-direct", "rafs")
    skopeo_copy(rafs_numpy_ref, dst, dest_creds=auth_registry.creds)
    image = dst.removeprefix("docker://")
    before = node.snapshots()
    with pytest.raises(grpc.RpcError) as err:
        node.direct.pull(image, (auth_registry.user, auth_registry.password))
    details = err.value.details()
    assert "rafs snapshotter: cannot read the manifest" in details
    assert "--cri-image-service" in details
    assert node.kubelet.image_status(image) is None
    assert node.snapshots() == before
    assert node.rafs_mounts() == []


def test_nothing_is_left_once_every_pod_and_image_is_removed(node: Node) -> None:
    node.kubelet.remove_everything()
    assert node.kubelet.list_images() == []
    assert node.snapshots() == []
    assert mounts_under(node.root) == []
    assert mounts_under(node.cd.dir) == []
    assert list((node.root / "snapshots").iterdir()) == []
    assert _processes_with_arg_under(node.root / "snapshots") == []  # no rafs daemon left


def _processes_with_arg_under(path: Path) -> list[int]:
    """Live processes with an argument at or below ``path`` (a daemon's mount point)."""
    prefix = str(path).encode()
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            args = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(a.startswith(prefix) for a in args) and _alive(int(d.name)):
            out.append(int(d.name))
    return out
