"""Pushing a converted image from an OCI layout to a registry.

The converter always writes into an OCI layout first (for a ``docker://``
target, a private temporary one); ``push_image`` then uploads what the
registry lacks: every blob is HEADed first (``RegistryClient.push_blob``), so
pushing a second image that shares blobs with the first uploads none of them
again, and blobs that live in another repository of the same registry (a chunk
dictionary's) are cross-mounted rather than uploaded. The manifest goes last,
byte for byte as stored in the layout, so its digest does not change.

``check_push_target`` runs before any conversion to a registry: the registry
must answer and take our pushes (``RegistryClient.check_push``), so a typo in
the host or missing credentials fail in a second, not after the conversion.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from rafs.errors import ImageError
from rafs.oci import ImageRef, Manifest, OCILayout

if TYPE_CHECKING:
    from rafs.registry import RegistryClient

    from .convert import ConvertOptions

__all__ = ["PushResult", "check_push_target", "push_image"]

log = logging.getLogger(__name__)


@dataclass
class PushResult:
    uploaded: list[str] = field(default_factory=list)  # blob digests sent
    present: list[str] = field(default_factory=list)  # already there, or cross-mounted
    bytes_uploaded: int = 0


def check_push_target(dst: ImageRef, options: ConvertOptions,
                      client: RegistryClient | None = None) -> None:
    """Fail now unless a ``docker://`` target takes our pushes (nothing to do for a layout)."""
    if dst.transport != "docker":
        return
    if client is not None:
        client.check_push(dst.repository)
        return
    with options.registry_client(dst) as own:
        own.check_push(dst.repository)


def push_image(layout: OCILayout, manifest: Manifest, client: RegistryClient, dst: ImageRef,
               external: dict[str, ImageRef] | None = None,
               mount_from: str | None = None) -> PushResult:
    """Upload ``manifest`` and its blobs from ``layout`` to ``dst``.

    ``external`` names, for blobs that are not in the layout, the image they
    come from (a chunk dictionary in the same registry): they are mounted from
    its repository, and must already be in the registry. ``mount_from`` is a
    repository of the same registry that may hold some of the blobs (the
    source image's): those are mounted rather than uploaded.
    """
    external = external or {}
    repo = dst.repository
    result = PushResult()
    for desc in [manifest.config, *manifest.layers]:
        if layout.has_blob(desc.digest):
            sent = client.push_blob(repo, desc.digest, desc.size, layout.blob_path(desc.digest),
                                    mount_from=mount_from if mount_from != repo else None)
        else:
            source = external.get(desc.digest)
            if source is None or source.transport != "docker" or source.registry != dst.registry:
                raise ImageError(f"blob {desc.digest} is neither in the converted image nor "
                                 f"in {dst.registry}")
            sent = client.push_blob(repo, desc.digest, desc.size, b"",
                                    mount_from=source.repository)
            if sent:
                raise ImageError(f"blob {desc.digest} of {source} is missing in {dst.registry}")
        if sent:
            result.uploaded.append(desc.digest)
            result.bytes_uploaded += desc.size
        else:
            result.present.append(desc.digest)
    client.put_manifest(repo, dst.tag or "latest", manifest.raw, manifest.media_type)
    log.info("pushed %s: %d blobs uploaded (%d bytes), %d already there", dst,
             len(result.uploaded), result.bytes_uploaded, len(result.present))
    return result
