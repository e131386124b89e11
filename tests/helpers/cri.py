"""A CRI client for tests: containerd's CRI plugin driven the way the kubelet drives it.

Owns: the gRPC channel to containerd's socket with the stubs generated from the
vendored CRI protos (``snapshotter.api.k8s``, ``runtime.v1``); builders for the requests
the kubelet sends for a host-network pod (``NamespaceMode.NODE``, so no CNI
plugin is needed) and for a container in it; waiting for a container to exit;
reading the CRI log files containerd writes (``TIMESTAMP STREAM TAG TEXT``
lines, ``P`` partial and ``F`` full); and ``remove_everything``, which stops and
removes every pod and image, as the kubelet's garbage collection would, so a
test leaves containerd empty also when it fails.

Independent of rafs: it speaks CRI only.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import grpc

from snapshotter.api.k8s.runtime.v1 import api_pb2 as cri
from snapshotter.api.k8s.runtime.v1 import api_pb2_grpc as cri_grpc

__all__ = ["CriClient", "CriPod", "cri", "read_log"]

NODE = cri.NamespaceMode.NODE


@dataclass(frozen=True)
class CriPod:
    """A running pod sandbox: its id and the config it was created with (CreateContainer
    wants that config again, as the kubelet sends it)."""

    id: str
    config: cri.PodSandboxConfig


def read_log(path: Path) -> list[tuple[str, str]]:
    """(stream, text) of each line of a CRI container log, partial lines joined."""
    out: list[tuple[str, str]] = []
    partial: dict[str, str] = {}
    for line in path.read_text().splitlines():
        _stamp, stream, tag, text = [*line.split(" ", 3), ""][:4]
        if tag == "P":
            partial[stream] = partial.get(stream, "") + text
            continue
        out.append((stream, partial.pop(stream, "") + text))
    return out


class CriClient:
    """The kubelet's side of CRI: ``RuntimeService`` on ``runtime_endpoint`` (containerd's
    socket) and ``ImageService`` on ``image_endpoint`` (the same socket, or the socket of
    an image-service proxy, as the kubelet's ``--image-service-endpoint`` names it)."""

    def __init__(self, runtime_endpoint: str | Path, image_endpoint: str | Path | None = None,
                 timeout: float = 300) -> None:
        self._runtime_channel = grpc.insecure_channel(f"unix://{runtime_endpoint}")
        self._image_channel = (self._runtime_channel if image_endpoint is None
                               else grpc.insecure_channel(f"unix://{image_endpoint}"))
        self.runtime = cri_grpc.RuntimeServiceStub(self._runtime_channel)
        self.images = cri_grpc.ImageServiceStub(self._image_channel)
        self.timeout = timeout

    def close(self) -> None:
        self._runtime_channel.close()
        self._image_channel.close()

    def __enter__(self) -> CriClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def version(self) -> cri.VersionResponse:
        return self.runtime.Version(cri.VersionRequest(), timeout=self.timeout)

    def status(self) -> cri.RuntimeStatus:
        return self.runtime.Status(cri.StatusRequest(), timeout=self.timeout).status

    # -- images -------------------------------------------------------------------

    def pull(self, image: str, creds: tuple[str, str] | None = None,
             server_address: str = "") -> str:
        """PullImage ``HOST/REPO:TAG`` (with ``creds`` as the kubelet sends a pull
        secret); returns the image reference CRI answers (``sha256:<config digest>``)."""
        auth = None
        if creds is not None:
            auth = cri.AuthConfig(username=creds[0], password=creds[1],
                                  server_address=server_address)
        reply = self.images.PullImage(
            cri.PullImageRequest(image=cri.ImageSpec(image=image), auth=auth),
            timeout=self.timeout)
        return reply.image_ref

    def image_status(self, image: str) -> cri.Image | None:
        reply = self.images.ImageStatus(
            cri.ImageStatusRequest(image=cri.ImageSpec(image=image)), timeout=self.timeout)
        return reply.image if reply.image.id else None

    def list_images(self) -> list[cri.Image]:
        return list(self.images.ListImages(cri.ListImagesRequest(),
                                           timeout=self.timeout).images)

    def remove_image(self, image: str) -> None:
        self.images.RemoveImage(cri.RemoveImageRequest(image=cri.ImageSpec(image=image)),
                                timeout=self.timeout)

    # -- pods and containers --------------------------------------------------------

    def run_pod(self, name: str, log_dir: Path, namespace: str = "rafs-test") -> CriPod:
        """RunPodSandbox of a host-network pod whose container logs go to ``log_dir``
        (no hostname: a host-network pod shares the host's UTS namespace, and the
        kubelet leaves it empty for such pods)."""
        log_dir.mkdir(parents=True, exist_ok=True)
        config = cri.PodSandboxConfig(
            metadata=cri.PodSandboxMetadata(name=name, uid=uuid.uuid4().hex,
                                            namespace=namespace, attempt=0),
            log_directory=str(log_dir),
            labels={"io.kubernetes.pod.name": name},
            linux=cri.LinuxPodSandboxConfig(
                security_context=cri.LinuxSandboxSecurityContext(
                    namespace_options=cri.NamespaceOption(network=NODE))),
        )
        reply = self.runtime.RunPodSandbox(cri.RunPodSandboxRequest(config=config),
                                           timeout=self.timeout)
        return CriPod(reply.pod_sandbox_id, config)

    def create_container(self, pod: CriPod, name: str, image: str, command: list[str],
                         log_path: str | None = None) -> str:
        """CreateContainer ``name`` in ``pod`` running ``command`` from ``image``; its log
        goes to ``LOG_DIR/<log_path>`` (default ``NAME.log``)."""
        config = cri.ContainerConfig(
            metadata=cri.ContainerMetadata(name=name, attempt=0),
            image=cri.ImageSpec(image=image),
            command=command[:1],
            args=command[1:],
            log_path=log_path or f"{name}.log",
            linux=cri.LinuxContainerConfig(
                security_context=cri.LinuxContainerSecurityContext(
                    namespace_options=cri.NamespaceOption(network=NODE))),
        )
        reply = self.runtime.CreateContainer(
            cri.CreateContainerRequest(pod_sandbox_id=pod.id, config=config,
                                       sandbox_config=pod.config),
            timeout=self.timeout)
        return reply.container_id

    def start_container(self, container_id: str) -> None:
        self.runtime.StartContainer(cri.StartContainerRequest(container_id=container_id),
                                    timeout=self.timeout)

    def container_status(self, container_id: str) -> cri.ContainerStatus:
        return self.runtime.ContainerStatus(
            cri.ContainerStatusRequest(container_id=container_id),
            timeout=self.timeout).status

    def wait_exited(self, container_id: str, timeout: float = 300) -> cri.ContainerStatus:
        """Poll ContainerStatus until the container has exited (as the kubelet's PLEG
        does); its status then."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.container_status(container_id)
            if status.state == cri.ContainerState.CONTAINER_EXITED:
                return status
            if time.monotonic() > deadline:
                raise AssertionError(f"container {container_id} did not exit in {timeout}s: "
                                     f"{cri.ContainerState.Name(status.state)}")
            time.sleep(0.2)

    def stop_container(self, container_id: str, grace: int = 10) -> None:
        self.runtime.StopContainer(
            cri.StopContainerRequest(container_id=container_id, timeout=grace),
            timeout=self.timeout)

    def remove_container(self, container_id: str) -> None:
        self.runtime.RemoveContainer(cri.RemoveContainerRequest(container_id=container_id),
                                     timeout=self.timeout)

    def exec_sync(self, container_id: str, command: list[str],
                  timeout: int = 120) -> cri.ExecSyncResponse:
        return self.runtime.ExecSync(
            cri.ExecSyncRequest(container_id=container_id, cmd=command, timeout=timeout),
            timeout=self.timeout)

    def pod_status(self, pod_id: str) -> cri.PodSandboxStatus:
        return self.runtime.PodSandboxStatus(
            cri.PodSandboxStatusRequest(pod_sandbox_id=pod_id), timeout=self.timeout).status

    def stop_pod(self, pod_id: str) -> None:
        self.runtime.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=pod_id),
                                    timeout=self.timeout)

    def remove_pod(self, pod_id: str) -> None:
        self.runtime.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod_id),
                                      timeout=self.timeout)

    def list_pods(self) -> list[cri.PodSandbox]:
        return list(self.runtime.ListPodSandbox(cri.ListPodSandboxRequest(),
                                                timeout=self.timeout).items)

    def list_containers(self) -> list[cri.Container]:
        return list(self.runtime.ListContainers(cri.ListContainersRequest(),
                                                timeout=self.timeout).containers)

    # -- teardown -------------------------------------------------------------------

    def remove_everything(self) -> None:
        """Stop and remove every pod (with its containers) and every image."""
        for pod in self.list_pods():
            self.stop_pod(pod.id)
            self.remove_pod(pod.id)
        for image in self.list_images():
            self.remove_image(image.id)
