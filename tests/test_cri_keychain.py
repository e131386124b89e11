"""The snapshotter's CRI image-service proxy and its keychain, without containerd.

``tests/test_cri.py`` proves the proxy end to end with a real containerd (pulls
with credentials work only because of it). Here: which CRI ``AuthConfig``s
become credentials, that a failed pull puts back what the keychain held, that a
proxy whose containerd is gone answers UNAVAILABLE naming the socket (and keeps
nothing), and that ``rafs snapshotter`` refuses a socket it cannot listen on
with one error line.
"""

from __future__ import annotations

import base64
from pathlib import Path

import grpc
import pytest

from snapshotter.api.k8s.runtime.v1 import api_pb2 as cri
from snapshotter.api.k8s.runtime.v1 import api_pb2_grpc as cri_grpc
from snapshotter.imageproxy import ImageProxy
from snapshotter.keychain import Keychain, pull_credentials
from tests.helpers.mounts import rafs_cmd
from tests.helpers.procs import assert_clean_error, run

HOST = "127.0.0.1:5000"


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


@pytest.mark.parametrize(("username", "password", "auth", "server", "expected"), [
    ("alice", "pw", "", "", ("alice", "pw")),
    ("", "", b64("bob:p:w"), "", ("bob", "p:w")),  # the password may hold a colon
    ("alice", "pw", "", f"http://{HOST}", ("alice", "pw")),
    ("alice", "pw", "", HOST, ("alice", "pw")),
    ("alice", "pw", "", "https://other.example:5000", None),  # containerd skips them too
    ("", "", "not base64!", "", None),
    ("", "", b64("no-colon"), "", None),
    ("", "", "", "", None),
])
def test_which_auth_configs_become_credentials(
    username: str, password: str, auth: str, server: str, expected: tuple[str, str] | None
) -> None:
    assert pull_credentials(HOST, username, password, auth, server) == expected


def test_docker_hub_credentials_match_its_aliases() -> None:
    assert pull_credentials("docker.io", "u", "p", "", "https://index.docker.io/v1/") == \
        ("u", "p")


def test_tokens_are_not_credentials(caplog: pytest.LogCaptureFixture) -> None:
    assert pull_credentials(HOST, "", "", "", "", tokens=True) is None
    assert "not supported" in caplog.text


def test_the_keychain_keeps_credentials_per_repository() -> None:
    kc = Keychain()
    kc.put(f"{HOST}/team/app:v1", ("alice", "1"))
    assert kc.get(HOST, "team/app") == ("alice", "1")
    assert kc.get(HOST, "team/other") is None
    kc.put("alpine", ("hub", "2"))  # a Docker Hub short name
    assert kc.get("docker.io", "library/alpine") == ("hub", "2")
    kc.put("not a reference", ("x", "y"))  # containerd refuses it; nothing is kept
    assert Keychain.registry_of("not a reference") is None


def test_a_failed_pull_puts_back_what_was_there() -> None:
    kc = Keychain()
    kc.put(f"{HOST}/app:v1", ("alice", "good"))
    undo = kc.put(f"{HOST}/app:v2", ("alice", "wrong"))
    undo()
    assert kc.get(HOST, "app") == ("alice", "good")
    kc.put(f"{HOST}/new:v1", ("bob", "wrong"))()
    assert kc.get(HOST, "new") is None


def test_undo_leaves_a_later_pull_alone() -> None:
    kc = Keychain()
    undo_first = kc.put(f"{HOST}/app:v1", ("alice", "1"))
    kc.put(f"{HOST}/app:v1", ("alice", "2"))  # a second pull while the first runs
    undo_first()
    assert kc.get(HOST, "app") == ("alice", "2")


def test_a_proxy_without_containerd_answers_unavailable(tmp_path: Path) -> None:
    kc = Keychain()
    proxy = ImageProxy(tmp_path / "images.sock", tmp_path / "no-containerd.sock", kc)
    proxy.start()
    try:
        with grpc.insecure_channel(f"unix:{tmp_path / 'images.sock'}") as channel:
            stub = cri_grpc.ImageServiceStub(channel)
            with pytest.raises(grpc.RpcError) as err:
                stub.PullImage(cri.PullImageRequest(
                    image=cri.ImageSpec(image=f"{HOST}/app:v1"),
                    auth=cri.AuthConfig(username="alice", password="pw")), timeout=30)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert f"containerd's CRI at {tmp_path / 'no-containerd.sock'}" in \
                err.value.details()
            with pytest.raises(grpc.RpcError) as err:
                stub.ListImages(cri.ListImagesRequest(), timeout=30)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert kc.get(HOST, "app") is None
    finally:
        proxy.stop(grace=1)
    assert not (tmp_path / "images.sock").exists()


def test_the_snapshotter_refuses_a_cri_socket_it_cannot_listen_on(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    res = run(rafs_cmd("snapshotter", "--root", tmp_path / "root",
                       "--address", tmp_path / "sn.sock",
                       "--cri-image-service", blocker / "images.sock"), timeout=60)
    message = assert_clean_error(res)
    assert str(blocker / "images.sock") in message
