"""A CRI image-service proxy: how the snapshotter learns the kubelet's pull credentials.

The kubelet sends an image's pull secret to containerd's CRI plugin with
``PullImage``; containerd resolves and fetches the manifest with it, but the
snapshotter, which must read the same image's manifest in ``Prepare`` and its
chunks for as long as it is mounted, is never told. So ``rafs snapshotter
--cri-image-service SOCK`` serves CRI's ``runtime.v1.ImageService`` on SOCK and
the kubelet is pointed at it (``--image-service-endpoint unix://SOCK``; its
``--container-runtime-endpoint`` stays containerd's). Every call is passed on
to containerd's CRI socket as it came — request bytes in, reply bytes or the
same status code and message back — and ``PullImage``'s credentials are put
into the ``Keychain`` first, because containerd calls ``Prepare`` while the
pull is under way. A pull that fails takes them out again.

Only ``ImageService`` goes through here (``PullImage``, ``ListImages``,
``ImageStatus``, ``RemoveImage``, ``ImageFsInfo``); containers and pods go from
the kubelet to containerd directly. Stargz's and Nydus' snapshotters offer the
same ("CRI keychain").
"""

from __future__ import annotations

import contextlib
import logging
import os
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc

from .api.k8s.runtime.v1 import api_pb2 as cri
from .errors import SnapshotterError
from .keychain import Keychain, pull_credentials

__all__ = ["SERVICE", "ImageProxy"]

log = logging.getLogger(__name__)

SERVICE = "runtime.v1.ImageService"
METHODS = ("PullImage", "ListImages", "ImageStatus", "RemoveImage", "ImageFsInfo")


class ImageProxy:
    """``runtime.v1.ImageService`` on the unix socket ``address``, forwarded to containerd's
    CRI plugin on ``upstream``; pull credentials go into ``keychain``."""

    def __init__(self, address: str | Path, upstream: str | Path, keychain: Keychain,
                 workers: int = 8) -> None:
        self.address = Path(address)
        self.upstream = Path(upstream)
        self.keychain = keychain
        self._channel = grpc.insecure_channel(f"unix:{self.upstream}")
        self._server = grpc.server(futures.ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix="cri-images"))
        handlers = {name: grpc.unary_unary_rpc_method_handler(self._forwarder(name))
                    for name in METHODS}
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE, handlers),))

    def start(self) -> None:
        try:
            self.address.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                self.address.unlink()
        except OSError as e:
            raise SnapshotterError(f"cannot listen on {self.address}: {e.strerror}") from None
        try:
            port = self._server.add_insecure_port(f"unix:{self.address}")
        except RuntimeError:  # newer grpcio raises where older ones returned 0
            port = 0
        if not port:
            raise SnapshotterError(f"cannot listen on {self.address}")
        self._server.start()
        os.chmod(self.address, 0o600)
        log.info("CRI image service on %s, forwarded to %s", self.address, self.upstream)

    def stop(self, grace: float = 10) -> None:
        self._server.stop(grace=grace).wait()
        self._channel.close()
        with contextlib.suppress(FileNotFoundError):
            self.address.unlink()

    def _forwarder(self, name: str) -> Any:
        upstream = self._channel.unary_unary(f"/{SERVICE}/{name}")  # bytes in, bytes out

        def forward(request: bytes, context: grpc.ServicerContext) -> bytes:
            undo = self._remember(request) if name == "PullImage" else None
            try:
                return upstream(request, timeout=context.time_remaining())
            except grpc.RpcError as e:
                if undo is not None:
                    undo()
                code = e.code() if isinstance(e, grpc.Call) else grpc.StatusCode.UNKNOWN
                details = e.details() if isinstance(e, grpc.Call) else str(e)
                if code == grpc.StatusCode.UNAVAILABLE:
                    details = f"containerd's CRI at {self.upstream}: {details}"
                context.abort(code, details or "")
            raise AssertionError("unreachable")  # context.abort raises

        return forward

    def _remember(self, request: bytes) -> Any:
        """Put the pull's credentials into the keychain; returns how to undo that."""
        try:
            pull = cri.PullImageRequest.FromString(request)
        except Exception:  # containerd will answer the malformed request itself
            return None
        image, auth = pull.image.image, pull.auth
        registry = Keychain.registry_of(image)
        if not pull.HasField("auth") or registry is None:
            return None
        creds = pull_credentials(registry, auth.username, auth.password, auth.auth,
                                 auth.server_address,
                                 tokens=bool(auth.identity_token or auth.registry_token))
        if creds is None:
            return None
        log.info("pull of %s: keeping its credentials for the snapshotter", image)
        return self.keychain.put(image, creds)
