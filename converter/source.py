"""Opening a source image: its config and a way to stream each layer.

This module owns the difference between source transports:

- ``oci:DIR[:TAG]``: an OCI image layout (via ``rafs.oci.OCILayout``); layers
  are blobs with descriptors, so each is checked against its digest and size
  as well as its ``diff_id``.
- ``docker://HOST/REPO[:TAG|@DIGEST]``: a registry (``rafs.registry``); the
  manifest is resolved to the host platform and each layer is streamed from
  the registry while it is converted, checked like an OCI layout's.
- ``docker-archive:FILE[:REPO:TAG]``: the tar written by ``docker save``, with
  a ``manifest.json`` naming the config and the layer tars (legacy
  ``ID/layer.tar`` or, since Docker 25, ``blobs/sha256/HEX``). Layers named by
  digest are checked against it; every layer is checked against its ``diff_id``.
  An archive that ends early is a ``BadTarError`` naming the member it ends in.

Either way the result is an ``ImageSource``: the parsed config, its digest,
the source manifest digest when there is one, and ``LayerSource`` records
whose ``open()`` gives a fresh stream of the stored layer bytes.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO

from rafs.errors import DigestError, ImageError, MediaTypeError
from rafs.oci import (
    LAYER_TYPES,
    MEDIA_TYPE_DOCKER_CONFIG,
    MEDIA_TYPE_OCI_CONFIG,
    ImageRef,
    Manifest,
    OCILayout,
    check_digest,
    is_rafs,
    parse_image_ref,
    sha256_digest,
)

from .errors import BadTarError, ConvertError

if TYPE_CHECKING:
    from rafs.registry import RegistryClient

log = logging.getLogger(__name__)

MAX_CONFIG = 16 << 20
CONFIG_TYPES = frozenset({MEDIA_TYPE_OCI_CONFIG, MEDIA_TYPE_DOCKER_CONFIG})


@dataclass
class LayerSource:
    """One source layer: what vouches for it and how to read it."""

    index: int
    diff_id: str
    media_type: str | None  # None: unknown (docker archives); compression is sniffed
    digest: str | None  # digest of the stored bytes, when known
    size: int | None
    opener: Callable[[], contextlib.AbstractContextManager[BinaryIO]]

    def open(self) -> contextlib.AbstractContextManager[BinaryIO]:
        return self.opener()

    @property
    def label(self) -> str:
        return f"layer {self.index + 1} ({self.digest or self.diff_id})"


@dataclass
class ImageSource:
    """A source image, open for reading."""

    ref: ImageRef
    config: dict[str, Any]
    config_digest: str
    manifest_digest: str | None
    layers: list[LayerSource]

    @property
    def total_size(self) -> int | None:
        sizes = [layer.size for layer in self.layers]
        return None if any(s is None for s in sizes) else sum(s for s in sizes if s is not None)


def _parse_config(raw: bytes, digest: str, layer_count: int) -> dict[str, Any]:
    try:
        config = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:  # RecursionError: nesting
        raise ImageError(f"config {digest} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise ImageError(f"config {digest} is not a JSON object")
    rootfs = config.get("rootfs")
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list):
        raise ImageError(f"config {digest} has no rootfs.diff_ids")
    for d in diff_ids:
        check_digest(d)
    if len(diff_ids) != layer_count:
        raise ImageError(
            f"config {digest} lists {len(diff_ids)} diff_ids for {layer_count} layers")
    return config


def _layer_sources(ref: ImageRef, manifest: Manifest, config: dict[str, Any],
                   opener: Callable[[str], contextlib.AbstractContextManager[BinaryIO]],
                   has_blob: Callable[[str], bool] | None = None) -> list[LayerSource]:
    layers = []
    for i, (desc, diff_id) in enumerate(zip(manifest.layers, config["rootfs"]["diff_ids"],
                                            strict=True)):
        if desc.media_type not in LAYER_TYPES:
            raise MediaTypeError(f"{ref}: layer {i + 1} has media type {desc.media_type}, "
                                 "not a tar layer")
        if has_blob is not None and not has_blob(desc.digest):
            raise ImageError(f"{ref}: layer {i + 1} blob {desc.digest} is missing"
                             + (" (a foreign layer)" if desc.urls else ""))
        layers.append(LayerSource(
            index=i, diff_id=diff_id, media_type=desc.media_type, digest=desc.digest,
            size=desc.size, opener=functools.partial(opener, desc.digest),
        ))
    return layers


def _check_source_manifest(ref: ImageRef, manifest: Manifest) -> None:
    if is_rafs(manifest):
        raise ConvertError(f"{ref} is already a RAFS image")
    if manifest.config.media_type not in CONFIG_TYPES:
        raise MediaTypeError(f"{ref}: unexpected config media type {manifest.config.media_type}")


@contextlib.contextmanager
def _open_oci(ref: ImageRef) -> Iterator[ImageSource]:
    layout = OCILayout(ref.path)
    manifest = layout.resolve(ref.tag)
    _check_source_manifest(ref, manifest)
    raw = layout.read_blob(manifest.config.digest, MAX_CONFIG)
    config = _parse_config(raw, manifest.config.digest, len(manifest.layers))
    layers = _layer_sources(ref, manifest, config, layout.open_blob, layout.has_blob)
    yield ImageSource(ref, config, manifest.config.digest, manifest.digest, layers)


@contextlib.contextmanager
def _open_registry(ref: ImageRef, client: RegistryClient | None) -> Iterator[ImageSource]:
    from rafs.registry import RegistryClient

    with contextlib.ExitStack() as stack:
        if client is None:
            client = stack.enter_context(RegistryClient.for_ref(ref))
        repo = ref.repository
        manifest = client.resolve(ref)
        _check_source_manifest(ref, manifest)
        raw = client.get_blob(repo, manifest.config.digest, MAX_CONFIG)
        config = _parse_config(raw, manifest.config.digest, len(manifest.layers))
        layers = _layer_sources(ref, manifest, config,
                                functools.partial(client.open_blob, repo))
        yield ImageSource(ref, config, manifest.config.digest, manifest.digest, layers)


_BLOB_NAME = re.compile(r"(?:\./)?blobs/sha256/([0-9a-f]{64})")
_LEGACY_CONFIG = re.compile(r"(?:\./)?([0-9a-f]{64})\.json")


def _archive_image(ref: ImageRef, manifest: bytes) -> dict[str, Any]:
    """The entry of the archive's ``manifest.json`` that ``ref`` names."""
    try:
        images = json.loads(manifest)
    except (ValueError, RecursionError) as e:  # RecursionError: nesting
        raise ImageError(f"{ref.path}: manifest.json is not valid JSON: {e}") from None
    if not isinstance(images, list) or not all(isinstance(i, dict) for i in images):
        raise ImageError(f"{ref.path}: manifest.json is not a list of images")
    return _pick_archive_image(images, ref)


def _archive_layer(ref: ImageRef, tf: tarfile.TarFile, members: dict[str, tarfile.TarInfo],
                   index: int, name: str, diff_id: str) -> LayerSource:
    """Layer ``index`` of the archive: its member, opened when the converter reads it."""
    m = members.get(name.removeprefix("./"))
    if m is None:
        raise ImageError(f"{ref.path}: layer {name} is missing from the archive")

    @contextlib.contextmanager
    def opener() -> Iterator[BinaryIO]:
        f = tf.extractfile(m)  # follows docker's layer.tar symlinks
        if f is None:
            raise ImageError(f"{ref.path}: layer {m.name} is not a file")
        with f:
            yield f  # type: ignore[misc]

    digest = _member_digest(name)
    return LayerSource(index=index, diff_id=diff_id, media_type=None, digest=digest,
                       size=m.size if digest is not None and m.isfile() else None,
                       opener=opener)


def _member_digest(name: str) -> str | None:
    m = _BLOB_NAME.fullmatch(name) or _LEGACY_CONFIG.fullmatch(name)
    return "sha256:" + m.group(1) if m else None


@contextlib.contextmanager
def _open_docker_archive(ref: ImageRef) -> Iterator[ImageSource]:
    try:
        tf = tarfile.open(  # noqa: SIM115 - closed by the with block below
            ref.path, mode="r:", encoding="utf-8", errors="surrogateescape")
    except FileNotFoundError:
        raise ImageError(f"{ref.path}: no such file") from None
    except (tarfile.TarError, OSError) as e:
        raise ImageError(f"{ref.path} is not a docker archive: {e}") from None
    with tf:
        try:
            listed = tf.getmembers()
        except (tarfile.TarError, EOFError, OSError) as e:
            raise BadTarError(_archive_damage(tf, ref.path, e)) from None
        members = {m.name.removeprefix("./"): m for m in listed}

        def read(name: str, limit: int = MAX_CONFIG) -> bytes:
            m = members.get(name.removeprefix("./"))
            f = tf.extractfile(m) if m is not None else None
            if f is None:
                raise ImageError(f"{ref.path}: {name} is missing from the archive")
            if m is not None and m.size > limit:
                raise ImageError(f"{ref.path}: {name} is too large")
            with f:
                return f.read()

        image = _archive_image(ref, read("manifest.json"))
        config_name = image.get("Config")
        layer_names = image.get("Layers")
        if not isinstance(config_name, str) or not isinstance(layer_names, list):
            raise ImageError(f"{ref.path}: manifest.json entry lacks Config or Layers")
        raw = read(config_name)
        config_digest = sha256_digest(raw)
        named = _member_digest(config_name)
        if named is not None and named != config_digest:
            raise DigestError(f"{ref.path}: config {config_name} is {config_digest}")
        config = _parse_config(raw, config_digest, len(layer_names))
        layers = [_archive_layer(ref, tf, members, i, str(name), diff_id)
                  for i, (name, diff_id) in enumerate(zip(layer_names,
                                                          config["rootfs"]["diff_ids"],
                                                          strict=True))]
        yield ImageSource(ref, config, config_digest, None, layers)


def _archive_damage(tf: tarfile.TarFile, path: str, cause: BaseException) -> str:
    """Where a docker archive that cannot be listed to its end is damaged: the member
    (a layer, usually) it ends inside, or the one after which it goes wrong."""
    try:
        size = os.path.getsize(path)
    except OSError:
        size = None
    last = tf.members[-1] if tf.members else None
    if last is None:
        return f"{path} is not a readable docker archive ({cause})"
    end = last.offset_data + last.size
    if size is not None and end > size:
        return (f"{path} is truncated: it ends at byte {size}, inside its member "
                f"{last.name} (bytes {last.offset_data} to {end})")
    return f"{path} is damaged after {last.name} ({cause})"


def _pick_archive_image(images: list[dict[str, Any]], ref: ImageRef) -> dict[str, Any]:
    if ref.tag is None:
        if len(images) != 1:
            raise ImageError(f"{ref.path} holds {len(images)} images; name one with "
                             "docker-archive:FILE:REPO:TAG")
        return images[0]
    want = {ref.tag, f"docker.io/{ref.tag}", f"docker.io/library/{ref.tag}"}
    for image in images:
        tags = image.get("RepoTags") or []
        if any(t in want or f"docker.io/library/{t}" in want for t in tags):
            return image
    raise ImageError(f"{ref.path} has no image tagged {ref.tag!r}")


@contextlib.contextmanager
def open_source(ref: ImageRef | str,
                client: RegistryClient | None = None) -> Iterator[ImageSource]:
    """Open a source image for conversion (``client``: for docker:// sources)."""
    if isinstance(ref, str):
        ref = parse_image_ref(ref)
    if ref.transport == "oci":
        cm = _open_oci(ref)
    elif ref.transport == "docker-archive":
        cm = _open_docker_archive(ref)
    elif ref.transport == "docker":
        cm = _open_registry(ref, client)
    else:
        raise ImageError(f"{ref}: the {ref.transport} transport is not supported as a source yet")
    with cm as source:
        log.info("source %s: %d layers, config %s", ref, len(source.layers),
                 source.config_digest)
        yield source
