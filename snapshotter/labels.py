"""The snapshot labels that tell a remote (lazily pulled) layer from an ordinary one.

containerd's unpacker passes a layer descriptor's annotations that start with
``containerd.io/snapshot/`` to ``Prepare`` as labels, together with
``containerd.io/snapshot.ref`` (the name the committed layer snapshot will
get). Two sources add what a remote snapshotter needs:

- ``ctr-remote image rpull`` (stargz-snapshotter's handler wrapper):
  ``containerd.io/snapshot/remote/stargz.reference`` (the image reference as
  given, ``HOST/REPO:TAG``), ``.../stargz.digest`` (this layer's digest),
  ``.../stargz.layers`` (this and the following layers' digests, comma
  separated) and ``containerd.io/snapshot/remote/urls``-style extras we ignore;
- CRI (``disable_snapshot_annotations = false``):
  ``containerd.io/snapshot/cri.image-ref``, ``.../cri.layer-digest``,
  ``.../cri.manifest-digest`` and ``.../cri.image-layers``.

``remote_request`` reads either set into one ``RemoteRequest``; the manifest
lookup that decides whether the layer is RAFS is ``snapshotter.remote``'s.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

__all__ = [
    "LABEL_RAFS_IMAGE",
    "LABEL_RAFS_ROLE",
    "LABEL_SNAPSHOT_REF",
    "RemoteRequest",
    "remote_request",
]

LABEL_SNAPSHOT_REF = "containerd.io/snapshot.ref"

STARGZ_REFERENCE = "containerd.io/snapshot/remote/stargz.reference"
STARGZ_DIGEST = "containerd.io/snapshot/remote/stargz.digest"
STARGZ_LAYERS = "containerd.io/snapshot/remote/stargz.layers"

CRI_IMAGE_REF = "containerd.io/snapshot/cri.image-ref"
CRI_LAYER_DIGEST = "containerd.io/snapshot/cri.layer-digest"
CRI_MANIFEST_DIGEST = "containerd.io/snapshot/cri.manifest-digest"
CRI_IMAGE_LAYERS = "containerd.io/snapshot/cri.image-layers"

# Set by this snapshotter on the committed snapshot of a RAFS layer.
LABEL_RAFS_IMAGE = "containerd.io/snapshot/rafs.image"  # docker://HOST/REPO@DIGEST
LABEL_RAFS_ROLE = "containerd.io/snapshot/rafs.role"  # "bootstrap" or "blob"


@dataclass(frozen=True)
class RemoteRequest:
    """What the labels of one Prepare say about the layer to pull."""

    target: str  # the committed snapshot's name (containerd.io/snapshot.ref)
    reference: str  # HOST/REPO[:TAG][@DIGEST], as the user gave it
    layer_digest: str
    manifest_digest: str | None  # known only from CRI's labels


def remote_request(labels: Mapping[str, str]) -> RemoteRequest | None:
    """The remote-layer request in ``labels``, or None for an ordinary Prepare."""
    target = labels.get(LABEL_SNAPSHOT_REF)
    if not target:
        return None
    if CRI_IMAGE_REF in labels and CRI_LAYER_DIGEST in labels:
        return RemoteRequest(target, labels[CRI_IMAGE_REF], labels[CRI_LAYER_DIGEST],
                             labels.get(CRI_MANIFEST_DIGEST) or None)
    if STARGZ_REFERENCE in labels and STARGZ_DIGEST in labels:
        return RemoteRequest(target, labels[STARGZ_REFERENCE], labels[STARGZ_DIGEST], None)
    return None
