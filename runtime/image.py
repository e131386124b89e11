"""Resolve the image a container runs: its manifest (digest), config, and kind.

A reference is ``oci:DIR[:TAG]`` or ``docker://HOST/REPO[:TAG|@DIGEST]``. The
manifest digest names the image everywhere in the runtime: the shared mount of
a RAFS image and the unpacked rootfs of a plain one are keyed by it, and the
daemon is given a reference pinned to it (a docker tag could move meanwhile).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rafs.errors import ImageError
from rafs.oci import ImageRef, Manifest, OCILayout, is_rafs, parse_image_ref
from rafs.transports import RUN_IMAGE

if TYPE_CHECKING:
    from rafs.registry import RegistryClient

__all__ = ["ResolvedImage", "registry_client", "resolve_image"]

log = logging.getLogger(__name__)

MAX_CONFIG = 16 << 20


@dataclass
class ResolvedImage:
    ref: ImageRef  # as given, paths made absolute
    manifest: Manifest
    config: dict[str, Any]  # the whole image config JSON

    @property
    def digest(self) -> str:
        return self.manifest.digest

    @property
    def key(self) -> str:
        """The manifest digest as a file name."""
        return self.manifest.digest.removeprefix("sha256:")

    @property
    def is_rafs(self) -> bool:
        return is_rafs(self.manifest)

    @property
    def run_config(self) -> dict[str, Any]:
        """The ``config`` part of the image config (Cmd, Env, User, ...)."""
        value = self.config.get("config")
        return value if isinstance(value, dict) else {}

    @property
    def pinned(self) -> str:
        """A reference that names exactly this manifest, for the daemon."""
        if self.ref.transport == "docker":
            return f"docker://{self.ref.path}@{self.manifest.digest}"
        return str(self.ref)


@contextlib.contextmanager
def registry_client(ref: ImageRef) -> Iterator[RegistryClient]:
    """A registry client for ``ref`` (credentials from the usual auth files)."""
    from rafs.registry import RegistryClient

    with RegistryClient.for_ref(ref) as client:
        yield client


def _absolute(ref: ImageRef) -> ImageRef:
    if ref.transport != "oci":
        return ref
    path = os.path.abspath(ref.path)
    if ":" in path:
        raise ImageError(f"image path {path} contains ':', which references cannot carry")
    return ImageRef("oci", path, ref.tag)


def _load_config(raw: bytes, digest: str) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ImageError(f"image config {digest} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise ImageError(f"image config {digest} is not a JSON object")
    return value


def resolve_image(image: str | ImageRef) -> ResolvedImage:
    """Find the manifest and config of ``image`` (ImageError if it cannot be used)."""
    ref = _absolute(parse_image_ref(image) if isinstance(image, str) else image)
    if ref.transport == "oci":
        layout = OCILayout(ref.path)
        manifest = layout.resolve(ref.tag)
        raw = layout.read_blob(manifest.config.digest, MAX_CONFIG)
    elif ref.transport == "docker":
        with registry_client(ref) as client:
            manifest = client.resolve(ref)
            raw = client.get_blob(ref.repository, manifest.config.digest, MAX_CONFIG)
    else:
        raise ImageError(f"{ref}: containers run from {RUN_IMAGE.syntax}")
    config = _load_config(raw, manifest.config.digest)
    log.info("image %s: manifest %s (%s)", ref, manifest.digest,
             "RAFS" if is_rafs(manifest) else "plain OCI")
    return ResolvedImage(ref, manifest, config)
