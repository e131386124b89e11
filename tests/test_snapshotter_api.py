"""The snapshotter over its real gRPC socket: containerd's snapshot semantics.

A client built from the same generated stubs talks to ``rafs snapshotter``'s
server in this process; mounts it hands out are mounted for real to prove they
stack as containerd's overlayfs snapshotter's do. RAFS label recognition is
checked against images pushed to the real registry fixture.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import field_mask_pb2

from snapshotter.api.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from snapshotter.api.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc
from snapshotter.labels import remote_request
from snapshotter.service import claim, start_server
from snapshotter.snapshots import ROLE_BLOB, ROLE_BOOTSTRAP, Snapshotter

pytestmark = [pytest.mark.fuse, pytest.mark.root, pytest.mark.containerd]


class Client:
    """A snapshotter on ``root`` served on a socket, and a stub talking to it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.socket = root.parent / f"{root.name}.sock"
        self.claim = claim(root, self.socket)
        self.sn = Snapshotter(root)
        self.server = start_server(self.sn, self.socket)
        self.claim.bound()
        self.channel = grpc.insecure_channel(f"unix:{self.socket}")
        self.stub = pb_grpc.SnapshotsStub(self.channel)

    def close(self) -> None:
        self.channel.close()
        self.server.stop(grace=1).wait()
        self.claim.release()
        self.sn.close()

    def prepare(self, key: str, parent: str = "", **labels: str) -> list[pb.Mount]:  # type: ignore[name-defined]
        return list(self.stub.Prepare(pb.PrepareSnapshotRequest(
            key=key, parent=parent, labels=labels)).mounts)

    def view(self, key: str, parent: str = "") -> list:
        return list(self.stub.View(pb.ViewSnapshotRequest(key=key, parent=parent)).mounts)

    def commit(self, name: str, key: str, **labels: str) -> None:
        self.stub.Commit(pb.CommitSnapshotRequest(name=name, key=key, labels=labels))

    def stat(self, key: str) -> pb.Info:
        return self.stub.Stat(pb.StatSnapshotRequest(key=key)).info

    def list(self, *filters: str) -> list[str]:
        return sorted(i.name for r in self.stub.List(pb.ListSnapshotsRequest(filters=filters))
                      for i in r.info)


@pytest.fixture
def client(tmp_path: Path) -> Iterator[Client]:
    c = Client(tmp_path / "root")
    try:
        yield c
    finally:
        c.close()


@contextlib.contextmanager
def mounted(mounts: list, target: Path) -> Iterator[Path]:
    """Mount what the snapshotter handed out, as containerd's mount package would."""
    assert len(mounts) == 1
    m = mounts[0]
    target.mkdir(parents=True, exist_ok=True)
    opts = ",".join(o for o in m.options if o != "rbind")
    flags = ["--rbind"] if "rbind" in m.options else ["-t", m.type]
    subprocess.run(["mount", *flags, "-o", opts, m.source, str(target)], check=True)
    try:
        if "ro" in m.options and "rbind" in m.options:  # a bind mount becomes ro on remount
            subprocess.run(["mount", "-o", "remount,bind,ro", str(target)], check=True)
        yield target
    finally:
        subprocess.run(["umount", str(target)], check=True)


def code(call) -> grpc.StatusCode:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as exc:
        call()
    return exc.value.code()


def test_mounts_stack_like_containerd_overlayfs(client: Client, tmp_path: Path) -> None:
    base = client.prepare("extract-base")
    assert [(m.type, list(m.options)) for m in base] == [("bind", ["rw", "rbind"])]
    Path(base[0].source, "etc").mkdir()
    Path(base[0].source, "etc/base").write_text("base\n")
    client.commit("base", "extract-base")

    active = client.prepare("ctr", "base")
    assert active[0].type == "overlay"
    opts = dict(o.partition("=")[::2] for o in active[0].options)
    assert opts["lowerdir"] == base[0].source
    with mounted(active, tmp_path / "m1") as m:
        assert (m / "etc/base").read_text() == "base\n"
        (m / "etc/new").write_text("new\n")
    assert Path(opts["upperdir"], "etc/new").read_text() == "new\n"  # writes land in upper
    assert not Path(base[0].source, "etc/new").exists()
    client.commit("top", "ctr")

    # A view on one committed layer is a read-only bind mount of it.
    one = client.view("v1", "base")
    assert [(m.type, m.source, list(m.options)) for m in one] == [
        ("bind", base[0].source, ["ro", "rbind"])]
    # A view on two is an overlay with lowers only, nearest first.
    two = client.view("v2", "top")
    assert two[0].type == "overlay"
    lowers = two[0].options[0].removeprefix("lowerdir=").split(":")
    assert lowers == [opts["upperdir"], base[0].source]
    with mounted(two, tmp_path / "m2") as m:
        assert sorted(p.name for p in (m / "etc").iterdir()) == ["base", "new"]
    assert client.stub.Mounts(pb.MountsRequest(key="v2")).mounts == two


def test_errors_carry_the_codes_containerd_expects(client: Client) -> None:
    client.prepare("a")
    client.commit("base", "a")
    client.view("v", "base")
    client.prepare("active", "base")
    S = grpc.StatusCode
    assert code(lambda: client.stat("missing")) == S.NOT_FOUND
    assert code(lambda: client.prepare("active", "base")) == S.ALREADY_EXISTS
    assert code(lambda: client.prepare("x", "missing")) == S.NOT_FOUND
    assert code(lambda: client.prepare("x", "active")) == S.INVALID_ARGUMENT
    assert code(lambda: client.commit("c", "v")) == S.FAILED_PRECONDITION
    assert code(lambda: client.commit("base", "active")) == S.ALREADY_EXISTS
    assert code(lambda: client.commit("c", "missing")) == S.NOT_FOUND
    assert code(lambda: client.stub.Mounts(pb.MountsRequest(key="base"))) == \
        S.FAILED_PRECONDITION
    assert code(lambda: client.stub.Remove(pb.RemoveSnapshotRequest(key="base"))) == \
        S.FAILED_PRECONDITION
    assert code(lambda: client.stub.Remove(pb.RemoveSnapshotRequest(key="missing"))) == \
        S.NOT_FOUND
    bad = pb.UpdateSnapshotRequest(info=pb.Info(name="base"),
                                   update_mask=field_mask_pb2.FieldMask(paths=["parent"]))
    assert code(lambda: client.stub.Update(bad)) == S.INVALID_ARGUMENT
    assert code(lambda: client.list('labels."x')) == S.INVALID_ARGUMENT
    # Children first, then the parent: the directories go with the metadata.
    d = Path(client.prepare("gone", "base")[0].options[2].removeprefix("upperdir=")).parent
    for key in ("gone", "active", "v", "base"):
        client.stub.Remove(pb.RemoveSnapshotRequest(key=key))
    assert not d.exists()
    assert client.list() == []


def test_update_changes_labels_by_field_path(client: Client) -> None:
    client.prepare("k", a="1", b="2", c="3")
    before = client.stat("k")
    assert before.kind == pb.ACTIVE and dict(before.labels) == {"a": "1", "b": "2", "c": "3"}

    def update(paths: list[str], **labels: str) -> pb.Info:
        return client.stub.Update(pb.UpdateSnapshotRequest(
            info=pb.Info(name="k", labels=labels),
            update_mask=field_mask_pb2.FieldMask(paths=paths))).info

    info = update(["labels.a", "labels.b"], a="10")  # b is not given: deleted
    assert dict(info.labels) == {"a": "10", "c": "3"}
    assert info.created_at == before.created_at
    assert info.updated_at.ToNanoseconds() > before.updated_at.ToNanoseconds()
    assert dict(update(["labels"], z="26").labels) == {"z": "26"}
    assert dict(update([], y="25").labels) == {"y": "25"}
    assert dict(client.stat("k").labels) == {"y": "25"}


def test_usage_counts_the_upper_dir_and_is_kept_at_commit(client: Client) -> None:
    src = Path(client.prepare("k")[0].source)
    (src / "f").write_bytes(b"x" * 300_000)
    (src / "d").mkdir()
    usage = client.stub.Usage(pb.UsageRequest(key="k"))
    assert usage.size >= 300_000 and usage.inodes == 3  # fs dir, file, dir
    client.commit("c", "k")
    assert client.stub.Usage(pb.UsageRequest(key="c")) == usage


def test_list_applies_containerd_filters(client: Client) -> None:
    client.prepare("base-key", app="web")
    client.commit("base", "base-key", app="web")
    client.prepare("busy", "base", app="db")
    client.view("look", "base")
    assert client.list() == ["base", "busy", "look"]
    assert client.list("kind==committed") == ["base"]
    assert client.list('labels."app"==db') == ["busy"]
    assert client.list("labels.app") == ["base", "busy"]
    assert client.list("parent==base,kind!=view") == ["busy"]
    assert client.list("name~=^l", "kind==active") == ["busy", "look"]


def test_metadata_and_mounts_survive_a_restart(tmp_path: Path) -> None:
    first = Client(tmp_path / "root")
    try:
        first.prepare("a", x="1")
        first.commit("base", "a")
        mounts = first.prepare("ctr", "base")
        info = first.stat("ctr")
    finally:
        first.close()
    second = Client(tmp_path / "root")
    try:
        assert second.stat("ctr") == info
        assert list(second.stub.Mounts(pb.MountsRequest(key="ctr")).mounts) == mounts
        assert second.list() == ["base", "ctr"]
        second.prepare("next", "base")  # ids keep counting: no directory is reused
        assert second.stat("next").kind == pb.ACTIVE
    finally:
        second.close()


def test_cleanup_removes_directories_no_snapshot_owns(client: Client) -> None:
    client.prepare("kept")
    orphan = client.root / "snapshots" / "999" / "fs"
    orphan.mkdir(parents=True)
    (orphan / "f").write_text("left behind by a crash")
    client.stub.Cleanup(pb.CleanupRequest())
    assert not orphan.parent.exists()
    assert (client.root / "snapshots" / str(client.sn.stat("kept").id)).is_dir()


# -- RAFS layers -------------------------------------------------------------------


def rpull_labels(reference: str, layer: str, target: str) -> dict[str, str]:
    """The labels `ctr-remote image rpull` passes to Prepare (as logged from a real pull)."""
    return {
        "containerd.io/snapshot.ref": target,
        "containerd.io/snapshot/remote/stargz.reference": reference,
        "containerd.io/snapshot/remote/stargz.digest": layer,
        "containerd.io/snapshot/remote/stargz.layers": layer,
        "containerd.io/snapshot/remote/stargz.prefetch": "10485760",
        "containerd.io/snapshot/remote/urls": "",
    }


def test_rafs_layers_are_recognised_from_rpull_and_cri_labels(
    registry, rafs_python_ref: str, debian_image: tuple[Path, str]  # type: ignore[no-untyped-def]
) -> None:
    from fused.options import MountOptions
    from rafs.oci import parse_image_ref
    from rafs.registry import RegistryClient
    from snapshotter.remote import FusedRemote

    ref = parse_image_ref(rafs_python_ref)
    with RegistryClient.for_ref(ref) as rc:
        manifest = rc.resolve(ref)
    plain = registry.ref("plain/debian", "python")
    src, tag = debian_image
    subprocess.run(["skopeo", "copy", "--dest-tls-verify=false", f"oci:{src}:{tag}", plain],
                   check=True, capture_output=True)
    pref = parse_image_ref(plain)
    with RegistryClient.for_ref(pref) as rc:
        plain_manifest = rc.resolve(pref)

    remote = FusedRemote(MountOptions("/nonexistent"))
    name = rafs_python_ref.removeprefix("docker://")
    pinned = f"docker://{ref.path}@{manifest.digest}"
    *blobs, boot = [d.digest for d in manifest.layers]
    got = remote.identify(remote_request(rpull_labels(name, boot, "t")))  # type: ignore[arg-type]
    assert got is not None and (got.image, got.role) == (pinned, ROLE_BOOTSTRAP)
    got = remote.identify(remote_request(rpull_labels(name, blobs[0], "t")))  # type: ignore[arg-type]
    assert got is not None and (got.image, got.role) == (pinned, ROLE_BLOB)
    cri = {"containerd.io/snapshot.ref": "t",
           "containerd.io/snapshot/cri.image-ref": f"{ref.path}:whatever-tag",
           "containerd.io/snapshot/cri.layer-digest": boot,
           "containerd.io/snapshot/cri.manifest-digest": manifest.digest}
    got = remote.identify(remote_request(cri))  # type: ignore[arg-type]
    assert got is not None and (got.image, got.role) == (pinned, ROLE_BOOTSTRAP)
    # An ordinary image, a layer not in the manifest, no target: not RAFS.
    plain_layer = plain_manifest.layers[0].digest
    assert remote.identify(remote_request(  # type: ignore[arg-type]
        rpull_labels(plain.removeprefix("docker://"), plain_layer, "t"))) is None
    assert remote.identify(remote_request(  # type: ignore[arg-type]
        rpull_labels(name, plain_layer, "t"))) is None
    assert remote_request({"containerd.io/snapshot/remote/stargz.digest": boot}) is None


@pytest.mark.parametrize("where", ["root", "address"])
def test_unusable_root_or_socket_is_one_clean_error(tmp_path: Path, where: str) -> None:
    from tests.helpers.mounts import rafs_cmd
    from tests.helpers.procs import assert_clean_error, run

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    root = blocker / "root" if where == "root" else tmp_path / "root"
    address = blocker / "s.sock" if where == "address" else tmp_path / "s.sock"
    res = run(rafs_cmd("snapshotter", "--root", root, "--address", address), timeout=60)
    message = assert_clean_error(res)
    assert ("cannot use root" if where == "root" else "cannot listen") in message
