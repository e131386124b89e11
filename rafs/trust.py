"""The trust chain, written once: which digest vouches for which bytes.

::

    manifest digest (a reference's @sha256:..., or the index entry naming it)
     └─ vouches for the manifest bytes ......................... verify_manifest
        └─ whose last layer (digest, size) vouches for the
           compressed bootstrap layer ........................... verify_bootstrap
           └─ whose annotation (uncompressed-digest) vouches
              for the uncompressed bootstrap ..................... verify_bootstrap
              └─ whose chunk table (sha256 of each chunk's
                 uncompressed bytes) vouches for every chunk ..... rafs.codec.decode_chunk

Every step checks the bytes before anything uses them, and a failure is one
line (``DigestError`` for bytes that do not match, ``ImageError`` for an image
that is not a RAFS image or is too large to load). The functions are pure:
bytes in, verified bytes out; whoever fetched the bytes (an OCI layout, the
registry client, the daemon's backend) calls them.

Who calls what:

- ``verify_manifest``: ``rafs.registry`` for every manifest it reads (a
  manifest asked for by digest, or whose registry names a digest, must match);
  ``OCILayout`` reads manifests as digest-checked blobs.
- ``bootstrap_layer`` + ``verify_bootstrap``: ``rafs.image`` (``rafs
  inspect``/``check``/``mount`` of ``oci:`` images and chunk dictionaries),
  ``rafs.registry.fetch_bootstrap`` (the same for ``docker://``) and
  ``fused.daemon.load_bootstrap`` (before a mount uses a bootstrap; what it
  keeps in its cache is the verified raw bootstrap under its sha256, which
  ``fused.cache.cached_bootstrap`` checks again on reuse).
- ``rafs.codec.decode_chunk``: ``fused.fetcher`` for every chunk fetched,
  before it enters the cache, and ``rafs.image.check`` for every chunk of
  every blob (which also checks each whole blob against its layer digest).

xxh3 (also in the chunk table) is for cheap local checks of cached data, never
for trust. What this module does not check is the bootstrap's structure: that
is the bootstrap reader's (``FormatError``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from . import codec
from .errors import DigestError, ImageError
from .oci import (
    ANNOTATION_RAFS_BOOTSTRAP_DIGEST,
    Descriptor,
    Manifest,
    bootstrap_descriptor,
    is_rafs,
    sha256_digest,
)

__all__ = ["VerifiedBootstrap", "bootstrap_layer", "raw_bootstrap_digest", "verify_bootstrap",
           "verify_manifest"]


@dataclass(frozen=True, slots=True)
class VerifiedBootstrap:
    """An uncompressed bootstrap whose whole chain of digests has been checked."""

    raw: bytes
    digest: str  # "sha256:<hex>" of ``raw``


def verify_manifest(raw: bytes, expected: str | None, what: str = "manifest") -> str:
    """The digest of manifest bytes ``raw``; DigestError if ``expected`` (a sha256
    digest that vouches for them) names other bytes. Other algorithms are not
    checked (rafs writes and pins sha256 only)."""
    digest = sha256_digest(raw)
    if expected is not None and expected.startswith("sha256:") and expected != digest:
        raise DigestError(f"{what}: the manifest is {digest}, expected {expected}")
    return digest


def raw_bootstrap_digest(desc: Descriptor) -> str | None:
    """The digest a bootstrap layer's annotation gives the uncompressed bootstrap: what
    vouches for a cached copy of it (None if the image does not record one)."""
    return desc.annotations.get(ANNOTATION_RAFS_BOOTSTRAP_DIGEST)


def bootstrap_layer(manifest: Manifest, name: str | None = None) -> Descriptor:
    """The bootstrap layer descriptor of a RAFS image (ImageError if it has none, or
    if the bootstrap is larger than rafs loads). ``name``: the image in messages."""
    name = name or f"image {manifest.digest}"
    if not is_rafs(manifest):
        raise ImageError(f"{name} is not a RAFS image (convert it with `rafs convert`)")
    desc = bootstrap_descriptor(manifest)
    if desc.size > codec.MAX_BOOTSTRAP:
        raise ImageError(f"{name}: the bootstrap layer of {desc.size} bytes is larger than "
                         f"{codec.MAX_BOOTSTRAP}")
    return desc


def verify_bootstrap(manifest: Manifest, payload: bytes, *, manifest_digest: str | None = None,
                     name: str | None = None) -> VerifiedBootstrap:
    """Check the bootstrap layer ``payload`` of ``manifest`` down the chain and return
    the uncompressed bootstrap. ``manifest_digest``: the digest that vouches for
    the manifest, when the caller has one (a pinned reference); ``name``: the
    image in messages."""
    name = name or f"image {manifest.digest}"
    verify_manifest(manifest.raw, manifest_digest, name)
    desc = bootstrap_layer(manifest, name)
    if len(payload) != desc.size or sha256_digest(payload) != desc.digest:
        raise DigestError(f"{name}: the bootstrap layer does not match its digest "
                          f"{desc.digest} ({len(payload)} bytes, expected {desc.size})")
    raw = codec.decompress_bootstrap(payload)
    digest = "sha256:" + hashlib.sha256(raw).hexdigest()
    expected = raw_bootstrap_digest(desc)
    if expected is not None and expected != digest:
        raise DigestError(f"{name}: the uncompressed bootstrap is {digest}, its layer "
                          f"says {expected}")
    return VerifiedBootstrap(raw, digest)
