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

``mount``/``unmount`` drive fused's daemons through ``fused.client`` (each
detached in its own session: it outlives the snapshotter) with the shared chunk
cache under the snapshotter root. A mount is either a FUSE mount or, in
kernel mode, an EROFS mount over the daemon's blob files; the client handles
both. ``reconcile`` runs at startup: of the rafs mounts under the root, it
adopts those that serve a bootstrap snapshot the metadata still has and tears
down the rest (dead daemons, daemons that do not answer, mounts no snapshot
owns: what an earlier snapshotter process left when it was killed).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Set
from pathlib import Path

from fused import client
from fused.errors import ControlError, MountError, NotMountedError
from fused.mounts import canonical, find_mount
from fused.options import MountOptions
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
    """RAFS layers served by fused daemons, chunks cached under ``options.cache_dir``."""

    def __init__(self, options: MountOptions, mount_timeout: float = 120.0,
                 keychain: Keychain | None = None) -> None:
        self.options = options
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
        info = client.mount(image, mountpoint, options, timeout=self.mount_timeout)
        log.info("mounted %s on %s (daemon pid %s)", image, mountpoint, info.pid)

    def is_mounted(self, mountpoint: Path) -> bool:
        """A rafs mount is on ``mountpoint``, serving or not."""
        entry = find_mount(mountpoint)
        return entry is not None and entry.is_rafs

    def is_serving(self, mountpoint: Path) -> bool:
        """A rafs mount is on ``mountpoint`` and its daemon answers its control socket.

        (A stat of the mount point proves nothing: the kernel answers it from its
        attribute cache long after the daemon died.)"""
        info = client.find(mountpoint)
        if info is None or not info.mounted:
            return False
        if info.state == "recovering":  # its supervisor replaces a worker: readers wait
            log.info("rafs mount on %s is recovering (a new worker starts)", mountpoint)
            return True
        if info.state != "serving":
            log.warning("rafs mount on %s is %s", mountpoint, info.state)
            return False
        return True

    def unmount(self, mountpoint: Path) -> None:
        """Unmount plainly; lazily if busy; by force if its daemon does not answer."""
        try:
            client.unmount(mountpoint, timeout=30)
        except NotMountedError:
            return
        except (MountError, ControlError) as e:
            log.warning("unmounting %s: %s; detaching it lazily", mountpoint, e)
            try:
                client.unmount(mountpoint, lazy=True, timeout=30)
            except (MountError, ControlError) as e2:
                log.warning("detaching %s: %s; ending its daemon", mountpoint, e2)
                client.unmount(mountpoint, force=True, timeout=30)
        log.info("unmounted %s", mountpoint)

    def reconcile(self, under: Path, keep: Set[Path]) -> None:
        """Adopt the serving mounts below ``under`` that are in ``keep``; tear down
        every other rafs mount and daemon below it."""
        base = canonical(under)
        wanted = {canonical(p) for p in keep}
        for info in client.list_mounts():
            mp = info.mountpoint
            if not mp.startswith(base + "/") or info.state == "unknown":
                continue
            if info.state == "serving" and info.mounted and mp in wanted:
                log.info("adopting the rafs mount on %s (daemon pid %s)", mp, info.pid)
                continue
            why = "no snapshot owns it" if mp not in wanted else f"its daemon is {info.state}"
            log.warning("tearing down the rafs mount on %s: %s", mp, why)
            try:
                if info.state == "serving" and info.mounted:
                    self.unmount(Path(mp))
                else:
                    client.unmount(mp, force=True, timeout=30)
            except NotMountedError:
                pass
            except (MountError, ControlError) as e:
                log.error("cannot tear down %s: %s", mp, e)
        client.sweep()
