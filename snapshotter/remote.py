"""RAFS layers for the snapshotter: which layer of which image, and its fused mount.

``FusedRemote.identify`` decides, from a Prepare's labels (``snapshotter.labels``),
whether the layer belongs to a RAFS image: it fetches the image's manifest from
the registry (by the digest CRI gives, else by the reference ``ctr-remote``
gives; an index resolves to this platform), checks that the manifest is RAFS
and lists the layer, and pins the image by manifest digest
(``docker://HOST/REPO@sha256:...``) so that the mount serves exactly the image
that was pulled. The bootstrap layer is the one that gets mounted; blob layers
are empty snapshots. Manifests are cached per reference for a short time, so
the N layers of one pull cost one request.

Credentials: ``--creds`` if the snapshotter was given them, else those a CRI
pull of the image sent (``keychain``, filled by ``snapshotter.imageproxy``),
else the node's (``$REGISTRY_AUTH_FILE``, ``~/.docker/config.json``).

``mount``/``unmount`` drive fused's daemon (``fused.cli.mount_background``,
detached in its own session: it outlives the snapshotter) with the shared chunk
cache under the snapshotter root. A mount is either a FUSE mount or, in
kernel mode, an EROFS mount over the daemon's blob files; fused's ``find_mount``
and ``umount`` handle both.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from pathlib import Path

from fused.cli import MountOptions, mount_background, stats, umount
from fused.errors import MountError, NotMountedError
from fused.mounts import find_mount
from rafs.errors import AuthError, RafsError
from rafs.oci import ImageRef, Manifest, bootstrap_descriptor, is_rafs, parse_image_ref

from .errors import SnapshotterError
from .keychain import Keychain
from .labels import RemoteRequest
from .snapshots import ROLE_BLOB, ROLE_BOOTSTRAP, RemoteLayer

__all__ = ["FusedRemote"]

log = logging.getLogger(__name__)

_MANIFEST_TTL = 60.0


class FusedRemote:
    """RAFS layers served by fused daemons, chunks cached under ``cache_dir``."""

    def __init__(self, cache_dir: str | Path, options: MountOptions | None = None,
                 mount_timeout: float = 120.0, keychain: Keychain | None = None) -> None:
        self.cache_dir = Path(cache_dir)
        self.options = options or MountOptions()
        self.mount_timeout = mount_timeout
        self.keychain = keychain
        self._manifests: dict[str, tuple[float, Manifest]] = {}
        self._lock = threading.Lock()

    def identify(self, request: RemoteRequest) -> RemoteLayer | None:
        try:
            ref = parse_image_ref("docker://" + request.reference)
        except RafsError as e:
            log.warning("label reference %r is not usable (%s); an ordinary layer",
                        request.reference, e)
            return None
        if request.manifest_digest:
            ref = type(ref)(ref.transport, ref.path, None, request.manifest_digest)
        manifest = self._manifest(str(ref), ref)
        if not is_rafs(manifest):
            return None
        digests = [d.digest for d in manifest.layers]
        if request.layer_digest not in digests:
            log.warning("layer %s is not in %s (manifest %s); an ordinary layer",
                        request.layer_digest, ref, manifest.digest)
            return None
        role = (ROLE_BOOTSTRAP if request.layer_digest == bootstrap_descriptor(manifest).digest
                else ROLE_BLOB)
        return RemoteLayer(f"docker://{ref.path}@{manifest.digest}", role)

    def _manifest(self, key: str, ref: object) -> Manifest:
        from rafs.registry import RegistryClient  # the registry client loads httpx

        now = time.monotonic()
        with self._lock:
            hit = self._manifests.get(key)
            if hit is not None and now - hit[0] < _MANIFEST_TTL:
                return hit[1]
        try:
            with RegistryClient.for_ref(ref, insecure=self.options.insecure,  # type: ignore[arg-type]
                                        creds=self._creds(ref)) as client:  # type: ignore[arg-type]
                manifest = client.resolve(ref)  # type: ignore[arg-type]
        except AuthError as e:
            raise SnapshotterError(
                f"rafs snapshotter: cannot read the manifest of {key} to tell a RAFS image "
                f"from a plain one: {e} (a CRI pull's own credentials reach the snapshotter "
                "when it is the kubelet's image service: `--cri-image-service`)") from e
        except RafsError as e:
            raise SnapshotterError(f"cannot read the manifest of {key}: {e}") from e
        with self._lock:
            self._manifests[key] = (now, manifest)
        return manifest

    def _creds(self, ref: ImageRef) -> tuple[str, str] | None:
        if self.options.creds is not None or self.keychain is None:
            return self.options.creds
        return self.keychain.get(ref.registry, ref.repository)

    def mount(self, image: str, mountpoint: Path) -> None:
        options = dataclasses.replace(self.options, creds=self._creds(parse_image_ref(image)))
        pid = mount_background(image, str(mountpoint), str(self.cache_dir),
                               timeout=self.mount_timeout, options=options)
        log.info("mounted %s on %s (daemon pid %d)", image, mountpoint, pid)

    def is_mounted(self, mountpoint: Path) -> bool:
        """A rafs mount is on ``mountpoint``, serving or not."""
        entry = find_mount(mountpoint)
        return entry is not None and entry.is_rafs

    def is_serving(self, mountpoint: Path) -> bool:
        """A rafs mount is on ``mountpoint`` and its daemon answers its control socket.

        (A stat of the mount point proves nothing: the kernel answers it from its
        attribute cache long after the daemon died.)"""
        if not self.is_mounted(mountpoint):
            return False
        try:
            stats(str(mountpoint))
        except RafsError as e:
            log.warning("rafs mount on %s does not answer: %s", mountpoint, e)
            return False
        return True

    def unmount(self, mountpoint: Path) -> None:
        try:
            umount(str(mountpoint), timeout=30)
        except NotMountedError:
            return
        except MountError as e:
            log.warning("unmounting %s: %s; detaching it lazily", mountpoint, e)
            umount(str(mountpoint), lazy=True, timeout=30)
        log.info("unmounted %s", mountpoint)
