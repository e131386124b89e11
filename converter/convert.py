"""Orchestration of one conversion: OCI image -> RAFS image in an OCI layout.

This module owns the order of work and the all-or-nothing promise:

1. open the source (``source.py``) and the target layout (created if missing);
2. for each layer, in order: stream its entries (``tarstream.py``), apply them
   to the tree (``layers.py``), chunk file data into that layer's blob
   (``chunker.py``), then check the layer's digests;
3. build the bootstrap (``rafs.builder.build_bootstrap``) and zstd-compress it;
4. write the config (``imageconfig.py``) and the manifest: blob layers in
   device order, then the bootstrap layer; tag it in ``index.json``.

Everything is written to a temp directory inside the target layout and only
moved into ``blobs/`` at the end, right before ``index.json`` is updated; on
any failure the temp files, blobs this run added, and (if this run created it)
the layout itself are removed. Output is reproducible: the same input and
options give byte-identical blobs, config, bootstrap and manifest.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import zstandard

from rafs import oci
from rafs.codec import BOOTSTRAP_LEVEL, DEFAULT_LEVEL
from rafs.errors import ImageError
from rafs.model import Node
from rafs.oci import Descriptor, ImageRef, Manifest, OCILayout, canonical_json

from . import chunker
from .chunkdict import check_chunk_size as check_dict_chunk_size
from .chunkdict import load_chunk_dict, prune_unused_blobs
from .errors import ConvertError, OptionError
from .imageconfig import rafs_config
from .layers import LayerApplier, PrefetchRanks, new_root
from .progress import Progress
from .source import ImageSource, LayerSource, open_source
from .tarstream import LayerStream

if TYPE_CHECKING:
    from rafs.registry import RegistryClient

log = logging.getLogger(__name__)

DEFAULT_TAG = "latest"


@dataclass
class ConvertOptions:
    chunk_size: int = chunker.DEFAULT_CHUNK_SIZE
    compression: str = "zstd"  # "zstd" or "none" (chunks stored raw)
    level: int = DEFAULT_LEVEL
    workers: int | None = None  # hash/compress threads; None: min(4, cpus); 0: inline
    bootstrap_level: int = BOOTSTRAP_LEVEL
    prefetch: list[bytes] = field(default_factory=list)  # absolute paths
    chunk_dict: str | None = None  # a RAFS image whose chunks are reused, not stored again
    progress: bool | None = None  # None: when stderr is a terminal
    creds: tuple[str, str] | None = None  # for docker:// images (else from auth files)
    insecure: bool | None = None  # plain HTTP to registries (None: for localhost only)

    def registry_client(self, ref: ImageRef) -> RegistryClient:
        from rafs.registry import RegistryClient

        return RegistryClient.for_ref(ref, creds=self.creds, insecure=self.insecure)

    def check(self) -> None:
        chunker.check_chunk_size(self.chunk_size)
        if self.compression not in chunker.COMPRESSIONS:
            raise OptionError(f"unknown compression {self.compression!r} (use zstd or none)")
        if not 1 <= self.level <= 22 or not 1 <= self.bootstrap_level <= 22:
            raise OptionError("zstd levels go from 1 to 22")


@dataclass
class ConvertResult:
    manifest: Manifest
    target: ImageRef
    blobs: list[Descriptor]
    bootstrap: Descriptor
    chunks: int
    file_bytes: int  # regular file data read
    layer_bytes: int  # uncompressed tar bytes read
    seconds: float


class _Target:
    """The target layout, and everything this run must undo if it fails."""

    def __init__(self, ref: ImageRef, staging: bool = False) -> None:
        if ref.transport != "oci":
            raise ImageError(f"{ref}: only oci:DIR[:TAG] targets are supported")
        self.staging = staging  # a private layout that is pushed to a registry afterwards
        self.external: dict[str, ImageRef] = {}  # blobs left where they are (in a registry)
        self.path = Path(ref.path)
        self.created_dir = False
        self.created_layout = False
        if not self.path.exists():
            try:
                self.path.mkdir()
            except OSError as e:
                raise ImageError(f"cannot create {self.path}: {e.strerror}") from None
            self.created_dir = True
        if not (self.path / "oci-layout").exists():
            if not self.path.is_dir() or any(self.path.iterdir()):
                raise ImageError(f"{self.path} exists and is not an OCI image layout")
            self.created_layout = True
        self.placed: list[Path] = []
        self.workdir = self.path / ".rafs-convert-none"
        try:
            self.layout = OCILayout.create(self.path)
            self.workdir = Path(tempfile.mkdtemp(prefix=".rafs-convert-", dir=self.path))
        except BaseException as e:
            self.rollback()
            if isinstance(e, OSError):
                raise ImageError(f"{self.path}: {e.strerror or e}") from None
            raise

    def place(self, tmp: Path, digest: str, size: int, media_type: str,
              annotations: dict[str, str]) -> Descriptor:
        if not self.layout.has_blob(digest):
            self.placed.append(self.layout.blob_path(digest))
        return self.layout.put_blob_file(tmp, digest, size, media_type, annotations)

    def place_external(self, ref: ImageRef | None, digest: str, size: int, media_type: str,
                       annotations: dict[str, str]) -> Descriptor:
        """A blob this image shares with the chunk dictionary ``ref``: copied from there,
        or, when the image goes to the dictionary's registry, mounted there at push time."""
        if ref is not None and ref.transport == "docker" and self.staging:
            self.external[digest] = ref
            return Descriptor(media_type, digest, size, dict(annotations))
        if ref is None or ref.transport != "oci":
            raise ImageError(f"cannot copy blob {digest} of the chunk dictionary {ref} into "
                             f"{self.path}")
        if not self.layout.has_blob(digest):
            source = OCILayout(ref.path).blob_path(digest)
            tmp = self.workdir / "dict-blob.tmp"
            try:
                shutil.copyfile(source, tmp)
            except OSError as e:
                raise ImageError(f"cannot copy {source}: {e.strerror}") from None
            return self.place(tmp, digest, size, media_type, annotations)
        return Descriptor(media_type, digest, size, dict(annotations))

    def place_bytes(self, data: bytes, media_type: str) -> Descriptor:
        digest = oci.sha256_digest(data)
        if not self.layout.has_blob(digest):
            self.placed.append(self.layout.blob_path(digest))
        return self.layout.put_blob_bytes(data, media_type)

    def cleanup(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)

    def rollback(self) -> None:
        self.cleanup()
        for p in self.placed:
            with contextlib.suppress(OSError):
                p.unlink()
        if self.created_dir:
            shutil.rmtree(self.path, ignore_errors=True)
        elif self.created_layout:
            for name in ("oci-layout", "index.json"):
                with contextlib.suppress(OSError):
                    (self.path / name).unlink()
            shutil.rmtree(self.path / "blobs", ignore_errors=True)


def _as_ref(ref: ImageRef | str) -> ImageRef:
    return oci.parse_image_ref(ref) if isinstance(ref, str) else ref


def convert(src: ImageRef | str, dst: ImageRef | str,
            options: ConvertOptions | None = None) -> ConvertResult:
    """Convert ``src`` into a RAFS image tagged ``dst`` (an OCI layout or a registry)."""
    options = options or ConvertOptions()
    options.check()
    src, dst = _as_ref(src), _as_ref(dst)
    if dst.transport not in ("oci", "docker"):
        raise ImageError(f"{dst}: the target must be oci:DIR[:TAG] or docker://HOST/REPO:TAG")
    if dst.transport == "docker" and dst.tag is None:
        raise ImageError(f"{dst}: push to a tag (docker://HOST/REPO:TAG), not a digest")
    tag = dst.tag or DEFAULT_TAG
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        clients: dict[str, RegistryClient] = {}  # one per registry

        def client_for(ref: ImageRef) -> RegistryClient:
            if ref.registry not in clients:
                clients[ref.registry] = stack.enter_context(options.registry_client(ref))
            return clients[ref.registry]

        if dst.transport == "docker":
            from .push import check_push_target

            check_push_target(dst, options, client_for(dst))  # before any work
        source = stack.enter_context(open_source(
            src, client_for(src) if src.transport == "docker" else None))
        if dst.transport == "docker":
            staging = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="rafs-push-")))
            target = _Target(ImageRef("oci", str(staging / "layout"), tag), staging=True)
        else:
            target = _Target(dst)
        try:
            result = _convert(source, target, tag, options)
            if dst.transport == "docker":
                from .push import push_image

                same_registry = src.transport == "docker" and src.registry == dst.registry
                push_image(target.layout, result.manifest, client_for(dst), dst,
                           target.external, src.repository if same_registry else None)
                result.target = dst
        except BaseException:
            target.rollback()
            raise
        target.cleanup()
    result.seconds = time.monotonic() - started
    log.info("converted %s -> %s in %.1fs: %s", src, dst, result.seconds, result.manifest.digest)
    return result


def _convert(source: ImageSource, target: _Target, tag: str,
             options: ConvertOptions) -> ConvertResult:
    progress = Progress(source.total_size, enabled=options.progress)
    prefetch = PrefetchRanks(options.prefetch)
    root = new_root()
    layer_has_blob: list[bool] = []
    layer_bytes = 0
    cdict = None
    if options.chunk_dict:
        cdict = load_chunk_dict(options.chunk_dict, options.registry_client)
        check_dict_chunk_size(cdict, options.chunk_size)
    try:
        with chunker.ChunkStore(target.workdir, options.chunk_size, options.compression,
                                options.level, options.workers) as store:
            if cdict is not None:
                store.seed(cdict.blobs, cdict.chunks)
            for layer in source.layers:
                progress.note(f"layer {layer.index + 1}/{len(source.layers)}")
                before = len(store.blobs)
                layer_bytes += _apply_layer(layer, root, store, progress, prefetch)
                layer_has_blob.append(len(store.blobs) > before)
    finally:
        progress.close()
    blob_files = list(store.blob_files)
    if cdict is not None:
        store.blobs, store.chunks, kept = prune_unused_blobs(
            root, store.blobs, store.chunks, store.seeded_blobs)
        blob_files = [blob_files[k] for k in kept]
    dict_blobs = sum(f is None for f in blob_files)

    bootstrap = _build_bootstrap(root, store, options)
    raw_digest = oci.sha256_digest(bootstrap)
    packed = zstandard.ZstdCompressor(level=options.bootstrap_level,
                                      write_content_size=True).compress(bootstrap)
    log.info("bootstrap: %d bytes, %d compressed", len(bootstrap), len(packed))

    # Nothing has touched blobs/ or index.json so far. Now place everything.
    blob_descs = [
        target.place(path, blob.digest, blob.compressed_size, oci.MEDIA_TYPE_RAFS_BLOB,
                     {oci.ANNOTATION_RAFS_BLOB: "true"}) if path is not None else
        target.place_external(cdict.ref if cdict else None, blob.digest, blob.compressed_size,
                              oci.MEDIA_TYPE_RAFS_BLOB, {oci.ANNOTATION_RAFS_BLOB: "true"})
        for blob, path in zip(store.blobs, blob_files, strict=True)
    ]
    boot_desc = target.place_bytes(packed, oci.MEDIA_TYPE_RAFS_BOOTSTRAP)
    boot_desc.annotations = {oci.ANNOTATION_RAFS_BOOTSTRAP: "true",
                             oci.ANNOTATION_RAFS_BOOTSTRAP_DIGEST: raw_digest}
    config = rafs_config(source.config, layer_has_blob, [b.digest for b in store.blobs],
                         raw_digest, dict_blobs=dict_blobs)
    config_desc = target.place_bytes(canonical_json(config), oci.MEDIA_TYPE_OCI_CONFIG)
    annotations = {oci.ANNOTATION_RAFS_VERSION: oci.RAFS_VERSION,
                   oci.ANNOTATION_RAFS_SOURCE_CONFIG: source.config_digest}
    if source.manifest_digest is not None:
        annotations[oci.ANNOTATION_RAFS_SOURCE_DIGEST] = source.manifest_digest
    manifest: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": oci.MEDIA_TYPE_OCI_MANIFEST,
        "config": config_desc.to_json(),
        "layers": [d.to_json() for d in (*blob_descs, boot_desc)],
        "annotations": annotations,
    }
    platform = {k: config[k] for k in ("os", "architecture", "variant")
                if isinstance(config.get(k), str)}
    stored = target.layout.put_manifest(manifest, tag, platform or None)
    return ConvertResult(
        manifest=stored, target=ImageRef("oci", str(target.path), tag), blobs=blob_descs,
        bootstrap=boot_desc, chunks=len(store.chunks), file_bytes=store.bytes_in,
        layer_bytes=layer_bytes, seconds=0.0)


def _apply_layer(layer: LayerSource, root: Node, store: chunker.ChunkStore,
                 progress: Progress, prefetch: PrefetchRanks) -> int:
    """Apply one source layer; returns its uncompressed size."""
    writer = store.begin_layer(layer.label)
    applier = LayerApplier(root, writer, layer.label, prefetch)
    try:
        with layer.open() as raw:
            stream = LayerStream(raw, what=layer.label, media_type=layer.media_type,
                                 digest=layer.digest, size=layer.size, diff_id=layer.diff_id,
                                 on_read=progress.update)
            for entry in stream.entries():
                applier.apply(entry)
        writer.finish()
    except BaseException:
        writer.abort()
        raise
    log.info("%s: %d entries, %d bytes uncompressed (%s)", layer.label, applier.entries,
             stream.uncompressed_size, stream.compression)
    return stream.uncompressed_size


def _build_bootstrap(root: Node, store: chunker.ChunkStore, options: ConvertOptions) -> bytes:
    from rafs.builder import build_bootstrap

    try:
        return build_bootstrap(root, store.blobs, store.chunks, store.chunk_size,
                               _prefetch(options.prefetch))
    except ValueError as e:
        raise ConvertError(f"cannot build the bootstrap: {e}") from None


def _prefetch(paths: Iterable[bytes]) -> list[bytes]:
    return [p if p.startswith(b"/") else b"/" + p for p in paths]

